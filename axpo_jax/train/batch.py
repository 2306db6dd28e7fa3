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
