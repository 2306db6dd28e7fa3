"""DynaMath: 501 seed questions of visual math, each published in 10 generated variants; one variant is read.

Published files read (https://huggingface.co/datasets/DynaMath/DynaMath_Sample): `data/sample_variant<V>-*.parquet`
(split `sample_variant<V>`, V = 1..10; older revisions named the files `data/sample<V>-*.parquet`), one row per
question with fields `id`, `question` (choices, when any, are written into it), `image` (relative path),
`decoded_image` (Hugging Face Image struct {bytes, path}), `ground_truth`, `answer_type` ("multiple choice",
"float" or "text"), `subject`, `knowledge_level`.

Scoring follows the authors' grader (VLMEvalKit's DynaMath): multiple choice by option letter; float answers
within an absolute 0.001 (the answers are given to three decimals); text by normalized exact match.
"""

from __future__ import annotations

from axpo_jax.algo.rewards import RewardConfig
from axpo_jax.eval.benchmarks.base import (
    BenchmarkDataError,
    EvalItem,
    choice_references,
    image_from_feature,
    read_parquet,
    require,
    resolve_file,
    text_field,
)

NAME = "dynamath"
_FLOAT_TOLERANCE = RewardConfig(rel_tol=0.0, abs_tol=1e-3)


def read_dynamath(path: str, variant: int = 1) -> list[EvalItem]:
    file = resolve_file(path, [f"data/sample_variant{variant}-*.parquet", f"sample_variant{variant}-*.parquet",
                               f"data/sample{variant}-*.parquet"], f"DynaMath (variant {variant})")
    items = []
    for where, row in read_parquet(file):
        item_id = text_field(row, "id", where)
        answer_type = require(row, "answer_type", where).strip().lower()
        truth = text_field(row, "ground_truth", where)
        image = image_from_feature(require(row, "decoded_image", where, (dict, bytes)),
                                   f"{where} field 'decoded_image'")
        if answer_type == "multiple choice":
            references, kind, reward = choice_references(truth, [], where)[:1], "choice", RewardConfig()
        elif answer_type == "float":
            references, kind, reward = [truth], "numeric", _FLOAT_TOLERANCE
        elif answer_type == "text":
            references, kind, reward = [truth], "exact", RewardConfig()
        else:
            raise BenchmarkDataError(f"{where}: unknown answer_type {answer_type!r} "
                                     f"(expected 'multiple choice', 'float' or 'text')")
        items.append(EvalItem(NAME, item_id, require(row, "question", where).strip(), [image], references, kind,
                              reward_config=reward,
                              metadata={"subject": row.get("subject"), "knowledge_level": row.get("knowledge_level")}))
    return items
