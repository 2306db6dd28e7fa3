"""The metrics log: JSONL + TensorBoard, and a resumed run drops what the interrupted one wrote after its
checkpoint, in both."""

import glob
import json
import math
import os
import struct

import pytest
from tensorboardX.proto import event_pb2

from axpo_jax.train.metrics import MetricsLog


def tensorboard_scalars(folder: str) -> dict[str, dict[int, float]]:
    """tag -> {step: value} of every scalar in the folder's event files (TFRecord framing, later files win)."""
    scalars: dict[str, dict[int, float]] = {}
    for path in sorted(glob.glob(os.path.join(folder, "events.out.tfevents.*"))):
        with open(path, "rb") as f:
            data = f.read()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset: offset + 8])
            event = event_pb2.Event.FromString(data[offset + 12: offset + 12 + length])
            offset += 12 + length + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, {})[event.step] = value.simple_value
    return scalars


def test_metrics_jsonl_and_tensorboard_resume(tmp_path):
    log = MetricsLog(str(tmp_path), name="rl_metrics")
    for step in (1, 2, 3):
        log.write(step, {"reward": step / 10, "loss": float("nan") if step == 2 else 1.0 / step, "algo": "axpo",
                         "done": True})
    log.close()
    lines = [json.loads(line) for line in open(tmp_path / "rl_metrics.jsonl")]
    assert [r["step"] for r in lines] == [1, 2, 3] and lines[0]["algo"] == "axpo"
    board = tensorboard_scalars(str(tmp_path / "tensorboard" / "rl_metrics"))
    assert sorted(board["reward"]) == [1, 2, 3]
    assert all(math.isclose(board["reward"][s], s / 10, rel_tol=1e-6) for s in (1, 2, 3))
    assert set(board["loss"]) == {1, 3}  # non-finite values stay in the JSONL only
    assert "done" not in board and "algo" not in board

    # the run was checkpointed at step 2 and killed after writing step 3: a resume rewrites step 3
    resumed = MetricsLog(str(tmp_path), name="rl_metrics", resume_step=2)
    assert [r["step"] for r in resumed.records] == [1, 2]
    resumed.write(3, {"reward": 0.9, "loss": 0.5})
    resumed.close()
    lines = [json.loads(line) for line in open(tmp_path / "rl_metrics.jsonl")]
    assert [(r["step"], r["reward"]) for r in lines] == [(1, 0.1), (2, 0.2), (3, 0.9)]
    board = tensorboard_scalars(str(tmp_path / "tensorboard" / "rl_metrics"))
    assert math.isclose(board["reward"][3], 0.9, rel_tol=1e-6)


def test_a_last_line_cut_by_a_kill_is_dropped_and_other_damage_named(tmp_path):
    log = MetricsLog(str(tmp_path), name="m", tensorboard=False)
    for step in (1, 2, 3):
        log.write(step, {"reward": step / 10, "note": "π"})
    log.close()
    path = tmp_path / "m.jsonl"
    whole = path.read_bytes()
    path.write_bytes(whole + '{"step": 4, "note": "π'.encode()[:-1])  # killed inside a character of step 4
    resumed = MetricsLog(str(tmp_path), name="m", resume_step=3, tensorboard=False)
    assert [r["step"] for r in resumed.records] == [1, 2, 3]
    resumed.close()
    lines = whole.split(b"\n")
    path.write_bytes(b"\n".join([lines[0], b"{oops", *lines[1:]]))
    with pytest.raises(ValueError, match=r"m.jsonl:2 is not a metrics record"):
        MetricsLog(str(tmp_path), name="m", resume_step=3, tensorboard=False)


def test_only_the_primary_process_writes(tmp_path):
    log = MetricsLog(str(tmp_path / "w"), primary=False)
    log.write(1, {"reward": 1.0})
    assert log.records[0]["reward"] == 1.0 and not os.path.exists(tmp_path / "w")
