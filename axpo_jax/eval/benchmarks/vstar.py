"""V* Bench (vstar_bench): 191 multiple-choice questions about small details in high-resolution images
(115 direct_attributes, 76 relative_position).

Published files read (https://huggingface.co/datasets/craigwu/vstar_bench): `test_questions.jsonl`, one object
per line with fields `image` (path relative to the dataset folder, e.g. "direct_attributes/sa_4690.jpg"), `text`
(the question, then one "(A) option" line per option, then the instruction "Answer with the option's letter from
the given choices directly."), `category`, `question_id`, `label` (the correct letter); the images sit in the
`direct_attributes/` and `relative_position/` folders beside it. The question text is used as published.
"""

from __future__ import annotations

import os
import re

from axpo_jax.eval.benchmarks.base import (
    BenchmarkDataError,
    EvalItem,
    choice_references,
    image_from_file,
    read_jsonl,
    require,
    resolve_file,
    resolve_image_path,
    text_field,
)

NAME = "vstar"
_OPTION_LINE = re.compile(r"^\(([A-Z])\)\s*(.*)$", re.MULTILINE)


def read_vstar(path: str) -> list[EvalItem]:
    file = resolve_file(path, ["test_questions.jsonl"], "V* Bench")
    root = os.path.dirname(os.path.abspath(file))
    items = []
    for where, row in read_jsonl(file):
        text = require(row, "text", where)
        options = dict(_OPTION_LINE.findall(text))
        if not options:
            raise BenchmarkDataError(f"{where}: field 'text' has no '(A) option' lines")
        letters = sorted(options)
        label = text_field(row, "label", where)
        references = choice_references(label, [options[letter] for letter in letters], where)
        image = image_from_file(resolve_image_path(require(row, "image", where), [root], where), where)
        items.append(EvalItem(NAME, text_field(row, "question_id", where), text.strip(), [image], references,
                              "choice", metadata={"category": row.get("category")}))
    return items
