"""Device meshes. Axes: `data` (pure data parallel), `fsdp` (data parallel with sharded params and optimizer
state), `tensor` (heads / MLP width split inside a layer)."""

from __future__ import annotations

from collections.abc import Mapping

import jax
import numpy as np
from jax.sharding import Mesh

MESH_AXES = ("data", "fsdp", "tensor")


def make_mesh(shape: Mapping[str, int] | None = None, devices=None) -> Mesh:
    """A mesh over `devices` (default: all). A size of -1 takes whatever devices the other axes leave."""
    devices = list(jax.devices() if devices is None else devices)
    shape = dict(shape or {"fsdp": -1})
    unknown = set(shape) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"unknown mesh axes {sorted(unknown)}; axes are {MESH_AXES}")
    sizes = [shape.get(axis, 1) for axis in MESH_AXES]
    bad = {axis: size for axis, size in zip(MESH_AXES, sizes)
           if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or (size < 1 and size != -1)}
    if bad:
        raise ValueError(f"mesh axis sizes must be ints >= 1 (or -1 for the devices left), got {bad}")
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {shape}")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices cannot be split as {shape}")
        sizes[sizes.index(-1)] = len(devices) // known
    if int(np.prod(sizes)) != len(devices):
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} devices, have {len(devices)}")
    return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


def mesh_from_config(shape: Mapping[str, int] | None) -> Mesh | None:
    """A run's mesh from its config's {"data": .., "fsdp": .., "tensor": ..}; None when everything is one device of
    one process (the single-device code path, no sharding annotations). A shape the devices cannot hold is a
    ValueError there too: a pod's config on one device says so rather than running unsharded. So is, over several
    processes, a mesh where processes share batch rows (a `tensor` axis wider than one host's devices): each
    process runs the tools of its own rows, so two processes feeding observations into the same rows would give
    them different trajectories (or collectives of different shapes)."""
    mesh = make_mesh(dict(shape) if shape else None)
    if jax.process_count() == 1 and len(jax.devices()) == 1:
        return None
    if jax.process_count() > 1:
        from axpo_jax.parallel import distributed

        try:
            distributed.data_shard(mesh)
        except distributed.DistributedError as error:  # a config's value: the mode reports it as one
            raise ValueError(str(error)) from None
    return mesh
