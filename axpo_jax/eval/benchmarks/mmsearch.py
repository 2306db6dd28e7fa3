"""MMSearch (end-to-end task): 300 news and knowledge questions a model answers by searching the web, most with
a query image.

Published files read (https://huggingface.co/datasets/CaraJ/MMSearch, config "end2end";
https://github.com/CaraJ7/MMSearch): `end2end.parquet`, one row per question with fields `sample_id`, `query`,
`query_image` (Hugging Face Image struct {bytes, path}, null for text-only queries), `image_search_result`,
`area`, `subfield`, `timestamp`, `gt_requery`, `gt_answer`, `alternative_gt_answers` (other accepted answers:
a list, or a string holding a JSON/Python list). Every row is read; text-only questions have no image.

Scored like the authors' end-to-end metric, token F1 against the answer and its alternatives, made binary at
F1 >= 0.5 (docs/AXPO.md's reward is binary).
"""

from __future__ import annotations

import ast
import json

from axpo_jax.eval.benchmarks.base import (
    BenchmarkDataError,
    EvalItem,
    image_from_feature,
    read_parquet,
    require,
    resolve_file,
    text_field,
)

NAME = "mmsearch"


def _alternatives(value, where: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return []
        if text.startswith("["):
            try:
                value = json.loads(text)
            except json.JSONDecodeError:
                try:
                    value = ast.literal_eval(text)  # literals only: never executes code
                except (ValueError, SyntaxError):
                    raise BenchmarkDataError(f"{where}: field 'alternative_gt_answers' is not a list: {text!r:.80}")
        else:
            value = [text]
    if not isinstance(value, (list, tuple)):
        raise BenchmarkDataError(f"{where}: field 'alternative_gt_answers' must be a list, got {type(value).__name__}")
    return [str(v).strip() for v in value if v is not None and str(v).strip()]  # null is no answer, not "None"


def read_mmsearch(path: str) -> list[EvalItem]:
    file = resolve_file(path, ["end2end.parquet", "end2end/*.parquet"], "MMSearch")
    items = []
    for where, row in read_parquet(file):
        images = []
        if row.get("query_image") is not None:
            images.append(image_from_feature(row["query_image"], f"{where} field 'query_image'"))
        answer = text_field(row, "gt_answer", where)
        references = [answer] + [a for a in _alternatives(row.get("alternative_gt_answers"), where) if a != answer]
        items.append(EvalItem(NAME, text_field(row, "sample_id", where), require(row, "query", where).strip(), images,
                              references, "f1", metadata={"area": row.get("area"), "subfield": row.get("subfield")}))
    return items
