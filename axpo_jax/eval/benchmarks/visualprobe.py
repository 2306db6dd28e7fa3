"""VisualProbe (hard split): open-ended questions about tiny objects in large, cluttered images (Mini-o3).

Published files read (https://huggingface.co/datasets/Mini-o3/VisualProbe_Hard; loader settings in the authors'
https://github.com/Mini-o3/Mini-o3 README: `data.image_key=images`, `data.answer_key=solution`): `val.json`, a JSON
list of questions with fields `images` (list of image paths), `problem` (the question; `question` is accepted
too), `solution` (the answer); the images are in the `data/` folder. Image paths are resolved against the folder
of `val.json` and then its parent (the authors' BASE_IMAGE_DIR layout, paths like "VisualProbe_Hard/data/...").

The authors grade with an LLM judge; with one configured it is used here, else normalized exact match.
"""

from __future__ import annotations

import os
import re

from axpo_jax.eval.benchmarks.base import (
    BenchmarkDataError,
    EvalItem,
    image_from_file,
    read_json_list,
    require,
    resolve_file,
    resolve_image_path,
    strip_image_placeholders,
    text_field,
)

NAME = "visualprobe"
_ANSWER_TAGS = re.compile(r"</?answer>")


def read_visualprobe(path: str) -> list[EvalItem]:
    file = resolve_file(path, ["val.json"], "VisualProbe")
    folder = os.path.dirname(os.path.abspath(file))
    roots = [folder, os.path.dirname(folder)]
    items = []
    for index, (where, row) in enumerate(read_json_list(file)):
        images = require(row, "images", where, list)
        if not all(isinstance(p, str) for p in images):
            raise BenchmarkDataError(f"{where}: field 'images' must be a list of paths")
        question = row.get("problem") if row.get("problem") is not None else row.get("question")
        if not isinstance(question, str) or not question.strip():
            raise BenchmarkDataError(f"{where}: missing the question (field 'problem' or 'question')")
        answer = _ANSWER_TAGS.sub("", text_field(row, "solution", where)).strip()
        item_id = str(row.get("doc_id", row.get("id", index)))
        sources = [image_from_file(resolve_image_path(p, roots, where), where) for p in images]
        items.append(EvalItem(NAME, item_id, strip_image_placeholders(question), sources, [answer], "exact",
                              prefers_judge=True))
    return items
