"""Mesh shapes from a config against the devices this process sees; which rows each process owns on a mesh over
several processes (from a table of each device's process: no cluster needed); how many rows of an RL micro-batch
each device holds, as the memory plan counts them."""

import jax
import numpy as np
import pytest
from jax.sharding import AbstractMesh, NamedSharding

from axpo_jax.parallel import distributed
from axpo_jax.parallel.mesh import MESH_AXES, make_mesh, mesh_from_config
from axpo_jax.parallel.sharding import batch_spec, rows_per_device


def test_a_shape_the_devices_cannot_hold_is_refused_even_on_one_device():
    devices = len(jax.devices())
    with pytest.raises(ValueError, match=f"needs {devices + 1} devices, have {devices}"):
        mesh_from_config({"data": 1, "fsdp": devices + 1, "tensor": 1})
    fitting = mesh_from_config({"data": 1, "fsdp": -1, "tensor": 1})
    if devices == 1:
        assert fitting is None  # one device: the unsharded code path
    else:
        assert fitting.shape["fsdp"] == devices


def test_minus_one_takes_the_devices_the_other_axes_leave():
    devices = len(jax.devices())
    mesh = make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
    assert dict(mesh.shape) == {"data": 1, "fsdp": devices, "tensor": 1}
    with pytest.raises(ValueError, match="at most one mesh axis may be -1"):
        make_mesh({"data": -1, "fsdp": -1})
    with pytest.raises(ValueError, match="unknown mesh axes"):
        make_mesh({"model": 2})


@pytest.mark.parametrize("shape", [{"fsdp": 0, "data": -1}, {"data": 1, "fsdp": 0, "tensor": -1}, {"fsdp": -2},
                                   {"fsdp": 2.0}, {"fsdp": "2"}, {"tensor": True}])
def test_axis_sizes_are_positive_ints_or_minus_one(shape):
    with pytest.raises(ValueError, match="mesh axis sizes must be ints >= 1 \\(or -1 for the devices left\\)") as e:
        make_mesh(shape)
    assert "\n" not in str(e.value)


# ------------------------------------------------------------------------------ processes own their batch rows
def _processes(shape, devices_per_process):
    """Which process each device of a mesh of `shape` (data, fsdp, tensor) belongs to, devices in process order as
    jax.devices() lists them."""
    return np.arange(int(np.prod(shape))).reshape(shape) // devices_per_process


@pytest.mark.parametrize("shape,per_process", [
    ((1, 1, 2), 1),  # one data shard spanning both processes: the shape-agreement checks used to be skipped
    ((1, 2, 2), 1),  # 4 processes, tensor across pairs of them: two shards of two processes each
    ((1, 16, 8), 4),  # tpu/README's old v5litepod-128 fsdp=16 tensor=8 on 4-chip hosts
    ((2, 1, 4), 2),
])
def test_a_mesh_whose_processes_share_batch_rows_is_refused(shape, per_process):
    with pytest.raises(distributed.DistributedError, match="every process must own its own batch rows, so keep "
                                                           "tensor .* within one host's devices") as e:
        distributed.data_shards(_processes(shape, per_process), MESH_AXES)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("shape,per_process,positions", [
    ((1, 4, 2), 2, 1),  # tensor within each host: each process owns one batch position
    ((2, 2, 2), 4, 2),
    ((1, 8, 1), 2, 2),
    ((1, 32, 2), 4, 2),  # the 32b,v6e-64 preset: 16 hosts of 4 chips
])
def test_each_process_owns_its_own_batch_positions(shape, per_process, positions):
    shards = distributed.data_shards(_processes(shape, per_process), MESH_AXES)
    count = int(np.prod(shape)) // per_process
    assert shards == {p: distributed.DataShard(p, count, positions) for p in range(count)}


def test_interleaved_hosts_are_refused():
    processes = np.array([0, 1, 0, 1]).reshape(1, 4, 1)
    with pytest.raises(distributed.DistributedError, match="one contiguous, equal block of batch positions"):
        distributed.data_shards(processes, MESH_AXES)


# -------------------------------------------------------------- rows per device of an RL update's micro-batch
@pytest.mark.parametrize("shape,processes,micro_batch_size", [
    ((1, 4, 1), 1, 2),  # the old v5p-8 presets: 2 rows over 4 devices are replicated, each device holds both
    ((1, 4, 1), 1, 4),
    ((2, 2, 2), 1, 2),
    ((1, 8, 1), 1, 8),
    ((1, 8, 1), 2, 3),  # each process rounds its 3 rows up to its 4 batch devices
    ((1, 16, 1), 4, 8),  # the old 8b,v6e-16 preset: 32 rows over 16 devices
    ((1, 4, 2), 4, 1),
    ((2, 4, 1), 2, 6),
])
def test_the_memory_plan_counts_the_rows_batch_spec_puts_on_each_device(shape, processes, micro_batch_size):
    """memory_settings' micro-batch per device against the layout itself: each process's rows rounded as the RL
    update rounds them (its DataShard), times the processes, placed by batch_spec on a mesh of that shape."""
    from axpo_jax.train.rl_run import memory_settings
    from tests.config_files import config_module

    mesh = AbstractMesh(shape, MESH_AXES)
    # one process: data_shard's own (no rounding), as the update of a single-process run sees it
    shard = distributed.data_shard(None) if processes == 1 else \
        distributed.data_shards(_processes(shape, int(np.prod(shape)) // processes), MESH_AXES)[0]
    rows = shard.round_rows(micro_batch_size) * shard.count
    per_device = NamedSharding(mesh, batch_spec((rows, 16), mesh)).shard_shape((rows, 16))[0]
    config = config_module("rl").get_config()
    config.micro_batch_size = micro_batch_size
    planned = memory_settings(config, shape[0] * shape[1], processes).micro_batch_per_device
    assert planned == per_device == rows_per_device(micro_batch_size, dict(zip(MESH_AXES, shape)), processes)


TWO_PROCESSES = '''
import json
from axpo_jax.parallel import distributed
distributed.initialize_from_env("env")
from axpo_jax.parallel.mesh import make_mesh, mesh_from_config
out = {"fsdp": distributed.data_shard(mesh_from_config({"fsdp": 2})).index}
try:
    mesh_from_config({"fsdp": 1, "tensor": 2})
except ValueError as error:
    out["config"] = str(error)
try:
    distributed.data_shard(make_mesh({"tensor": 2}))
except distributed.DistributedError as error:
    out["shard"] = str(error)
print(json.dumps(out))
'''


def test_two_processes_refuse_a_tensor_axis_across_them():
    """The refusal on real devices of two jax.distributed processes: a run's mesh (a config error, one line) and a
    DataShard asked of such a mesh; the same two devices on fsdp give each process its own shard."""
    import json
    import sys

    from tests.parallel.test_multihost import two_processes

    for i, (out, _) in enumerate(two_processes([sys.executable, "-c", TWO_PROCESSES])):
        got = json.loads(out.strip().splitlines()[-1])
        assert got["fsdp"] == i
        for message in (got["config"], got["shard"]):
            assert "puts batch position 0 on processes [0, 1]: every process must own its own batch rows" in message
