"""Each benchmark reader on a tiny copy of its published files: question text and options, images decoded (by
colour, so each question got its own image), reference answers and scorer; and one-line errors that name the
file (and row) for a missing file, a malformed row or a truncated image."""

import base64
import json
import os

import pytest

from axpo_jax.eval.benchmarks import BENCHMARKS, BenchmarkDataError, load_benchmark
from axpo_jax.eval.benchmarks.dynamath import read_dynamath
from axpo_jax.eval.benchmarks.hrbench import read_hrbench4k, read_hrbench8k
from axpo_jax.eval.benchmarks.hrmmsearch import read_hrmmsearch
from axpo_jax.eval.benchmarks.mathvision import read_mathvision
from axpo_jax.eval.benchmarks.mathvr import read_mathvr
from axpo_jax.eval.benchmarks.mmsearch import read_mmsearch
from axpo_jax.eval.benchmarks.visualprobe import read_visualprobe
from axpo_jax.eval.benchmarks.vstar import read_vstar
from axpo_jax.eval.scoring import is_correct
from tests.config_files import config_module
from tests.eval import published_files as pf


def _pixel(item, image=0):
    return item.task().images[image].getpixel((3, 3))


def _close(a, b, tolerance=6):  # JPEG moves colours a little
    return all(abs(x - y) <= tolerance for x, y in zip(a, b))


def test_config_lists_every_benchmark():

    module = config_module("eval")
    assert tuple(module.BENCHMARKS) == tuple(BENCHMARKS)
    assert module.get_config().benchmarks.split(",") == list(BENCHMARKS)


# -------------------------------------------------------------------------------------------------------- V*


def test_vstar(tmp_path):
    folder = pf.write_vstar(str(tmp_path))
    items = read_vstar(folder)
    assert [i.item_id for i in items] == ["0", "1", "2"]
    assert [i.task_id for i in items] == ["vstar/0", "vstar/1", "vstar/2"]
    assert items[0].question == pf.VSTAR_ROWS[0]["text"]  # as published, options and instruction included
    assert items[0].references == ["A", "rubber"] and items[1].references == ["C", "green"]
    assert items[2].references == ["B", "right"] and {i.kind for i in items} == {"choice"}
    assert [i.metadata["category"] for i in items] == ["direct_attributes", "direct_attributes", "relative_position"]
    for item, color in zip(items, pf.VSTAR_COLORS):
        assert _close(_pixel(item), color)
    task = items[1].task("Think, then answer.")
    assert task.question.endswith("directly.\nThink, then answer.") and task.answer == "C"


def test_vstar_errors(tmp_path):
    with pytest.raises(BenchmarkDataError, match="vstar_bench.*does not exist"):
        read_vstar(str(tmp_path / "vstar_bench"))
    folder = pf.write_vstar(str(tmp_path))
    os.remove(os.path.join(folder, "relative_position", "sa_9.jpg"))
    with pytest.raises(BenchmarkDataError,
                       match=r"test_questions.jsonl:3: image 'relative_position/sa_9.jpg' not found"):
        read_vstar(folder)
    with open(os.path.join(folder, "test_questions.jsonl"), "w") as file:
        file.write(json.dumps({**pf.VSTAR_ROWS[0], "label": "E"}) + "\n")
    with pytest.raises(BenchmarkDataError, match=r"test_questions.jsonl:1: answer 'E' is not one of"):
        read_vstar(folder)
    with open(os.path.join(folder, "test_questions.jsonl"), "w") as file:
        file.write('{"image": "x.jpg", "text": \n')
    with pytest.raises(BenchmarkDataError, match=r"test_questions.jsonl:1: not valid JSON"):
        read_vstar(folder)


