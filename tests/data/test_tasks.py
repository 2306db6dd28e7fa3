"""RL question files: read back what was written, skip and count bad lines and images, clear errors."""

import json

import numpy as np
import pytest
from PIL import Image

from axpo_jax.data.tasks import DataFileError, TaskFileSource, synthetic_spec, task_source, write_task_jsonl
from axpo_jax.rollout.agent_loop import Task


def _image(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (20, 30, 3), dtype=np.uint8))


def test_round_trip_and_bad_records_are_skipped(tmp_path):
    path = tmp_path / "tasks.jsonl"
    write_task_jsonl(path, [Task("What digit?", [_image(0)], "7", "a"), Task("Sum?", [], ["4", "four"], "b")])
    with open(path, "a") as f:
        f.write("{not json\n")
        f.write(json.dumps({"question": "q", "images": ["tasks_images/missing.png"], "answer": "1"}) + "\n")
        f.write(json.dumps({"question": "no answer"}) + "\n")
        (tmp_path / "tasks_images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
        f.write(json.dumps({"question": "q", "images": ["tasks_images/broken.png"], "answer": "1"}) + "\n")
        for answer in ("", " ", [], ["4", ""], True, None):  # nothing a rollout could be rewarded against
            f.write(json.dumps({"question": "q", "answer": answer}) + "\n")
        f.write(json.dumps({"question": "Sum?", "answer": 42}) + "\n")
        f.write(json.dumps({"question": "Half?", "answer": [0.5, "1/2"]}) + "\n")
    source = TaskFileSource(path)
    assert len(source) == 4 and source.skipped == 10
    assert any("JSONDecodeError" in r for r in source.skip_reasons) and any("missing" in r for r in source.skip_reasons)
    assert sum("the answer must be a non-empty string" in r for r in source.skip_reasons) == 6
    assert (source[2].answer, source[3].answer) == ("42", ["0.5", "1/2"])  # numbers are read as their text
    first, second = source[0], source[1]
    assert (first.question, first.answer, first.task_id) == ("What digit?", "7", "a")
    np.testing.assert_array_equal(np.asarray(first.images[0]), np.asarray(_image(0)))
    assert second.images == [] and second.answer == ["4", "four"]


def test_clear_errors_and_the_synthetic_spec(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        TaskFileSource(tmp_path / "nope.jsonl")
    (tmp_path / "bad.jsonl").write_text("{}\n")
    with pytest.raises(DataFileError, match="no usable task"):
        TaskFileSource(tmp_path / "bad.jsonl")
    synthetic = task_source("synthetic:3", seed=5)
    assert len(synthetic) == 3 and synthetic[2].answer == task_source("synthetic:3", seed=5)[2].answer
    assert synthetic[0].grid == 6


def test_synthetic_spec_with_task_options():
    spec = synthetic_spec(4, {"grid": 3})
    assert spec == "synthetic:4:grid=3" and synthetic_spec(4) == "synthetic:4"
    source = task_source(spec, seed=5)
    assert len(source) == 4 and source.task_options == {"grid": 3}
    assert all(task.grid == 3 and 0 <= min(task.cell) and max(task.cell) < 3 for task in source)
    assert task_source("synthetic:2:grid=3, texture_std=10.5", seed=5).task_options == {"grid": 3, "texture_std": 10.5}
    with pytest.raises(ValueError, match="unknown synthetic task options"):
        task_source("synthetic:2:gird=3")
    with pytest.raises(ValueError, match="key=value"):
        task_source("synthetic:2:grid")
