"""Tiny copies of each benchmark's published files, laid out and typed as their authors publish them (see each
reader's docstring for the source): the same file names, folders, column names and types (Hugging Face Image
columns as parquet structs {bytes, path}, option lists, base64 images in TSV), with a few questions and small
images whose colour says which question they belong to, so a test can check the right image came through."""

from __future__ import annotations

import base64
import io
import json
import os

from PIL import Image


def image_bytes(color: tuple[int, int, int], size=(40, 32), fmt="PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format=fmt)
    return buffer.getvalue()


def write_image(path: str, color, size=(40, 32)) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def hf_image(color, name: str) -> dict:
    """A Hugging Face `Image` feature value as parquet stores it."""
    return {"bytes": image_bytes(color), "path": name}


def write_parquet(path: str, rows: list[dict], schema=None) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return path


def _image_struct():
    import pyarrow as pa

    return pa.struct([("bytes", pa.binary()), ("path", pa.string())])


# --------------------------------------------------------------------------------------------------- no pyarrow

VSTAR_ROWS = [
    {"image": "direct_attributes/sa_4690.jpg", "category": "direct_attributes", "question_id": 0, "label": "A",
     "text": "What is the material of the glove?\n(A) rubber\n(B) cotton\n(C) kevlar\n(D) leather\n"
             "Answer with the option's letter from the given choices directly."},
    {"image": "direct_attributes/sa_17.jpg", "category": "direct_attributes", "question_id": 1, "label": "C",
     "text": "What is the color of the umbrella?\n(A) red\n(B) blue\n(C) green\n(D) yellow\n"
             "Answer with the option's letter from the given choices directly."},
    {"image": "relative_position/sa_9.jpg", "category": "relative_position", "question_id": 2, "label": "B",
     "text": "Is the dog on the left or right side of the cat?\n(A) left\n(B) right\n"
             "Answer with the option's letter from the given choices directly."},
]
VSTAR_COLORS = [(200, 10, 10), (10, 200, 10), (10, 10, 200)]


def write_vstar(root: str) -> str:
    """craigwu/vstar_bench: test_questions.jsonl beside the direct_attributes/ and relative_position/ folders."""
    folder = os.path.join(root, "vstar_bench")
    for row, color in zip(VSTAR_ROWS, VSTAR_COLORS):
        write_image(os.path.join(folder, row["image"]), color)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "test_questions.jsonl"), "w") as file:
        file.writelines(json.dumps(row) + "\n" for row in VSTAR_ROWS)
    return folder


HRBENCH_COLUMNS = ["index", "question", "answer", "category", "A", "B", "C", "D", "cycle_category", "image"]
HRBENCH_ROWS = [
    {"index": "0", "question": "What is the number on the bus?", "answer": "B", "category": "single",
     "A": "12", "B": "47", "C": "108", "D": "5", "cycle_category": "a"},
    {"index": "1", "question": "Which color is the kite?", "answer": "D", "category": "single",
     "A": "red", "B": "blue", "C": "white", "D": "orange", "cycle_category": "b"},
    {"index": "2", "question": "How many boats are left of the pier?", "answer": "A", "category": "cross",
     "A": "2", "B": "3", "C": "4", "D": "5", "cycle_category": "c"},
]
HRBENCH_COLORS = [(250, 250, 0), (0, 250, 250), (250, 0, 250)]


def write_hrbench(root: str, resolution: str = "4k") -> str:
    """DreamMr/HR-Bench: hr_bench_4k.tsv / hr_bench_8k.tsv, base64 images in the `image` column."""
    folder = os.path.join(root, "HR-Bench")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"hr_bench_{resolution}.tsv")
    with open(path, "w", newline="") as file:
        file.write("\t".join(HRBENCH_COLUMNS) + "\n")
        for row, color in zip(HRBENCH_ROWS, HRBENCH_COLORS):
            values = {**row, "image": base64.b64encode(image_bytes(color, (64, 48), "JPEG")).decode()}
            file.write("\t".join(values[c] for c in HRBENCH_COLUMNS) + "\n")
    return path