def test_truncated_images_stop_the_run_before_it_starts(tmp_path):
    """A header that parses with the data cut short passes the readers; loading decodes the questions a run will
    ask, so the run stops before the model loads, naming the file and row, not in the middle of the run."""
    folder = pf.write_vstar(str(tmp_path))
    path = os.path.join(folder, "relative_position", "sa_9.jpg")  # question 2's image
    data = pf.image_bytes((10, 10, 200), (400, 300), "JPEG")
    open(path, "wb").write(data[: len(data) // 2])
    items = read_vstar(folder)
    assert len(items) == 3  # the header is fine
    assert len(load_benchmark("vstar", "", folder, max_questions=2)[1]) == 2  # only the asked questions are decoded
    with pytest.raises(BenchmarkDataError, match=rf"test_questions.jsonl:3: {path} \(question vstar/2\) cannot be "
                                                 r"decoded \(image file is truncated"):
        load_benchmark("vstar", "", folder)
    with pytest.raises(BenchmarkDataError, match=rf"vstar/2: cannot decode .*test_questions.jsonl:3: {path}"):
        items[2].task()  # decoding a batch: the question and file are named too

    tsv = pf.write_hrbench(str(tmp_path), "4k")
    lines = open(tsv).read().splitlines()
    cells = lines[2].split("\t")
    cells[-1] = base64.b64encode(pf.image_bytes((1, 2, 3), (300, 300))[:200]).decode()  # a PNG cut at 200 bytes
    lines[2] = "\t".join(cells)
    open(tsv, "w").write("\n".join(lines) + "\n")
    with pytest.raises(BenchmarkDataError, match=r"hr_bench_4k.tsv:3 column 'image': the embedded image \(question "
                                                 r"hrbench4k/1\) cannot be decoded"):
        load_benchmark("hrbench4k", "", tsv)


# ---------------------------------------------------------------------------------------------------- HR-Bench


def test_hrbench(tmp_path):
    path = pf.write_hrbench(str(tmp_path), "4k")
    items = read_hrbench4k(os.path.dirname(path))  # the folder: finds hr_bench_4k.tsv
    assert [i.task_id for i in items] == ["hrbench4k/0", "hrbench4k/1", "hrbench4k/2"]
    assert items[0].question == ("What is the number on the bus?\nOptions:\n(A) 12\n(B) 47\n(C) 108\n(D) 5")
    assert items[0].references == ["B", "47"] and items[1].references == ["D", "orange"]
    assert items[0].kind == "choice" and items[2].metadata["cycle_category"] == "c"
    for item, color in zip(items, pf.HRBENCH_COLORS):
        assert _close(_pixel(item), color, tolerance=12)
    assert item.task().images[0].size == (64, 48)
    pf.write_hrbench(str(tmp_path), "8k")
    assert [i.benchmark for i in read_hrbench8k(os.path.dirname(path))] == ["hrbench8k"] * 3


def test_hrbench_errors(tmp_path):
    with pytest.raises(BenchmarkDataError, match="no file under .* matches hr_bench_8k.tsv"):
        read_hrbench8k(str(tmp_path))
    path = pf.write_hrbench(str(tmp_path), "4k")
    lines = open(path).read().splitlines()
    cells = lines[2].split("\t")
    cells[-1] = base64.b64encode(b"not an image").decode()
    lines[2] = "\t".join(cells)
    open(path, "w").write("\n".join(lines) + "\n")
    with pytest.raises(BenchmarkDataError, match=r"hr_bench_4k.tsv:3 column 'image': cannot decode"):
        read_hrbench4k(path)
    cells = lines[1].split("\t")
    cells[2] = ""  # no answer
    lines[1], lines[2] = "\t".join(cells), lines[3]
    open(path, "w").write("\n".join(lines) + "\n")
    with pytest.raises(BenchmarkDataError, match=r"hr_bench_4k.tsv:2: field 'answer' must be a non-empty"):
        read_hrbench4k(path)


# ------------------------------------------------------------------------------------------------- VisualProbe


def test_visualprobe(tmp_path):
    items = read_visualprobe(pf.write_visualprobe(str(tmp_path)))
    assert [i.question for i in items] == ["What is written on the red sign?", "What animal is on the roof?"]
    assert [i.references for i in items] == [["STOP"], ["cat"]]  # answer tags stripped
    assert {i.kind for i in items} == {"exact"} and all(i.prefers_judge for i in items)
    assert _close(_pixel(items[0]), (1, 2, 3)) and _close(_pixel(items[1]), (4, 5, 6))


def test_visualprobe_errors(tmp_path):
    folder = pf.write_visualprobe(str(tmp_path))
    with open(os.path.join(folder, "val.json"), "w") as file:
        json.dump([{"images": ["data/0001.jpg"], "solution": "x"}], file)
    with pytest.raises(BenchmarkDataError, match=r"val.json\[0\]: missing the question"):
        read_visualprobe(folder)
    with open(os.path.join(folder, "val.json"), "w") as file:
        json.dump({"not": "a list"}, file)
    with pytest.raises(BenchmarkDataError, match=r"val.json: expected a JSON list"):
        read_visualprobe(folder)


# -------------------------------------------------------------------------------------------------- MathVision


def test_mathvision_github_jsonl(tmp_path):
    items = read_mathvision(pf.write_mathvision_jsonl(str(tmp_path)))
    assert len(items) == 1 and items[0].question == "How many edges?"
    assert items[0].references == ["12"] and items[0].kind == "math" and _close(_pixel(items[0]), (9, 9, 9))


def test_mathvision_parquet(tmp_path):
    pytest.importorskip("pyarrow")
    items = read_mathvision(pf.write_mathvision(str(tmp_path)))
    choice, open_ended = items
    assert choice.question == "Which shape comes next?\nOptions:\n(A) circle\n(B) square\n(C) star"
    assert choice.references == ["B", "square"] and choice.kind == "choice"
    assert open_ended.question == "What is the area of the triangle?"
    assert open_ended.references == ["\\frac{3}{2}"] and open_ended.kind == "math"
    assert _pixel(choice) == (30, 60, 90) and _pixel(open_ended) == (90, 60, 30)
    assert choice.metadata == {"subject": "logic", "level": 1}


def test_mathvision_errors(tmp_path):
    pytest.importorskip("pyarrow")
    folder = pf.write_mathvision(str(tmp_path))
    path = os.path.join(folder, "data", "testmini-00000-of-00001-f8ff70fcb2f29b1d.parquet")
    pf.write_parquet(path, [{"id": "1", "question": "q", "options": ["a", "b"], "answer": "C",
                             "decoded_image": pf.hf_image((0, 0, 0), "x.png")}])
    with pytest.raises(BenchmarkDataError, match=r"testmini-.*parquet row 0: answer 'C' is not one of the option"):
        read_mathvision(folder)
    open(path, "wb").write(b"PAR1 truncated")
    with pytest.raises(BenchmarkDataError, match=r"cannot read parquet file .*testmini-"):
        read_mathvision(folder)


# ---------------------------------------------------------------------------------------------------- DynaMath


def test_dynamath(tmp_path):
    pytest.importorskip("pyarrow")
    choice, floating, text = read_dynamath(pf.write_dynamath(str(tmp_path)))
    assert choice.question == "Which is larger? Choices: (A) f (B) g (C) equal"  # choices live in the question
    assert (choice.kind, choice.references) == ("choice", ["B"])
    assert (floating.kind, floating.references) == ("numeric", ["0.333"])
    assert floating.reward_config.abs_tol == 1e-3  # the authors' float tolerance
    assert (text.kind, text.references) == ("exact", ["second"])
    assert _pixel(text) == (3, 3, 3)


def test_dynamath_errors(tmp_path):
    pytest.importorskip("pyarrow")
    folder = pf.write_dynamath(str(tmp_path))
    with pytest.raises(BenchmarkDataError, match=r"DynaMath \(variant 2\): no file under"):
        read_dynamath(folder, variant=2)
    path = os.path.join(folder, "data", "sample_variant1-00000-of-00001.parquet")
    pf.write_parquet(path, [{"id": "1", "question": "q", "decoded_image": pf.hf_image((0, 0, 0), "x.png"),
                             "ground_truth": "3", "answer_type": "integer"}])
    with pytest.raises(BenchmarkDataError, match=r"row 0: unknown answer_type 'integer'"):
        read_dynamath(folder)


# ----------------------------------------------------------------------------------------------------- Math-VR


def test_mathvr(tmp_path):
    pytest.importorskip("pyarrow")
    text_only, multimodal = read_mathvr(pf.write_mathvr(str(tmp_path)))
    assert text_only.image_sources == [] and text_only.references == ["4"]
    assert multimodal.question == "In , the square from  is cut. Find the area."
    # images in order of first mention: <image2> before <image1>
    assert _pixel(multimodal, 0) == (0, 22, 0) and _pixel(multimodal, 1) == (11, 0, 0)
    assert multimodal.kind == "math" and multimodal.prefers_judge and multimodal.metadata["category"] == "multimodal"


def test_mathvr_errors(tmp_path):
    pytest.importorskip("pyarrow")
    folder = pf.write_mathvr(str(tmp_path))
    pf.write_parquet(os.path.join(folder, "data", "test-00000-of-00001.parquet"),
                     [{"id": "5", "question": "See <image1>.", "image1": None, "answers": "1"}])
    with pytest.raises(BenchmarkDataError, match=r"row 0: the question shows <image1> but field 'image1' is empty"):
        read_mathvr(folder)
    pf.write_parquet(os.path.join(folder, "data", "test-00000-of-00001.parquet"),
                     [{"id": "6", "question": "Find x and y.", "answers": ["3", None, "4"]}])
    assert read_mathvr(folder)[0].references == ["3; 4"]  # a null sub-answer is none, not "None"


# ------------------------------------------------------------------------------------------ search benchmarks


def test_hrmmsearch(tmp_path):
    pytest.importorskip("pyarrow")
    (item,) = read_hrmmsearch(pf.write_hrmmsearch(str(tmp_path)))
    assert (item.task_id, item.references, item.kind, item.prefers_judge) == (
        "hrmmsearch/hr_001", ["Frank Gehry"], "f1", True)
    assert _pixel(item) == (70, 80, 90) and BENCHMARKS["hrmmsearch"].needs_search


def test_mmsearch(tmp_path):
    pytest.importorskip("pyarrow")
    with_image, text_only = read_mmsearch(pf.write_mmsearch(str(tmp_path)))
    assert with_image.references == ["Spain", "Spain national team", "La Roja"] and with_image.kind == "f1"
    assert _pixel(with_image) == (5, 50, 5)
    assert text_only.image_sources == [] and text_only.references == ["August 2, 2024"]
    assert text_only.task().images == []


def test_search_benchmark_errors(tmp_path):
    pytest.importorskip("pyarrow")
    path = pf.write_mmsearch(str(tmp_path))
    pf.write_parquet(path, [{"sample_id": "0", "query": "q", "gt_answer": "x", "alternative_gt_answers": "[broken"}])
    with pytest.raises(BenchmarkDataError,
                       match=r"end2end.parquet row 0: field 'alternative_gt_answers' is not a list"):
        read_mmsearch(path)
    pf.write_parquet(path, [{"sample_id": "0", "query": "q", "gt_answer": "Spain",
                             "alternative_gt_answers": json.dumps(["La Roja", None, ""])}])
    (item,) = read_mmsearch(path)
    assert item.references == ["Spain", "La Roja"] and not is_correct(item, "None")  # null is no answer
    folder = pf.write_hrmmsearch(str(tmp_path))
    pf.write_parquet(os.path.join(folder, "data", "train-00000-of-00001.parquet"),
                     [{"sample_id": "1", "query": "q", "ground_truth": "x"}])
    with pytest.raises(BenchmarkDataError, match=r"row 0: missing field 'query_image'"):
        read_hrmmsearch(folder)
