"""MathVision (MATH-V), the testmini split: 304 competition math problems with figures.

Published files read (https://huggingface.co/datasets/MathLLMs/MathVision, and the authors' GitHub release
https://github.com/mathllm/MATH-V):
- Hugging Face: `data/testmini-00000-of-00001-*.parquet`, one row per problem with fields `id`, `question`
  (may hold `<image1>` markers), `options` (list of strings; empty for open questions), `image` (relative path),
  `decoded_image` (the image as a Hugging Face Image struct {bytes, path}), `answer` (an option letter A-E for
  multiple choice, else the value), `solution`, `level`, `subject`.
- GitHub: `data/testmini.jsonl` with the same fields but no `decoded_image`; `image` (e.g. "images/1.jpg") is
  relative to the repository root, the folder that holds `data/`.

A folder may be given (the downloaded repository); the parquet is preferred when both are there. Multiple-choice
questions (options present, or a bare letter answer whose options are drawn in the figure) are scored by option
letter, the option's text also accepted; the others by math equivalence.
"""

from __future__ import annotations

import os

from axpo_jax.eval.benchmarks.base import (
    OPTION_LETTERS,
    BenchmarkDataError,
    EvalItem,
    choice_references,
    image_from_feature,
    image_from_file,
    read_jsonl,
    read_parquet,
    require,
    resolve_file,
    resolve_image_path,
    strip_image_placeholders,
    text_field,
    with_options,
)

NAME = "mathvision"


def read_mathvision(path: str) -> list[EvalItem]:
    file = resolve_file(path, ["data/testmini-*.parquet", "testmini-*.parquet", "data/testmini.jsonl",
                               "testmini.jsonl"], "MathVision")
    if file.endswith(".parquet"):
        rows = read_parquet(file)
    elif file.endswith(".jsonl"):
        rows = read_jsonl(file)
    else:
        raise BenchmarkDataError(f"MathVision: {file} is neither the published parquet nor jsonl file")
    # the GitHub jsonl names images relative to the repository root, which holds data/testmini.jsonl
    roots = [os.path.dirname(os.path.dirname(os.path.abspath(file))), os.path.dirname(os.path.abspath(file))]
    items = []
    for where, row in rows:
        item_id = text_field(row, "id", where)
        options = row.get("options") or []
        if not isinstance(options, list) or not all(isinstance(o, (str, int, float)) for o in options):
            raise BenchmarkDataError(f"{where}: field 'options' must be a list of strings, got {options!r:.80}")
        options = [str(o).strip() for o in options]
        answer = text_field(row, "answer", where)
        if row.get("decoded_image") is not None:
            image = image_from_feature(row["decoded_image"], f"{where} field 'decoded_image'")
        else:
            relative = require(row, "image", where)
            image = image_from_file(resolve_image_path(relative, roots, where), where)
        question = strip_image_placeholders(require(row, "question", where))
        is_choice = bool(options) or (len(answer) == 1 and answer.upper() in OPTION_LETTERS[:5])
        if options:
            question = with_options(question, options)
        items.append(EvalItem(
            NAME, item_id, question, [image],
            choice_references(answer, options, where) if is_choice else [answer],
            "choice" if is_choice else "math",
            metadata={"subject": row.get("subject"), "level": row.get("level")},
        ))
    return items