VISUALPROBE_ROWS = [
    {"images": ["VisualProbe_Hard/data/0001.jpg"], "problem": "What is written on the red sign?",
     "solution": "STOP"},
    {"images": ["data/0002.jpg"], "problem": "<image>\nWhat animal is on the roof?",
     "solution": "<answer>cat</answer>"},
]


def write_visualprobe(root: str) -> str:
    """Mini-o3/VisualProbe_Hard: val.json and the data/ image folder (paths in both of the layouts seen)."""
    folder = os.path.join(root, "VisualProbe_Hard")
    write_image(os.path.join(folder, "data", "0001.jpg"), (1, 2, 3))
    write_image(os.path.join(folder, "data", "0002.jpg"), (4, 5, 6))
    with open(os.path.join(folder, "val.json"), "w") as file:
        json.dump(VISUALPROBE_ROWS, file)
    return folder


def write_mathvision_jsonl(root: str) -> str:
    """mathllm/MATH-V on GitHub: data/testmini.jsonl, images/ at the repository root."""
    folder = os.path.join(root, "MATH-V")
    write_image(os.path.join(folder, "images", "1.jpg"), (9, 9, 9))
    os.makedirs(os.path.join(folder, "data"), exist_ok=True)
    row = {"id": "1", "question": "<image1> How many edges?", "options": [], "image": "images/1.jpg",
           "answer": "12", "solution": "", "level": 2, "subject": "solid geometry"}
    with open(os.path.join(folder, "data", "testmini.jsonl"), "w") as file:
        file.write(json.dumps(row) + "\n")
    return folder


# ------------------------------------------------------------------------------------------------ parquet files


def write_mathvision(root: str) -> str:
    """MathLLMs/MathVision: data/testmini-00000-of-00001-<hash>.parquet."""
    import pyarrow as pa

    schema = pa.schema([("id", pa.string()), ("question", pa.string()), ("options", pa.list_(pa.string())),
                        ("image", pa.string()), ("decoded_image", _image_struct()), ("answer", pa.string()),
                        ("solution", pa.string()), ("level", pa.int64()), ("subject", pa.string())])
    rows = [
        {"id": "3", "question": "<image1>\nWhich shape comes next?", "options": ["circle", "square", "star"],
         "image": "images/3.jpg", "decoded_image": hf_image((30, 60, 90), "3.jpg"), "answer": "B", "solution": "",
         "level": 1, "subject": "logic"},
        {"id": "7", "question": "What is the area of the triangle? <image1>", "options": [], "image": "images/7.jpg",
         "decoded_image": hf_image((90, 60, 30), "7.jpg"), "answer": "\\frac{3}{2}", "solution": "",
         "level": 3, "subject": "metric geometry"},
    ]
    folder = os.path.join(root, "MathVision")
    write_parquet(os.path.join(folder, "data", "testmini-00000-of-00001-f8ff70fcb2f29b1d.parquet"), rows, schema)
    return folder


def write_dynamath(root: str) -> str:
    """DynaMath/DynaMath_Sample: data/sample_variant1-*.parquet."""
    import pyarrow as pa

    schema = pa.schema([("id", pa.string()), ("question", pa.string()), ("image", pa.string()),
                        ("decoded_image", _image_struct()), ("ground_truth", pa.string()),
                        ("answer_type", pa.string()), ("subject", pa.string()), ("knowledge_level", pa.string())])
    base = {"image": "x.png", "subject": "algebra", "knowledge_level": "high school"}
    rows = [
        {**base, "id": "1", "question": "Which is larger? Choices: (A) f (B) g (C) equal",
         "decoded_image": hf_image((1, 1, 1), "1.png"), "ground_truth": "B", "answer_type": "multiple choice"},
        {**base, "id": "2", "question": "What is the slope? Answer with a three-digit float.",
         "decoded_image": hf_image((2, 2, 2), "2.png"), "ground_truth": "0.333", "answer_type": "float"},
        {**base, "id": "3", "question": "Name the quadrant.", "decoded_image": hf_image((3, 3, 3), "3.png"),
         "ground_truth": "second", "answer_type": "text"},
    ]
    folder = os.path.join(root, "DynaMath_Sample")
    write_parquet(os.path.join(folder, "data", "sample_variant1-00000-of-00001.parquet"), rows, schema)
    return folder


