"""Checkpoints with orbax: asynchronous, atomic (orbax commits a step only when all of it is written), the last N
kept, and everything a run needs to resume exactly: parameters, optimizer state, step, RNG key and the data
iterator's state. SIGTERM (a TPU preemption notice) asks the loop to save and stop at the next step boundary.

Multi-host: every process calls `save` / `restore` with the same step (orbax coordinates them: each process
writes and reads its own shards, process 0 the metadata); each process's own data-iterator state is gathered
into the metadata and handed back to the same process index on restore.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import uuid

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from axpo_jax.parallel import distributed

_PER_PROCESS = "per_process"


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

    def save(self, step: int, model, optimizer, *, rng=None, extra: dict | None = None,
             process_extra=None, force: bool = False):
        """Starts writing step `step` (returns before it is on disk when async); `extra` must be JSON.

        Every process calls this with the same step: each writes its shards of the (global) model and optimizer
        arrays, process 0 writes the JSON meta. `process_extra` (JSON) is this process's own state, e.g. its data
        iterator's position over its shard of the data; all processes' values go into the meta, in process order.
        """
        meta = dict(extra or {})
        if rng is not None:
            meta["rng"] = np.asarray(jax.random.key_data(rng)).tolist()
        if process_extra is not None:
            meta[_PER_PROCESS] = distributed.allgather_json(process_extra)
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
        or None when there is no checkpoint. Every process calls it; each reads the shards its devices hold, and
        `extra["process_extra"]` is what this process passed as `process_extra` when saving."""
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
        if _PER_PROCESS in meta:  # this process's own part (saved by `process_extra`)
            per_process = meta.pop(_PER_PROCESS)
            if len(per_process) != jax.process_count():
                raise ValueError(f"step {step} holds per-process state of {len(per_process)} processes, this run "
                                 f"has {jax.process_count()}: resume with the same process count")
            meta["process_extra"] = per_process[jax.process_index()]
        rng = meta.pop("rng", None)
        if rng is not None:
            rng = jax.random.wrap_key_data(np.asarray(rng, np.uint32))
        return step, rng, meta

    def wait(self) -> None:
        self.manager.wait_until_finished()

    @contextlib.contextmanager
    def landing_saves_on_failure(self):
        """Around a training loop: when it raises, the save in flight (a finished step's) is waited for before the
        error goes on, so a rerun resumes from that step rather than the one before."""
        try:
            yield
        except BaseException:
            self.wait()
            raise

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def check_shared_workdir(workdir: str) -> None:
    """Multi-host: refuses (ModeError, one line, on every process alike) a workdir that is not one folder for all
    processes, e.g. each host's own disk under the same path. Orbax's first save would otherwise wait 10 minutes
    for the directories process 0 made to appear on the other hosts, then crash; a resumed run would read
    checkpoints only process 0 has. Call it on every process, after the folder is made and before the model loads.

    Process 0 writes a file named and filled with a token agreed for this run (a stale file of another run cannot
    pass), every process reads it back after a barrier, and the verdict is gathered so no process goes on alone.
    Plain file calls, as the trainer writes its workdir with (a gs:// bucket reaches it as a FUSE mount)."""
    if jax.process_count() == 1:
        return
    from axpo_jax.modes import ModeError

    primary = distributed.is_primary()
    token = distributed.allgather_json(uuid.uuid4().hex if primary else "")[0]
    path = os.path.join(workdir, f".shared-workdir-{token}")
    write_error = None
    if primary:
        try:
            with open(path, "w", encoding="utf-8") as file:
                file.write(token)
                file.flush()
                os.fsync(file.fileno())
        except OSError as error:
            write_error = f"{type(error).__name__}: {error.strerror or error}"
    distributed.sync("shared workdir token written")
    try:
        with open(path, encoding="utf-8") as file:
            seen = file.read() == token
    except OSError:
        seen = False
    views = distributed.allgather_json({"seen": seen, "write_error": write_error})
    if primary:  # every process has read it: the gather above is after every read
        with contextlib.suppress(OSError):
            os.remove(path)
    if views[0]["write_error"]:
        raise ModeError(f"workdir {workdir}: process 0 cannot write there ({views[0]['write_error']})")
    blind = [i for i, view in enumerate(views) if not view["seen"]]
    if blind:
        raise ModeError(f"workdir {workdir} is not shared between hosts (processes {blind} do not see the file "
                        f"process 0 wrote there): use a gs:// bucket or a shared filesystem")


