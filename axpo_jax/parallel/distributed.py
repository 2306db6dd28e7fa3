"""Running the same program on several hosts (`jax.distributed`): start-up, who owns which rows, and moving small
values and process-local rows in and out of global arrays.

The model is SPMD across processes: every process runs the same jitted programs on global arrays laid out over one
mesh of all devices, and every process must call them in the same order with the same shapes. What differs per
process is host-side work: each process builds only its own rows of a global batch (its questions, its SFT
examples), runs the tools of those rows, and reads back only those rows. This module is the boundary:

- `initialize_from_env` joins the cluster (explicit env vars, or jax's auto-detection on TPU pods / SLURM / ...).
- `data_shard(mesh)` says which slice of every batch this process provides. Every process owns its own batch
  positions: a mesh whose non-batch axes (tensor) cross hosts, so that processes would share rows, is refused.
- `global_from_local` / `local_rows` turn a process's rows into a global array split over the batch axes and back.
- `allgather`, `allgather_json`, `any_process`, `max_across_processes` agree on small host values (shapes, loop
  control, rewards); `is_primary` picks the one process that logs and writes files.

With one process every function here is the identity (or the trivial gather), so single-host code paths are the
multi-host ones with a data shard count of 1.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import logging
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import jax
    from jax.sharding import Mesh

# jax is imported inside the functions: launch.py calls `initialize_from_env` right after setting the environment,
# and on a machine with no cluster that must not import jax (the mode does, later).

logger = logging.getLogger(__name__)

# Environment variables of an explicit (non auto-detected) cluster, as jax itself names the coordinator's.
ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"
MODES = ("auto", "off", "env")

# XLA:CPU's concurrency-optimized schedule lets a while loop that holds collectives (e.g. the chunked log-prob
# map with fsdp all-gathers inside) run beside an independent collective of the same program; devices of one
# process then enter them in different orders and wait on each other forever (seen: the RL update on 4 CPU
# devices, data=2 x fsdp=2, in one process and across processes). The memory-optimized schedule runs them in one
# order. Only the CPU backend reads this flag.
CPU_SCHEDULER_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"


@dataclasses.dataclass(frozen=True)
class ProcessInfo:
    process_index: int
    process_count: int
    initialized: bool  # jax.distributed.initialize ran in this process
    local_device_count: int | None = None  # None: jax not started yet (a single process, nothing to join)
    device_count: int | None = None

    def describe(self) -> str:
        devices = "" if self.device_count is None else f", {self.local_device_count} of {self.device_count} devices"
        return (f"process {self.process_index}/{self.process_count}{devices} "
                f"({'jax.distributed' if self.initialized else 'single process'})")


class DistributedError(RuntimeError):
    """The environment asks for a cluster that cannot be joined, or a mesh that cannot split data by process."""


def _explicit_cluster(environ: Mapping[str, str]) -> tuple[str, int, int] | None:
    present = [name for name in (ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID) if environ.get(name)]
    if not present:
        return None
    if len(present) < 3:
        missing = sorted({ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID} - set(present))
        raise DistributedError(f"{', '.join(present)} set but {', '.join(missing)} missing: set all three to start "
                               f"jax.distributed from the environment (or none, for auto-detection)")
    try:
        return environ[ENV_COORDINATOR], int(environ[ENV_NUM_PROCESSES]), int(environ[ENV_PROCESS_ID])
    except ValueError as e:
        raise DistributedError(f"{ENV_NUM_PROCESSES} and {ENV_PROCESS_ID} must be integers: {e}") from None


def _cluster_hint(environ: Mapping[str, str]) -> str | None:
    """Why jax's own cluster detection is worth asking (it then finds coordinator, count and index itself)."""
    if importlib.util.find_spec("libtpu") is not None:
        return "libtpu is installed (a Cloud TPU VM: every host of a pod runs this)"
    if "SLURM_JOB_ID" in environ and int(environ.get("SLURM_NTASKS", "1") or 1) > 1:
        return "a SLURM job with several tasks"
    if "OMPI_MCA_orte_hnp_uri" in environ:
        return "an Open MPI job"
    return None


