"""What a workdir's checkpoints may be resumed with (`check_resume_settings`), without a model: settings that
change what the run computes are refused in one line, those that change only where and how it runs are not."""

import json
import os
import signal
import time

import ml_collections
import pytest

from axpo_jax.modes import ModeError
from axpo_jax.train.checkpoints import StopRequest, check_resume_settings


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
                                  mesh=dict(data=2, fsdp=-1), max_consecutive_skipped_updates=3), workdir, resuming,
                          primary=False)
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


def _wait_for(condition) -> None:
    deadline = time.monotonic() + 5
    while not condition() and time.monotonic() < deadline:  # a handler runs between bytecodes of the main thread
        time.sleep(0.01)


def test_a_stop_request_hands_the_signals_back():
    """The first signal asks the loop to stop; a second goes to the handler from before the run (Ctrl-C again
    interrupts a step that hangs), and the run's end puts the handlers back (Ctrl-C works after it)."""
    seen = []

    def before(signum, frame):
        seen.append(signum)

    signals = (signal.SIGINT, signal.SIGTERM)
    originals = {sig: signal.signal(sig, before) for sig in signals}
    try:
        with StopRequest() as stop:
            stop.install()
            assert all(signal.getsignal(sig) == stop._handle for sig in signals)
            os.kill(os.getpid(), signal.SIGTERM)
            _wait_for(lambda: bool(stop))
            assert stop and stop.describe() == "SIGTERM" and seen == []
            os.kill(os.getpid(), signal.SIGINT)
            _wait_for(lambda: seen)
            assert seen == [signal.SIGINT]
        assert all(signal.getsignal(sig) is before for sig in signals)
        with StopRequest() as stop:  # a run that ends without a signal
            stop.install()
        assert all(signal.getsignal(sig) is before for sig in signals) and not stop
    finally:
        for sig, handler in originals.items():
            signal.signal(sig, handler)


def _as_process(monkeypatch, index: int, others_view: dict, token: str = "a-token"):
    """This process as process `index` of 2; the other one's side of every exchange is given."""
    import jax

    from axpo_jax.parallel import distributed

    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(distributed, "is_primary", lambda: index == 0)
    monkeypatch.setattr(distributed, "sync", lambda name: None)
    exchanges = []

    def allgather_json(mine):
        exchanges.append(mine)
        if len(exchanges) == 1:  # the token: process 0's
            return [mine, token] if index == 0 else [token, mine]
        return [mine, others_view] if index == 0 else [others_view, mine]

    monkeypatch.setattr(distributed, "allgather_json", allgather_json)
    return exchanges


def test_a_workdir_the_hosts_do_not_share_is_refused(tmp_path, monkeypatch):
    """Each host's own disk under the same path: orbax's first save hung 10 minutes, then crashed. Process 0 writes
    a token file; a process that cannot read it back fails, and so do all the others (the verdict is gathered)."""
    from axpo_jax.train.checkpoints import check_shared_workdir

    own_disk = tmp_path / "host1"
    own_disk.mkdir()
    _as_process(monkeypatch, 1, {"seen": True, "write_error": None})
    with pytest.raises(ModeError, match=rf"^workdir {own_disk} is not shared between hosts \(processes \[1\] do not "
                                        r"see the file process 0 wrote there\): use a gs:// bucket or a shared"):
        check_shared_workdir(str(own_disk))
    monkeypatch.undo()
    # process 0 of a shared folder: writes, reads back, and leaves nothing behind
    shared = tmp_path / "shared"
    shared.mkdir()
    exchanges = _as_process(monkeypatch, 0, {"seen": True, "write_error": None})
    check_shared_workdir(str(shared))
    assert exchanges[1] == {"seen": True, "write_error": None} and os.listdir(shared) == []
    monkeypatch.undo()
    # ... and process 0 when another process does not see it
    _as_process(monkeypatch, 0, {"seen": False, "write_error": None})
    with pytest.raises(ModeError, match=r"processes \[1\] do not see"):
        check_shared_workdir(str(shared))
    assert os.listdir(shared) == []