def write_mathvr(root: str) -> str:
    """gogoduan/Math-VR-bench: data/test-00000-of-00001.parquet with image1..image8 columns."""
    import pyarrow as pa

    fields = [("id", pa.string()), ("question", pa.string())]
    fields += [(f"image{i}", _image_struct()) for i in range(1, 9)]
    fields += [("category", pa.string()), ("answers", pa.string()), ("number_of_answers", pa.int64()),
               ("total_score", pa.int64()), ("scoring_points", pa.string()), ("scores", pa.string())]
    empty = {f"image{i}": None for i in range(1, 9)}
    rows = [
        {**empty, "id": "0", "question": "Find the maximum of f(x) = -x^2 + 4x.", "category": "text",
         "answers": "4", "number_of_answers": 1, "total_score": 4, "scoring_points": "p1", "scores": "4"},
        {**empty, "id": "1", "question": "In <image2>, the square from <image1> is cut. Find the area.",
         "image1": hf_image((11, 0, 0), "a.png"), "image2": hf_image((0, 22, 0), "b.png"), "category": "multimodal",
         "answers": "68", "number_of_answers": 1, "total_score": 5, "scoring_points": "p1;p2", "scores": "2;3"},
    ]
    folder = os.path.join(root, "Math-VR-bench")
    write_parquet(os.path.join(folder, "data", "test-00000-of-00001.parquet"), rows, pa.schema(fields))
    return folder


def write_hrmmsearch(root: str) -> str:
    """sensenova/HR-MMSearch: data/train-*.parquet."""
    import pyarrow as pa

    schema = pa.schema([("sample_id", pa.string()), ("query", pa.string()), ("query_image", _image_struct()),
                        ("ground_truth", pa.string()), ("difficulty", pa.string()), ("category", pa.string())])
    rows = [{"sample_id": "hr_001", "query": "Who designed the building on the far left?",
             "query_image": hf_image((70, 80, 90), "hr_001.jpg"), "ground_truth": "Frank Gehry",
             "difficulty": "hard", "category": "architecture"}]
    folder = os.path.join(root, "HR-MMSearch")
    write_parquet(os.path.join(folder, "data", "train-00000-of-00001.parquet"), rows, schema)
    return folder


def write_mmsearch(root: str) -> str:
    """CaraJ/MMSearch: end2end.parquet (query_image null for text-only questions)."""
    import pyarrow as pa

    schema = pa.schema([("sample_id", pa.string()), ("query", pa.string()), ("query_image", _image_struct()),
                        ("image_search_result", _image_struct()), ("area", pa.string()), ("subfield", pa.string()),
                        ("timestamp", pa.string()), ("gt_requery", pa.string()), ("gt_answer", pa.string()),
                        ("alternative_gt_answers", pa.string())])
    rows = [
        {"sample_id": "0", "query": "Which team won the final shown in the photo?",
         "query_image": hf_image((5, 50, 5), "q0.png"), "image_search_result": hf_image((0, 0, 0), "r0.png"),
         "area": "sports", "subfield": "football", "timestamp": "2024-07", "gt_requery": "final winner",
         "gt_answer": "Spain", "alternative_gt_answers": json.dumps(["Spain national team", "La Roja"])},
        {"sample_id": "1", "query": "When was the latest version of the app released?", "query_image": None,
         "image_search_result": None, "area": "tech", "subfield": "software", "timestamp": "2024-08",
         "gt_requery": "release date", "gt_answer": "August 2, 2024", "alternative_gt_answers": ""},
    ]
    folder = os.path.join(root, "MMSearch")
    return write_parquet(os.path.join(folder, "end2end.parquet"), rows, schema)