def initialize_from_env(mode: str = "auto", *, environ: Mapping[str, str] | None = None) -> ProcessInfo:
    """Joins the cluster this process was started in; call once per process, before any jax computation.

    mode "off": stay a single process. "env": JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID must
    be set (multi-node GPU, or several CPU processes on one machine as the tests run them). "auto" (default): those
    variables when set; else, on a Cloud TPU VM or in a SLURM / Open MPI job, `jax.distributed.initialize()` with
    no arguments (jax detects the pod's coordinator, process count and index); else a single process, and jax is
    not even imported. CPU collectives go through gloo, so CPU processes can run cross-process programs.
    """
    if mode not in MODES:
        raise DistributedError(f"unknown distributed mode {mode!r}; modes: {', '.join(MODES)}")
    environ = os.environ if environ is None else environ
    explicit = _explicit_cluster(environ) if mode != "off" else None
    if mode == "env" and explicit is None:
        raise DistributedError(f"distributed mode 'env' needs {ENV_COORDINATOR}, {ENV_NUM_PROCESSES} and "
                               f"{ENV_PROCESS_ID} in the environment")
    hint = _cluster_hint(environ) if mode == "auto" and explicit is None else None
    if explicit is None and hint is None:
        return ProcessInfo(0, 1, False)
    import jax

    if jax.distributed.is_initialized():
        return process_info()
    avoid_cpu_collective_deadlocks()
    # Without gloo, XLA:CPU has no cross-process collectives and the first sharded program fails.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if explicit is not None:
        coordinator, num_processes, process_id = explicit
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id)
    else:
        logger.info("asking jax to detect the cluster: %s", hint)
        jax.distributed.initialize()
    info = process_info()
    logger.info("jax.distributed: %s", info.describe())
    return info


def avoid_cpu_collective_deadlocks() -> None:
    """Adds CPU_SCHEDULER_FLAG to XLA_FLAGS (unless XLA_FLAGS already sets that option). It takes effect only if no
    jax backend has started yet: call it before the first computation of any run with several CPU devices."""
    flags = os.environ.get("XLA_FLAGS", "")
    if CPU_SCHEDULER_FLAG.split("=")[0] not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {CPU_SCHEDULER_FLAG}".strip()


def process_info() -> ProcessInfo:
    import jax

    return ProcessInfo(jax.process_index(), jax.process_count(), jax.distributed.is_initialized(),
                       jax.local_device_count(), jax.device_count())


def is_primary() -> bool:
    """The process that logs, prints results and writes files that all processes share (process 0)."""
    import jax

    return jax.process_index() == 0


# ----------------------------------------------------------------------------------------------- small values
def allgather(x) -> np.ndarray:
    """Every process's `x` (a small numpy value of one shape and dtype on all processes), stacked [P, ...].

    Bit-exact for any dtype (sent as bytes), so values agreed on this way compare equal everywhere.
    """
    import jax

    x = np.asarray(x)
    if jax.process_count() == 1:
        return x[None].copy()
    from jax.experimental import multihost_utils

    as_bytes = np.ascontiguousarray(x).reshape(-1).view(np.uint8)
    gathered = np.asarray(multihost_utils.process_allgather(as_bytes))  # [P, nbytes]
    return gathered.view(x.dtype).reshape((jax.process_count(),) + x.shape)


def allgather_json(obj) -> list:
    """Every process's JSON-serializable `obj` (any size), in process order."""
    data = np.frombuffer(json.dumps(obj).encode(), np.uint8)
    lengths = allgather(np.int64(len(data)))
    padded = np.zeros(int(lengths.max()), np.uint8)
    padded[: len(data)] = data
    gathered = allgather(padded)
    return [json.loads(row[:n].tobytes().decode()) for row, n in zip(gathered, lengths)]


