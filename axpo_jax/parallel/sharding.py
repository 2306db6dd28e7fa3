"""How parameters and batches are laid out over the mesh.

Linear weights are stored [out, in] (torch layout). Layers that widen (q/k/v, gate/up, fc1, qkv, the vocab
projection) split their output dimension over `tensor` and their input over `fsdp`; layers that narrow back
(o_proj, down_proj, proj, fc2) do the opposite, so a Megatron-style pair needs one reduction. A dimension that
the mesh axis does not divide is left unsplit, so any config runs on any mesh (tiny test models included).
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

BATCH_AXES = ("data", "fsdp")
_NARROWING = ("o_proj", "down_proj", "attn.proj", "linear_fc2")


def shard_axes(mesh: Mesh, axes, dim: int):
    """`axes` where a dimension of size `dim` splits evenly over them (and they have more than one device), else
    None (the dimension stays whole)."""
    if axes is None:
        return None
    names = (axes,) if isinstance(axes, str) else tuple(axes)
    size = int(np.prod([mesh.shape[a] for a in names]))
    return axes if size > 1 and dim % size == 0 else None


def param_spec(name: str, shape: tuple[int, ...], mesh: Mesh) -> P:
    """PartitionSpec for the parameter called `name` (its transformers name) of `shape`."""
    if len(shape) == 2 and not name.endswith("pos_embed.weight"):
        if any(part in name for part in _NARROWING):
            axes = ("fsdp", "tensor")
        else:  # widening linears, embed_tokens and lm_head: [out or vocab, in]
            axes = ("tensor", "fsdp")
    elif len(shape) == 5:  # the patch-embedding conv: only its output channels are split
        axes = ("fsdp", None, None, None, None)
    else:  # biases, norms, the small learned position table
        return P()
    return P(*(shard_axes(mesh, a, d) for a, d in zip(axes, shape)))


def param_sharding(name: str, shape: tuple[int, ...], mesh: Mesh | None):
    if mesh is None:  # this process's first device (with several processes, a process-local copy)
        return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return NamedSharding(mesh, param_spec(name, shape, mesh))


def batch_spec(shape: tuple[int, ...], mesh: Mesh, batch_axis: int = 0) -> P:
    """Shard `batch_axis` over data x fsdp when it divides, else replicate."""
    spec = [None] * len(shape)
    spec[batch_axis] = shard_axes(mesh, BATCH_AXES, shape[batch_axis])
    return P(*spec)


class _AxisSizes:
    """A mesh's axis sizes where only `.shape` is read (planning a layout without its devices)."""

    def __init__(self, shape):
        self.shape = {axis: int(shape.get(axis, 1)) for axis in ("data", "fsdp", "tensor")}


def rounded_rows_per_process(rows_per_process: int, batch_devices: int, processes: int = 1) -> int:
    """`rows_per_process` as every multi-process batch rounds it (`DataShard.round_rows`: a multiple of the
    process's batch positions, its share of the `batch_devices`); one process rounds nothing."""
    from axpo_jax.parallel.distributed import DataShard

    if processes == 1:
        return rows_per_process
    if batch_devices % processes:
        raise ValueError(f"{batch_devices} batch devices do not split over {processes} processes")
    return DataShard(0, processes, batch_devices // processes).round_rows(rows_per_process)


def rows_per_device(rows_per_process: int, mesh, processes: int = 1) -> int:
    """Rows each device holds of a global batch that `processes` processes build from `rows_per_process` rows each,
    rounded up as every multi-process batch is (`DataShard.round_rows`: a multiple of the process's batch
    positions) and laid out by `batch_spec`: a share over data x fsdp when they divide it, else all of it on every
    device (replicated). `mesh`: a Mesh or {axis: size}."""
    mesh = mesh if isinstance(mesh, Mesh) else _AxisSizes(dict(mesh))
    batch_devices = int(np.prod([mesh.shape[a] for a in BATCH_AXES]))
    rows = rounded_rows_per_process(rows_per_process, batch_devices, processes) * processes
    return rows // batch_devices if batch_spec((rows,), mesh)[0] is not None else rows


def shard_model_inputs(inputs, mesh: Mesh, *, spatial_merge_size: int | None = None):
    """Places `ModelInputs` on the mesh: token arrays split by sample, image arrays split by image row.

    `inputs` holds this process's rows (all of them with one process). With several data shards (see
    `distributed.data_shard`) every process passes inputs of the same shapes, and its image-token indices, which
    count image rows from its own first one, are moved to where its image rows sit in the global batch: that
    needs the vision tower's `spatial_merge_size` (merged tokens per image row = patches per row / merge^2).
    """
    from axpo_jax.parallel import distributed

    shard = distributed.data_shard(mesh)
    if shard.count > 1:
        if spatial_merge_size is None:
            raise ValueError("shard_model_inputs over several processes needs spatial_merge_size")
        rows_nlp = np.shape(inputs.pixel_patches_nlp)
        merged_per_image_row = rows_nlp[1] // spatial_merge_size**2
        index_bt = np.asarray(inputs.vision_token_index_bt)
        shift = shard.index * rows_nlp[0] * merged_per_image_row
        inputs = inputs.replace(vision_token_index_bt=np.where(index_bt >= 0, index_bt + shift, index_bt))

    def place(path, x):
        name = jax.tree_util.keystr(path)
        axis = 1 if "position_ids_3bt" in name else 0
        return distributed.global_from_local(x, mesh, axis)

    return jax.tree_util.tree_map_with_path(place, inputs)


def constrain_batch(x, batch_axis: int = 0):
    """Keeps activations split by sample over data x fsdp inside a jitted function run under `jax.set_mesh`.

    Without it XLA is free to split the decoder along the hidden dimension instead (it does, with fsdp only),
    which makes every device process the whole batch and all-reduce full activations each layer. Outside a
    mesh context this is the identity, so single-device code is unchanged.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not set(BATCH_AXES) <= set(mesh.axis_names):
        return x
    return jax.lax.with_sharding_constraint(x, batch_spec(x.shape, mesh, batch_axis))
