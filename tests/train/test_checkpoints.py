"""What a workdir's checkpoints may be resumed with (`check_resume_settings`), without a model: settings that
change what the run computes are refused in one line, those that change only where and how it runs are not."""

import json
import os

import ml_collections
import pytest

from axpo_jax.modes import ModeError
from axpo_jax.train.checkpoints import check_resume_settings


class _Checkpoints:
    def __init__(self, step):
        self.step = step

    def latest_step(self):
        return self.step


def _config(**overrides):
    config = ml_collections.ConfigDict(dict(checkpoint="/ckpt", data="a.jsonl", learning_rate=1e-3, steps=10,
                                            tools=("image_zoom_in",), micro_batch_size=4, checkpoint_every=5,
                                            workdir="runs/x", eval_every=2, mesh=dict(data=1, fsdp=-1)))
    config.update(overrides)
    return config


def test_resume_settings(tmp_path):
    workdir = str(tmp_path)
    check_resume_settings(_config(), workdir, _Checkpoints(None), primary=True)  # a fresh run records its settings
    recorded = json.load(open(os.path.join(workdir, "run_config.json")))
    assert recorded["learning_rate"] == 1e-3 and "micro_batch_size" not in recorded and "eval_every" not in recorded
    # no checkpoint yet (a run that failed before its first save): the settings may change and are recorded again
    check_resume_settings(_config(steps=20), workdir, _Checkpoints(None), primary=True)
    assert json.load(open(os.path.join(workdir, "run_config.json")))["steps"] == 20

    resuming = _Checkpoints(5)
    check_resume_settings(_config(steps=20), workdir, resuming, primary=False)  # the same settings (tuples too)
    check_resume_settings(_config(steps=20, micro_batch_size=2, checkpoint_every=1, eval_every=0,
                                  mesh=dict(data=2, fsdp=-1)), workdir, resuming, primary=False)
    for changed, match in ((dict(data="b.jsonl"), r"data: 'a.jsonl' -> 'b.jsonl'"),
                           (dict(learning_rate=1e-4, steps=30), r"learning_rate: 0.001 -> 0.0001; steps: 20 -> 30"),
                           (dict(tools=("python",)), r"tools: \['image_zoom_in'\] -> \['python'\]")):
        with pytest.raises(ModeError, match=rf"holds checkpoints of a run with other settings \({match}\); use a "
                                            r"new --config.workdir"):
            check_resume_settings(_config(**{"steps": 20, **changed}), workdir, resuming, primary=True)
    (tmp_path / "run_config.json").write_text('{"steps": 2')  # cut short
    with pytest.raises(ModeError, match=r"run_config.json is unreadable .*restore it, or delete it"):
        check_resume_settings(_config(), workdir, resuming, primary=True)


def test_a_failing_loop_lets_the_save_in_flight_land(tmp_path, monkeypatch):
    from axpo_jax.train.checkpoints import Checkpointer

    checkpointer = Checkpointer(str(tmp_path / "checkpoints"))
    waited = []
    monkeypatch.setattr(checkpointer, "wait", lambda: waited.append(True))
    with checkpointer.landing_saves_on_failure():
        pass
    assert waited == []  # a loop that ends closes its checkpointer itself
    with pytest.raises(RuntimeError, match="a step failed"):
        with checkpointer.landing_saves_on_failure():
            raise RuntimeError("a step failed")
    assert waited == [True]
