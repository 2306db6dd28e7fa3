"""Checkpoints with orbax: asynchronous, atomic (orbax commits a step only when all of it is written), the last N
kept, and everything a run needs to resume exactly: parameters, optimizer state, step, RNG key and the data
iterator's state. SIGTERM (a TPU preemption notice) asks the loop to save and stop at the next step boundary.
"""

from __future__ import annotations

import os
import signal
import threading

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx


class Checkpointer:
    def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save),
        )

    @staticmethod
    def _state(model, optimizer) -> dict:
        return {"model": nnx.to_pure_dict(nnx.state(model, nnx.Param)),
                "optimizer": nnx.to_pure_dict(nnx.state(optimizer))}

    def save(self, step: int, model, optimizer, *, rng=None, extra: dict | None = None, force: bool = False):
        """Starts writing step `step` (returns before it is on disk when async); `extra` must be JSON."""
        meta = dict(extra or {})
        if rng is not None:
            meta["rng"] = np.asarray(jax.random.key_data(rng)).tolist()
        self.manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(self._state(model, optimizer)),
                                    meta=ocp.args.JsonSave(meta)),
            force=force,
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def restore(self, model, optimizer, step: int | None = None):
        """Loads a step (default: the latest) into `model` and `optimizer` in place; returns (step, rng, extra)
        or None when there is no checkpoint."""
        step = self.manager.latest_step() if step is None else step
        if step is None:
            return None
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, self._state(model, optimizer))
        restored = self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore())
        )
        model_state = nnx.state(model, nnx.Param)
        nnx.replace_by_pure_dict(model_state, restored["state"]["model"])
        nnx.update(model, model_state)
        optimizer_state = nnx.state(optimizer)
        nnx.replace_by_pure_dict(optimizer_state, restored["state"]["optimizer"])
        nnx.update(optimizer, optimizer_state)
        meta = dict(restored["meta"])
        rng = meta.pop("rng", None)
        if rng is not None:
            rng = jax.random.wrap_key_data(np.asarray(rng, np.uint32))
        return step, rng, meta

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


class StopRequest:
    """Set by SIGTERM / SIGINT; the training loop checks it between steps, saves and exits cleanly."""

    def __init__(self):
        self._event = threading.Event()
        self.signal_name = None

    def install(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signal_name = signal.Signals(signum).name
        self._event.set()

    def __bool__(self) -> bool:
        return self._event.is_set()