def fail_together(what: str, fn, error_type: type[Exception] = RuntimeError):
    """`fn()` on every process; when it raises on any, every process raises (the one that failed its own error,
    the others `error_type` naming it), so none is left waiting alone in the next collective: a check that reads a
    host's own disk (a file missing there, a folder of another run) can fail on one host only."""
    import jax

    if jax.process_count() == 1:
        return fn()
    try:
        result, error = fn(), None
    except Exception as caught:  # noqa: BLE001 - re-raised below, after every process has heard of it
        result, error = None, caught
    errors = allgather_json(None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    failed = [i for i, e in enumerate(errors) if e]
    if failed:
        raise error_type(f"{what}: failed on process {failed[0]} ({errors[failed[0]]})")
    return result


def max_across_processes(values) -> np.ndarray:
    """Element-wise max of a small int/float array over processes (shapes every process must agree on)."""
    return allgather(np.asarray(values)).max(axis=0)


def any_process(flag: bool) -> bool:
    """True when `flag` is true on some process: loop control that every process must follow together."""
    return bool(allgather(np.bool_(flag)).any())


def assert_same(value, what: str) -> None:
    """Fails on every process when the processes disagree on a small value (e.g. a count of micro-batches)."""
    values = allgather(np.asarray(value))
    if not (values == values[:1]).all():
        raise DistributedError(f"processes disagree on {what}: {values.tolist()}")


def sync(name: str) -> None:
    """A barrier over all processes (no-op with one)."""
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


# ---------------------------------------------------------------------------------------- rows of a global batch
@dataclasses.dataclass(frozen=True)
class DataShard:
    """This process's share of every batch split over the mesh's batch axes: rows [index * L, (index + 1) * L)
    of a global batch of count * L rows, where L is the number of rows each process provides."""

    index: int
    count: int
    positions: int = 1  # batch positions of the mesh per shard: every process's row count is a multiple of it

    def round_rows(self, rows: int) -> int:
        """`rows` rounded up to a row count each process can provide (a multiple of `positions`)."""
        return -(-rows // self.positions) * self.positions

    def rows(self, global_rows: int) -> slice:
        if global_rows % self.count:
            raise DistributedError(f"a batch of {global_rows} rows does not split into {self.count} data shards")
        local = global_rows // self.count
        return slice(self.index * local, (self.index + 1) * local)


def data_shard(mesh: Mesh | None, batch_axes=None) -> DataShard:
    """Which data shard this process is, from where its devices sit along the mesh's batch axes."""
    import jax

    if mesh is None or jax.process_count() == 1:
        return DataShard(0, 1)
    from axpo_jax.parallel.sharding import BATCH_AXES

    return _data_shard(mesh, tuple(batch_axes or BATCH_AXES), jax.process_index())


@functools.lru_cache(maxsize=64)
def _data_shard(mesh: Mesh, batch_axes: tuple[str, ...], process_index: int) -> DataShard:
    # every per-row array placed or read asks this: walk the mesh's devices once per mesh
    processes = np.vectorize(lambda device: device.process_index, otypes=[np.int64])(mesh.devices)
    shards = data_shards(processes, tuple(mesh.axis_names), batch_axes)
    if process_index not in shards:
        raise DistributedError(f"process {process_index} has no device in the mesh {dict(mesh.shape)}")
    return shards[process_index]


def data_shards(processes: np.ndarray, axis_names: tuple[str, ...], batch_axes=None) -> dict[int, DataShard]:
    """Every process's DataShard on a mesh whose devices belong to the processes `processes` (an int array of the
    mesh's shape); a DistributedError when a process does not own whole, contiguous batch positions of its own.

    Processes that shared a batch position would hold the same rows: each would run those rows' tools and feed its
    own observations into the same global rows, so a result that differs by host (a timeout, a flaky search)
    silently forks the trajectories, or the processes disagree on shapes and a collective fails."""
    from axpo_jax.parallel.sharding import BATCH_AXES

    batch_axes = tuple(batch_axes or BATCH_AXES)
    names = list(axis_names)
    shape = dict(zip(names, processes.shape))
    batch_dims = [names.index(a) for a in batch_axes if a in names]
    other_dims = [d for d in range(len(names)) if d not in batch_dims]
    # [batch positions, other positions] of devices: a batch row block sits at one batch position
    by_position = np.transpose(processes, batch_dims + other_dims).reshape(
        int(np.prod([processes.shape[d] for d in batch_dims], dtype=int)), -1)
    shared = {position: sorted(set(row.tolist())) for position, row in enumerate(by_position)
              if len(set(row.tolist())) > 1}
    if shared:
        position, owners = next(iter(shared.items()))
        raise DistributedError(
            f"mesh {shape} puts batch position {position} on processes {owners}: every process must own its own "
            f"batch rows, so keep tensor (and every axis but {'/'.join(batch_axes)}) within one host's devices and "
            f"put the hosts on {'/'.join(batch_axes)}")
    positions_of: dict[int, list[int]] = {}
    for position, row in enumerate(by_position):
        positions_of.setdefault(int(row[0]), []).append(position)
    blocks = sorted(tuple(p) for p in positions_of.values())
    sizes = {len(b) for b in blocks}
    contiguous = all(b == tuple(range(b[0], b[0] + len(b))) for b in blocks)
    if len(sizes) != 1 or not contiguous:
        raise DistributedError(
            f"mesh {shape} does not give each process one contiguous, equal block of batch positions "
            f"over {batch_axes} (positions per process: {dict(sorted(positions_of.items()))}); order the devices so "
            f"each host's devices are adjacent along the batch axes")
    return {process: DataShard(blocks.index(tuple(p)), len(blocks), len(p)) for process, p in positions_of.items()}


def global_from_local(x_local, mesh: Mesh, batch_axis: int = 0) -> jax.Array:
    """A global array split over the mesh's batch axes from this process's rows (`data_shard(mesh)` says which).

    With one process this is a device_put of the whole batch (replicated when the batch axis does not divide).
    """
    import jax
    from jax.sharding import NamedSharding

    from axpo_jax.parallel.sharding import batch_spec

    x_local = np.asarray(x_local)
    shard = data_shard(mesh)
    global_shape = list(x_local.shape)
    global_shape[batch_axis] *= shard.count
    spec = batch_spec(tuple(global_shape), mesh, batch_axis)
    if shard.count > 1 and spec[batch_axis] is None:
        from axpo_jax.parallel.sharding import BATCH_AXES

        ways = int(np.prod([mesh.shape[a] for a in BATCH_AXES if a in mesh.shape]))
        raise DistributedError(
            f"{x_local.shape[batch_axis]} rows per process x {shard.count} processes = {global_shape[batch_axis]} "
            f"rows do not split over the mesh's {ways} batch positions; pad each process's rows to a multiple of "
            f"{ways // shard.count}")
    return jax.make_array_from_process_local_data(NamedSharding(mesh, spec), x_local, tuple(global_shape))


def local_rows(x: jax.Array, mesh: Mesh, batch_axis: int = 0) -> np.ndarray:
    """This process's rows of a global array (whatever its sharding, as long as this process holds them); an
    array this process holds whole (one process, or a process-local array) comes back whole."""
    import jax

    if not isinstance(x, jax.Array) or x.is_fully_addressable:  # host data, or one process's own array
        return np.asarray(x)
    wanted = data_shard(mesh).rows(x.shape[batch_axis])
    out_shape = list(x.shape)
    out_shape[batch_axis] = wanted.stop - wanted.start
    out = np.empty(out_shape, x.dtype)
    filled = np.zeros(out_shape[batch_axis], bool)
    for shard in x.addressable_shards:
        rows = shard.index[batch_axis] if len(shard.index) > batch_axis else slice(None)
        start, stop, _ = rows.indices(x.shape[batch_axis])
        lo, hi = max(start, wanted.start), min(stop, wanted.stop)
        if lo >= hi:
            continue
        data = np.asarray(shard.data)
        index = [slice(None)] * x.ndim
        index[batch_axis] = slice(lo - start, hi - start)
        target = [slice(None)] * x.ndim
        target[batch_axis] = slice(lo - wanted.start, hi - wanted.start)
        # other axes of this shard may be split too (e.g. over tensor); rebuild them from every shard
        for axis, part in enumerate(shard.index):
            if axis != batch_axis:
                target[axis] = part
        out[tuple(target)] = data[tuple(index)]
        filled[lo - wanted.start: hi - wanted.start] = True
    if not filled.all():
        raise DistributedError(f"process {jax.process_index()} does not hold its rows {wanted} of an array "
                               f"sharded as {x.sharding}")
    return out


def concat_shards(x_local, mesh: Mesh | None) -> np.ndarray:
    """The global array of a per-row host value (e.g. rewards [Q_local, N] -> [Q, N]): every data shard's rows, in
    shard order."""
    x_local = np.asarray(x_local)
    shard = data_shard(mesh)
    if shard.count == 1:
        return x_local
    gathered = allgather(x_local)
    shard_of_process = allgather(np.int64(shard.index))
    first = [int(np.flatnonzero(shard_of_process == i)[0]) for i in range(shard.count)]
    return np.concatenate([gathered[p] for p in first], axis=0)