# Config fields a resumed run may change: where and how it runs, not what it computes (micro-batches accumulate
# exactly, remat and the log-prob chunk give the same gradients, the attention implementation the same function to
# rounding; evaluation during RL trains nothing; the skip streak that stops a run changes no update that is made).
RESUMABLE_FIELDS = frozenset({"workdir", "tensorboard", "checkpoint_every", "keep_checkpoints", "micro_batch_size",
                              "mesh", "remat", "logprob_chunk", "attention", "distributed", "device_memory_gib",
                              "tool_timeout_s", "max_consecutive_skipped_updates"})


def check_resume_settings(config, workdir: str, checkpointer: Checkpointer, *, primary: bool) -> None:
    """A workdir's checkpoints go on only with the settings they were made with: a resumed run with another
    starting checkpoint, data file, batch size or learning rate would continue silently from the old weights and
    data position, no longer the run either config describes. Checked before the model loads (one line naming the
    fields that differ); `<workdir>/run_config.json` records the settings while the workdir has no checkpoint."""
    from axpo_jax.modes import check_run_settings

    settings = {key: value for key, value in config.to_dict().items()
                if key not in RESUMABLE_FIELDS and not key.startswith("eval_")}
    check_run_settings(os.path.join(workdir, "run_config.json"), settings, write=primary, holds="checkpoints",
                       option="workdir", compare=checkpointer.latest_step() is not None)


def export_folder(model, processor, output: str) -> None:
    """The transformers folder of `model` (and its processor) at `output`, written once for all processes.

    Every process takes part in gathering the parameters (they are sharded over all hosts' devices), process 0
    alone writes the files (`save_pretrained` skips the writes elsewhere), and no process returns before the
    folder is complete: whatever runs next on any host (rl loading this folder, a script reading the printed
    path) finds it whole."""
    from axpo_jax.models import qwen3_vl

    qwen3_vl.save_pretrained(model, output)
    if distributed.is_primary():
        processor.save_pretrained(output)
    distributed.sync(f"exported {output}")


class StopRequest:
    """Set by SIGTERM / SIGINT; the training loop checks it between steps, saves and exits cleanly.

    As a context manager around a run, it puts back on exit the handlers `install` replaced, so a caller that goes
    on after the run (the demo's evaluation) is interrupted by Ctrl-C again. Only the first signal is a stop request:
    it hands both signals back to the handlers from before, so a second one acts as it would without the run (Ctrl-C
    again raises KeyboardInterrupt in a step that hangs; SIGTERM again ends the process)."""

    def __init__(self):
        self._event = threading.Event()
        self.signal_name = None
        self._previous = {}

    def install(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous.setdefault(sig, signal.signal(sig, self._handle))
        return self

    def restore(self) -> None:
        """Puts back the handlers `install` replaced (idempotent)."""
        previous, self._previous = self._previous, {}
        for sig, handler in previous.items():
            # None: a handler not set from Python, which cannot be put back; the default is the nearest
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)

    def __enter__(self) -> "StopRequest":
        return self

    def __exit__(self, *exc) -> None:
        self.restore()

    def _handle(self, signum, frame):
        self.signal_name = signal.Signals(signum).name
        self._event.set()
        self.restore()

    def __bool__(self) -> bool:
        return self._event.is_set()

    def agreed(self) -> bool:
        """Whether any process was asked to stop; every process calls it at the same step boundary.

        Multi-host, a signal reaches hosts at different moments (or only one host): a process that stopped alone
        would leave a checkpoint that only it saved and the others waiting forever in the next step's
        collectives. So the loop acts on this agreed value, never on its own flag."""
        return distributed.any_process(bool(self))

    def describe(self) -> str:
        return self.signal_name or "a stop request on another process"


def restore_model_params(directory: str, target: dict, step: int | None = None) -> tuple[int, dict]:
    """Only the model parameters of a checkpoint that `Checkpointer` wrote (for evaluation: the optimizer state
    is never read). `target` is the pure dict of the model's parameters (`nnx.to_pure_dict(nnx.state(model,
    nnx.Param))`), arrays or `jax.ShapeDtypeStruct`s with shardings: the restored arrays take its dtypes (a cast
    when they differ, e.g. fp32 training weights evaluated in bf16) and shardings. Returns (step, parameters)."""
    directory = os.path.abspath(directory)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"no checkpoint directory {directory}")
    manager = ocp.CheckpointManager(directory)
    steps = sorted(manager.all_steps())
    if not steps:
        raise FileNotFoundError(f"{directory} holds no finished checkpoint step")
    step = steps[-1] if step is None else step
    if step not in steps:
        raise FileNotFoundError(f"{directory} has no step {step}; its steps are {steps}")
    model_target = {"model": jax.tree.map(ocp.utils.to_shape_dtype_struct, target)}
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item=model_target, restore_args=ocp.checkpoint_utils.construct_restore_args(model_target),
        partial_restore=True)))
    manager.close()
    return step, restored["state"]["model"]
