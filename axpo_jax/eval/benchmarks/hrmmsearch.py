"""HR-MMSearch: knowledge-intensive questions about high-resolution images that need search and cropping
(305 questions; SenseTime's SenseNova-MARS).

Published files read (https://huggingface.co/datasets/sensenova/HR-MMSearch): `data/train-*.parquet` (split
"train"), one row per question with fields `sample_id`, `query`, `query_image` (Hugging Face Image struct
{bytes, path}), `ground_truth`, `difficulty`, `category`.

The authors grade with an LLM judge; with one configured it is used here, else token F1 >= 0.5 (search answers).
"""

from __future__ import annotations

from axpo_jax.eval.benchmarks.base import EvalItem, image_from_feature, read_parquet, require, resolve_file, text_field

NAME = "hrmmsearch"


def read_hrmmsearch(path: str) -> list[EvalItem]:
    file = resolve_file(path, ["data/train-*.parquet", "train-*.parquet"], "HR-MMSearch")
    items = []
    for where, row in read_parquet(file):
        image = image_from_feature(require(row, "query_image", where, (dict, bytes)), f"{where} field 'query_image'")
        items.append(EvalItem(NAME, text_field(row, "sample_id", where), require(row, "query", where).strip(), [image],
                              [text_field(row, "ground_truth", where)], "f1", prefers_judge=True,
                              metadata={"difficulty": row.get("difficulty"), "category": row.get("category")}))
    return items
