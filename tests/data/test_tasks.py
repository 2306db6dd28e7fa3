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
        f.write(json.dumps({"question": "q", "images": "tasks_images/0.png", "answer": "1"}) + "\n")  # not a list
    source = TaskFileSource(path)
    assert len(source) == 4 and source.skipped == 11
    assert any("images must be a list of paths" in r for r in source.skip_reasons)
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


@pytest.mark.parametrize("options", [
    {"noise": False, "grid": 2},  # "False" read back as a string was truthy: noisy images in RL, clean in SFT
    {"kind": "mark", "grid": 2, "colours": ("green", "blue")},  # a tuple's commas broke the key=value pairs
])
def test_task_options_survive_the_spec(options):
    """The demo makes its SFT data from the options and its RL and eval tasks from their spec: the same images."""
    from axpo_jax.data.synthetic import make_synthetic_task, task_seed

    source = task_source(synthetic_spec(2, options), seed=3)
    made = make_synthetic_task(task_seed(3, 0), **options)
    assert np.array_equal(np.asarray(source[0].images[0]), np.asarray(made.images[0]))
    assert task_source("synthetic:2:grid=2,noise=false").task_options == {"grid": 2, "noise": False}


def test_a_record_one_host_drops_is_caught_before_it_shuffles_differently(tmp_path, monkeypatch):
    """A transient image read error on one host drops a record there only: its source is shorter, shuffles
    differently and every batch mixes other questions. The sources' counts and fingerprints are compared across
    processes (faked here: this process is process 1, beside a process 0 that read every record)."""
    import jax

    from axpo_jax.data import tasks as tasks_module
    from axpo_jax.data.tasks import check_same_records
    from axpo_jax.eval.runner import items_from_tasks
    from axpo_jax.parallel import distributed

    path = tmp_path / "tasks.jsonl"
    write_task_jsonl(path, [Task(f"q{i}", [_image(i)], str(i), f"t{i}") for i in range(4)])
    whole = TaskFileSource(path)
    real, failed = tasks_module.load_image, []

    def flaky(image_path):
        if "000002_0" in image_path and not failed:
            failed.append(image_path)
            raise OSError(5, "Input/output error")
        return real(image_path)

    monkeypatch.setattr(tasks_module, "load_image", flaky)
    short = TaskFileSource(path)
    assert len(short) == 3 and short.fingerprint != whole.fingerprint
    assert TaskFileSource(path).fingerprint == whole.fingerprint  # the same records, the same fingerprint

    check_same_records("tasks", short)  # one process: nothing to compare
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(distributed, "allgather_json", lambda mine: [[len(whole), whole.fingerprint, 0], mine])
    with pytest.raises(DataFileError, match=rf"^tasks {path} differs between processes \[1\] and process 0 "
                                            r"\(process 0 holds 4 records, 0 lines skipped; process 1 holds 3 "
                                            r"records, 1 lines skipped; .*every process must read the same"):
        check_same_records(f"tasks {path}", short)
    check_same_records("tasks", whole)
    # evaluation questions (lists of items) and synthetic sources are compared the same way
    items = items_from_tasks("heldout", [whole[i] for i in range(len(whole))], "exact")
    other = items_from_tasks("heldout", [whole[i] for i in (0, 1, 3, 2)], "exact")
    monkeypatch.setattr(distributed, "allgather_json", lambda mine: [[4, tasks_module.records_fingerprint(items),
                                                                      None], mine])
    check_same_records("heldout", items)
    with pytest.raises(DataFileError, match=r"^heldout differs between processes \[1\] and process 0 \(process 0 "
                                            r"holds 4 records; process 1 holds 4 records; equal counts"):
        check_same_records("heldout", other)
    assert task_source("synthetic:4", seed=1).fingerprint == task_source("synthetic:4", seed=1).fingerprint
    assert task_source("synthetic:4", seed=1).fingerprint != task_source("synthetic:4", seed=2).fingerprint


def test_a_record_read_mid_run_is_tried_again_after_a_transient_error(tmp_path, monkeypatch):
    """Mid-run reads (TaskFileSource, SFTSource) try an OSError again (a network filesystem's hiccup) before
    failing: one failure is read through; a file that stays unreadable raises (tasks) or is skipped (SFT) after
    three tries; other errors are not retried."""
    from axpo_jax.data import synthetic
    from axpo_jax.data import tasks as tasks_module
    from axpo_jax.data.tasks import read_retrying

    calls = []

    def fails(times, error):
        def read():
            calls.append(1)
            if len(calls) <= times:
                raise error
            return "read"
        return read

    assert read_retrying(fails(1, OSError(5, "EIO")), wait_s=0) == "read" and len(calls) == 2
    calls.clear()
    with pytest.raises(OSError):
        read_retrying(fails(5, OSError(5, "EIO")), wait_s=0)
    assert len(calls) == 3
    calls.clear()
    with pytest.raises(ValueError):
        read_retrying(fails(1, ValueError("bad")), wait_s=0)
    assert len(calls) == 1
    calls.clear()
    from PIL import UnidentifiedImageError
    with pytest.raises(UnidentifiedImageError):  # a corrupt image is bad data, not a hiccup: not read again
        read_retrying(fails(1, UnidentifiedImageError("cannot identify image file")), wait_s=0)
    assert len(calls) == 1

    path = tmp_path / "tasks.jsonl"
    write_task_jsonl(path, [Task(f"q{i}", [_image(i)], str(i), f"t{i}") for i in range(2)])
    source = TaskFileSource(path)
    real, failures = tasks_module.load_image, []

    def flaky(image_path, times):
        if len(failures) < times:
            failures.append(image_path)
            raise OSError(5, "Input/output error")
        return real(image_path)

    monkeypatch.setattr(tasks_module.time, "sleep", lambda s: None)
    monkeypatch.setattr(tasks_module, "load_image", lambda p: flaky(p, 1))
    assert source[1].question == "q1" and len(failures) == 1
    failures.clear()
    monkeypatch.setattr(tasks_module, "load_image", lambda p: flaky(p, 3))
    with pytest.raises(OSError):
        source[1]

    conversations = tmp_path / "sft.jsonl"
    _image(0).save(tmp_path / "a.png")
    conversations.write_text(json.dumps({"messages": [
        {"role": "user", "content": [{"type": "image", "image": "a.png"}, {"type": "text", "text": "colour?"}]},
        {"role": "assistant", "content": "red"}]}) + "\n")
    sft = synthetic.SFTSource(conversations)
    failures.clear()
    monkeypatch.setattr(synthetic, "load_image", lambda p: flaky(p, 2))
    assert sft[0] is not None and sft.skipped == 0  # read on the third try
    failures.clear()
    monkeypatch.setattr(synthetic, "load_image", lambda p: flaky(p, 3))
    assert sft[0] is None and sft.skipped == 1
