"""Math-VR (Math-VR-bench, English): math problems whose solutions need drawing (auxiliary lines, plots); a
text-only and a multimodal subset.

Published files read (https://huggingface.co/datasets/gogoduan/Math-VR-bench; reader code in the authors'
https://github.com/HKU-MMLab/Math-VR-CodePlot-CoT, `Math-VR-Infer.py` and `Math-VR-Eval.py`):
`data/test-00000-of-00001.parquet`, one row per question with fields `id`, `question` (with `<image1>` ...
`<image8>` markers where its figures go), `image1` ... `image8` (Hugging Face Image structs, null when unused),
`category` ("text" or "multimodal"), `answers` (the reference answer, a string or a list of sub-answers),
`number_of_answers`, `total_score`, `scoring_points`, `scores`.

The authors grade Answer Correctness with GPT-4.1 as a judge; with a judge configured it is used here. Without
one, math equivalence against the answer (sub-answers joined by "; ") is the fallback: exact for single values,
strict for multi-part answers.
"""

from __future__ import annotations

import re

from axpo_jax.eval.benchmarks.base import (
    BenchmarkDataError,
    EvalItem,
    image_from_feature,
    read_parquet,
    require,
    resolve_file,
    strip_image_placeholders,
    text_field,
)

NAME = "mathvr"
_MARKER = re.compile(r"<image(\d+)>")


def read_mathvr(path: str) -> list[EvalItem]:
    file = resolve_file(path, ["data/test-*.parquet", "test-*.parquet"], "Math-VR")
    items = []
    for where, row in read_parquet(file):
        item_id = text_field(row, "id", where)
        question = require(row, "question", where)
        images = []
        for number in dict.fromkeys(_MARKER.findall(question)):  # in order of first mention, as the authors do
            field = f"image{number}"
            if row.get(field) is None:
                raise BenchmarkDataError(f"{where}: the question shows <image{number}> but field {field!r} is empty")
            images.append(image_from_feature(row[field], f"{where} field {field!r}"))
        answers = require(row, "answers", where, (str, list, int, float))
        if isinstance(answers, list):
            parts = [str(a).strip() for a in answers if a is not None and str(a).strip()]  # null: not "None"
            if not parts:
                raise BenchmarkDataError(f"{where}: field 'answers' is an empty list")
            reference = "; ".join(parts)
        else:
            reference = str(answers).strip()
        items.append(EvalItem(NAME, item_id, strip_image_placeholders(question), images, [reference], "math",
                              prefers_judge=True, metadata={"category": row.get("category")}))
    return items
