"""HR-Bench 4K and 8K: multiple-choice questions on 4K / 8K-resolution images (single-instance and cross-instance
perception), 800 questions each.

Published files read (https://huggingface.co/datasets/DreamMr/HR-Bench): `hr_bench_4k.tsv` and `hr_bench_8k.tsv`,
tab-separated with a header line and columns `index`, `question`, `answer` (the correct letter), `category`,
`A`, `B`, `C`, `D` (the options), `cycle_category`, `image` (the image, base64-encoded). The same layout is what
VLMEvalKit and lmms-eval read.
"""

from __future__ import annotations

from axpo_jax.eval.benchmarks.base import (
    OPTION_LETTERS,
    EvalItem,
    choice_references,
    image_from_base64,
    read_tsv,
    require,
    resolve_file,
    text_field,
    with_options,
)


def read_hrbench(path: str, resolution: str) -> list[EvalItem]:
    """`resolution` is "4k" or "8k": it picks the file in a folder and names the benchmark."""
    name = f"hrbench{resolution}"
    file = resolve_file(path, [f"hr_bench_{resolution}.tsv"], f"HR-Bench {resolution.upper()}")
    items = []
    for where, row in read_tsv(file):
        options = []
        for letter in OPTION_LETTERS:  # A, B, ... while the columns exist and are filled
            if not (row.get(letter) or "").strip():
                break
            options.append(row[letter].strip())
        if len(options) < 2:
            require(row, "A", where)  # names the missing column
            require(row, "B", where)
        question = with_options(require(row, "question", where).strip(), options)
        image = image_from_base64(require(row, "image", where), f"{where} column 'image'")
        references = choice_references(text_field(row, "answer", where), options, where)
        items.append(EvalItem(name, text_field(row, "index", where), question, [image], references, "choice",
                              metadata={"category": row.get("category"), "cycle_category": row.get("cycle_category")}))
    return items


def read_hrbench4k(path: str) -> list[EvalItem]:
    return read_hrbench(path, "4k")


def read_hrbench8k(path: str) -> list[EvalItem]:
    return read_hrbench(path, "8k")
