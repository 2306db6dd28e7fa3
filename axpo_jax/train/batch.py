"""Training batches: whole trajectories re-encoded for one forward, with per-token targets and weights.

Arrays are aligned to *predictions*: position t of every [B, T] array describes the prediction of token t+1
(its target id, whether it is trained, its advantage, its log-prob when sampled), which is what
`Qwen3VL.token_logprobs(inputs, targets)` returns at position t. Shapes are bucketed (tokens, image rows, patches)
so a run compiles the update a handful of times.
"""

from __future__ import annotations

import flax.struct
import numpy as np

from axpo_jax.rollout.agent_loop import trajectory_images

from axpo_jax.models.qwen3_vl.inputs import ModelInputs, bucket, image_buckets, prepare_inputs


@flax.struct.dataclass
class TrainBatch:
    inputs: ModelInputs
    targets_bt: np.ndarray  # int32, token t+1
    loss_mask_bt: np.ndarray  # float32, 1 where token t+1 is trained
    advantages_bt: np.ndarray  # float32 (RL), 0 for SFT
    sampler_logprobs_bt: np.ndarray  # float32, the sampler's log-prob of token t+1 (RL), 0 elsewhere


def make_batch(config, token_ids: list[list[int]], trained: list[np.ndarray], *, pixel_values=None,
               image_grid_thw=None, advantages: list[np.ndarray] | None = None,
               sampler_logprobs: list[list[float]] | None = None, length: int | None = None,
               num_image_rows: int | None = None, patches_per_image: int | None = None,
               pad_id: int = 0) -> TrainBatch:
    """Rows of token ids with per-token weights (indexed like the ids) -> a right-padded, shifted TrainBatch.

    `trained[b][i]` says whether token i of row b is trained (and `advantages[b][i]` its advantage), so the
    prediction at position i - 1 carries them.
    """
    rows = len(token_ids)
    length = length or bucket(max(len(ids) for ids in token_ids), 16)
    if max(len(ids) for ids in token_ids) > length:
        raise ValueError(f"a trajectory of {max(len(ids) for ids in token_ids)} tokens exceeds the length {length}")
    ids = np.full((rows, length), pad_id, np.int64)
    mask = np.zeros((rows, length), np.int64)
    weight = np.zeros((rows, length), np.float32)
    adv = np.zeros((rows, length), np.float32)
    old = np.zeros((rows, length), np.float32)
    for b, row in enumerate(token_ids):
        n = len(row)
        ids[b, :n], mask[b, :n] = row, 1
        weight[b, : n - 1] = np.asarray(trained[b], np.float32)[1:n]
        if advantages is not None:
            adv[b, : n - 1] = np.asarray(advantages[b], np.float32)[1:n]
        if sampler_logprobs is not None:
            old[b, : n - 1] = np.asarray(sampler_logprobs[b], np.float32)[1:n]
    buckets = image_buckets(config, image_grid_thw)
    inputs = prepare_inputs(
        config, ids, mask, pixel_values, image_grid_thw,
        num_image_rows=num_image_rows or buckets["num_image_rows"],
        patches_per_image=patches_per_image or buckets["patches_per_image"],
    )
    targets = np.concatenate([ids[:, 1:], np.full((rows, 1), pad_id)], axis=1).astype(np.int32)
    return TrainBatch(inputs, targets, weight, adv, old)


def trajectory_batch(config, processor, trajectories, trained, advantages=None, **buckets) -> TrainBatch:
    """A TrainBatch of agent trajectories: their images go through the checkpoint's image processor again."""
    pixel_values, grids = trajectory_images(trajectories, processor)
    pad_id = processor.tokenizer.pad_token_id or 0
    return make_batch(config, [t.token_ids for t in trajectories], trained, pixel_values=pixel_values,
                      image_grid_thw=grids, advantages=advantages,
                      sampler_logprobs=[t.logprobs for t in trajectories], pad_id=pad_id, **buckets)


def batch_shape(batch: TrainBatch) -> tuple[int, int, int]:
    """(tokens, image rows, patches per image row): the bucketed dimensions of a batch besides its rows."""
    rows_n, patches_l = np.shape(batch.inputs.pixel_patches_nlp)[:2]
    return int(np.shape(batch.targets_bt)[1]), int(rows_n), int(patches_l)


def _pad_axis(x, axis: int, size: int, value=0):
    x = np.asarray(x)
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return np.pad(x, widths, constant_values=value)


def pad_batch(batch: TrainBatch, *, length: int, num_image_rows: int, patches_per_image: int,
              spatial_merge_size: int) -> TrainBatch:
    """The same rows with more padding: `length` tokens, `num_image_rows` x `patches_per_image` image slots.

    Exactly what `make_batch` would have built with those buckets (nothing trained, attended or seen by the
    vision tower moves), so processes that built batches of different buckets can agree on one shape.
    """
    tokens, rows, patches = batch_shape(batch)
    if (length, num_image_rows, patches_per_image) == (tokens, rows, patches):
        return batch
    if length < tokens or num_image_rows < rows or patches_per_image < patches:
        raise ValueError(f"cannot pad a batch of shape {(tokens, rows, patches)} down to "
                         f"{(length, num_image_rows, patches_per_image)}")
    unit = spatial_merge_size**2
    x = batch.inputs
    index_bt = np.asarray(x.vision_token_index_bt)
    # a merged image token's index is row * (patches per row / merge^2) + offset: rows get wider
    old_per_row, new_per_row = patches // unit, patches_per_image // unit
    index_bt = np.where(index_bt >= 0, index_bt // old_per_row * new_per_row + index_bt % old_per_row, -1)

    def image(a, value=0):
        return _pad_axis(_pad_axis(a, 0, num_image_rows, value), 1, patches_per_image, value)

    inputs = ModelInputs(
        input_ids_bt=_pad_axis(x.input_ids_bt, 1, length),
        attention_mask_bt=_pad_axis(x.attention_mask_bt, 1, length),
        position_ids_3bt=_pad_axis(x.position_ids_3bt, 2, length),
        vision_token_index_bt=_pad_axis(index_bt.astype(np.int32), 1, length, -1),
        pixel_patches_nlp=image(x.pixel_patches_nlp),
        patch_valid_nl=image(x.patch_valid_nl, False),
        patch_pos_index_nl4=image(x.patch_pos_index_nl4),
        patch_pos_weight_nl4=image(x.patch_pos_weight_nl4),
        patch_rope_hw_nl2=image(x.patch_rope_hw_nl2),
    )
    return TrainBatch(inputs, _pad_axis(batch.targets_bt, 1, length), _pad_axis(batch.loss_mask_bt, 1, length),
                      _pad_axis(batch.advantages_bt, 1, length), _pad_axis(batch.sampler_logprobs_bt, 1, length))


def device_batch(batch: TrainBatch, mesh, *, spatial_merge_size: int) -> TrainBatch:
    """A global TrainBatch split by row over the mesh's batch axes, from this process's rows (see
    `parallel.distributed`); with one process, the batch placed on the mesh."""
    from axpo_jax.parallel import distributed
    from axpo_jax.parallel.sharding import shard_model_inputs

    def rows(x):
        return distributed.global_from_local(x, mesh, 0)

    return TrainBatch(shard_model_inputs(batch.inputs, mesh, spatial_merge_size=spatial_merge_size),
                      rows(batch.targets_bt), rows(batch.loss_mask_bt), rows(batch.advantages_bt),
                      rows(batch.sampler_logprobs_bt))
