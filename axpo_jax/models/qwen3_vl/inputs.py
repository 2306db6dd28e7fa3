"""Host-side preparation of model inputs from the HF Qwen3-VL processor's outputs.

Everything that depends on the *values* of `input_ids` and `image_grid_thw` (3D rope positions, where each image
token takes its embedding from, the per-patch position-embedding interpolation) is computed here in numpy, once,
so the jitted forward sees only fixed-shape arrays. Images are laid out one per row, padded to a common patch
count: attention inside the vision tower is then a batched per-image attention, and the row count and patch count
are the two bucketed dimensions.
"""

from __future__ import annotations

import functools
import itertools
from typing import Any

import flax.struct
import numpy as np

from axpo_jax.models.qwen3_vl.config import Qwen3VLConfig


class InputError(ValueError):
    """Processor outputs that are inconsistent (e.g. image tokens that don't match the image grids)."""


@flax.struct.dataclass
class ModelInputs:
    """Fixed-shape inputs of `Qwen3VL.forward` (B samples x T tokens; N image rows x L patches)."""

    input_ids_bt: Any  # int32
    attention_mask_bt: Any  # int32, 1 = real token
    position_ids_3bt: Any  # int32, (temporal, height, width) rope positions
    vision_token_index_bt: Any  # int32, row of the flattened merged vision tokens [N * L/m^2], -1 for text
    pixel_patches_nlp: Any  # float, flattened (C, Tp, P, P) pixel patches
    patch_valid_nl: Any  # bool
    patch_pos_index_nl4: Any  # int32, bilinear taps into the learned position table
    patch_pos_weight_nl4: Any  # float32
    patch_rope_hw_nl2: Any  # int32, (row, col) of each patch for the vision 2D rope


def _to_numpy(x) -> np.ndarray | None:
    if x is None:
        return None
    if hasattr(x, "detach"):  # a torch tensor, as processors return with return_tensors="pt"
        x = x.detach().cpu().float().numpy() if x.is_floating_point() else x.detach().cpu().numpy()
    return np.asarray(x)


def patch_rows_cols(grid_thw, merge: int) -> tuple[np.ndarray, np.ndarray]:
    """(row, col) of every patch of one image, in the processor's merge-block order."""
    t, h, w = (int(v) for v in grid_thw)
    within = np.arange(t * h * w) % (h * w)
    blocks_w = w // merge
    in_col = within % merge
    in_row = (within // merge) % merge
    block_col = (within // (merge * merge)) % blocks_w
    block_row = within // (merge * merge * blocks_w)
    return block_row * merge + in_row, block_col * merge + in_col


def _bilinear_taps(index: np.ndarray, size: int, side: int) -> tuple[np.ndarray, np.ndarray]:
    """Taps and weights of align_corners=True bilinear resampling of a `side` table to `size` points."""
    src = index.astype(np.float32) * np.float32(side - 1) / np.float32(max(size - 1, 1))
    floor = np.floor(src)
    offsets = np.arange(2)
    taps = np.clip(floor.astype(np.int64)[:, None] + offsets, 0, side - 1)
    weights = np.clip(1 - np.abs(src[:, None] - floor[:, None] - offsets), 0, None).astype(np.float32)
    return taps, weights


def position_embedding_taps(grid_thw, merge: int, num_position_embeddings: int) -> tuple[np.ndarray, np.ndarray]:
    """[P, 4] indices into the learned square position table and their bilinear weights, per patch."""
    side = int(round(num_position_embeddings**0.5))
    _, h, w = (int(v) for v in grid_thw)
    rows, cols = patch_rows_cols(grid_thw, merge)
    h_taps, h_w = _bilinear_taps(rows, h, side)
    w_taps, w_w = _bilinear_taps(cols, w, side)
    index = (h_taps[:, :, None] * side + w_taps[:, None, :]).reshape(-1, 4)
    weight = (h_w[:, :, None] * w_w[:, None, :]).reshape(-1, 4)
    return index.astype(np.int32), weight


@functools.lru_cache(maxsize=32)  # 40 bytes a patch: 32 of the processor's largest grids (65,536 patches) ~84 MB
def _image_patch_tables(grid_thw: tuple[int, int, int], merge: int, num_position_embeddings: int):
    """Per patch of an image of this grid: position-table taps [P, 4], their weights [P, 4] and (row, col) [P, 2].
    They depend on the grid alone, and a batch's images mostly share a few grids (a benchmark's one size, the
    processor's bucketed resizes): kept, read-only, rather than recomputed per image (~0.7 ms for 1,300 tokens)."""
    index, weight = position_embedding_taps(grid_thw, merge, num_position_embeddings)
    rows_cols = np.stack(patch_rows_cols(grid_thw, merge), -1).astype(np.int32)
    for table in (index, weight, rows_cols):
        table.flags.writeable = False
    return index, weight, rows_cols


def rope_position_ids(input_ids, mm_token_type_ids, image_grid_thw, attention_mask, merge: int):
    """3D rope positions [3, B, T] and per-sample deltas [B] exactly as transformers' Qwen3-VL computes them.

    Text advances all three axes together; an image of llm grid (t, h, w) occupies a (t, h, w) box starting at the
    current position, after which text continues at start + max(h, w). Padding positions are 0. The delta
    (max position + 1 - real length) is what decoding adds to plain token counts.
    """
    batch, length = input_ids.shape
    positions = np.zeros((3, batch, length), dtype=np.int32)
    deltas = np.zeros((batch,), dtype=np.int32)
    grids = iter([] if image_grid_thw is None else image_grid_thw)
    for b in range(batch):
        valid = attention_mask[b].astype(bool)
        types = mm_token_type_ids[b][valid]
        chunks, current = [], 0
        run_starts = np.flatnonzero(np.r_[True, types[1:] != types[:-1]]) if types.size else np.zeros(0, int)
        run_lengths = np.diff(np.r_[run_starts, types.size])
        for modality, n in zip(types[run_starts].tolist(), run_lengths.tolist()):
            if modality == 0:
                chunks.append(np.broadcast_to(np.arange(n) + current, (3, n)))
                current += n
                continue
            t, h, w = (int(v) for v in next(grids))
            gh, gw = h // merge, w // merge
            tt, hh, ww = np.meshgrid(np.arange(t), np.arange(gh), np.arange(gw), indexing="ij")
            chunks.append(np.stack([tt, hh, ww]).reshape(3, -1) + current)
            current += max(h, w) // merge
        sample = np.concatenate(chunks, axis=1) if chunks else np.zeros((3, 0), np.int64)
        positions[:, b, valid] = sample
        deltas[b] = (sample.max() + 1 - valid.sum()) if sample.size else 0
    return positions, deltas


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def bucket(n: int, minimum: int) -> int:
    """The next power of two >= max(n, minimum): few distinct shapes (each a compile), at most 2x padding."""
    return max(minimum, 1 << max(n - 1, 0).bit_length())


def image_buckets(config: Qwen3VLConfig, image_grid_thw, *, min_patches: int = 64) -> dict:
    """Bucketed `num_image_rows` / `patches_per_image` for `prepare_inputs`, from a batch's image grids."""
    grids = np.zeros((0, 3), np.int64) if image_grid_thw is None else np.asarray(image_grid_thw)
    unit = config.vision.spatial_merge_size ** 2
    most_patches = int(grids.prod(-1).max()) if len(grids) else 0
    return {"num_image_rows": bucket(len(grids), 1),
            "patches_per_image": max(bucket(most_patches, min_patches), unit)}


def prepare_inputs(
    config: Qwen3VLConfig,
    input_ids,
    attention_mask=None,
    pixel_values=None,
    image_grid_thw=None,
    mm_token_type_ids=None,
    *,
    num_image_rows: int | None = None,
    patches_per_image: int | None = None,
    position_offset_b=None,
    **unused,
) -> ModelInputs:
    """Turns what `Qwen3VLProcessor.__call__` returns into `ModelInputs` (numpy).

    `num_image_rows` / `patches_per_image` pad the image dimensions to a bucket so that batches of different
    images share one compiled forward; by default they are the smallest that fit (at least one all-padding row,
    so the vision tower runs on text-only batches too and sharded collectives stay in step).
    `position_offset_b` starts each row's rope positions at a cached row's next position, for chunks appended
    to a KV cache (positions are relative, so an offset is all a continuation needs).
    """
    if "video_grid_thw" in unused and unused["video_grid_thw"] is not None:
        raise InputError("video inputs are not supported yet")
    vision = config.vision
    merge = vision.spatial_merge_size
    unit = merge * merge
    input_ids = _to_numpy(input_ids).astype(np.int32)
    if input_ids.ndim != 2:
        raise InputError(f"input_ids must be [batch, length], got shape {input_ids.shape}")
    attention_mask = (
        np.ones_like(input_ids) if attention_mask is None else _to_numpy(attention_mask).astype(np.int32)
    )
    real = attention_mask > 0
    vocab = config.text.vocab_size
    # An id past the table embeds as NaN (jnp.take fills) and the logits come out NaN instead of an error. Padding
    # may hold any id the table takes (the sampler pads with -1, which wraps) but not one past it: a padding key's
    # NaN value reaches the real tokens through its zero attention weight (0 * NaN).
    bad = np.where(real, (input_ids < 0) | (input_ids >= vocab), (input_ids < -vocab) | (input_ids >= vocab))
    if bad.any():
        b, t = (int(i) for i in np.argwhere(bad)[0])
        raise InputError(f"{'token' if real[b, t] else 'padding'} id {int(input_ids[b, t])} (sample {b}, position "
                         f"{t}) is outside the vocabulary [0, {vocab})")
    grids = np.zeros((0, 3), np.int64) if image_grid_thw is None else _to_numpy(image_grid_thw).astype(np.int64)
    if np.any(grids[:, 0] != 1):
        # the vision tower attends across all of an image's patches, transformers within each frame
        raise InputError(f"image_grid_thw {grids.tolist()} has t != 1: video / multi-frame grids are not supported")
    is_image_token = (input_ids == config.image_token_id) & real
    if mm_token_type_ids is None:
        mm_token_type_ids = is_image_token.astype(np.int32)
    else:
        mm_token_type_ids = _to_numpy(mm_token_type_ids).astype(np.int32)
        if np.any((mm_token_type_ids == 1) != (input_ids == config.image_token_id)):
            raise InputError("mm_token_type_ids marks different positions than the image tokens in input_ids")

    tokens_per_image = (grids.prod(-1) // unit).astype(np.int64)
    if np.any(grids[:, 1:] % merge):
        raise InputError(f"image_grid_thw {grids.tolist()} is not divisible by spatial_merge_size={merge}")
    _check_image_tokens(is_image_token, tokens_per_image)

    num_images = len(grids)
    patches = tokens_per_image * unit
    rows = max(num_images, 1) if num_image_rows is None else num_image_rows
    length = _round_up(int(patches.max()) if num_images else unit, unit)
    length = length if patches_per_image is None else patches_per_image
    if rows < num_images or length < (patches.max() if num_images else 0) or length % unit:
        raise InputError(
            f"bucket too small: {num_images} images of up to {int(patches.max()) if num_images else 0} patches do "
            f"not fit num_image_rows={rows}, patches_per_image={length} (must be a multiple of {unit})"
        )

    pixel_patches = np.zeros((rows, length, vision.patch_dim), np.float32)
    valid = np.zeros((rows, length), bool)
    pos_index = np.zeros((rows, length, 4), np.int32)
    pos_weight = np.zeros((rows, length, 4), np.float32)
    rope_hw = np.zeros((rows, length, 2), np.int32)
    if num_images:
        pixels = _to_numpy(pixel_values)
        if pixels is None or pixels.shape != (int(patches.sum()), vision.patch_dim):
            raise InputError(
                f"pixel_values shape {None if pixels is None else pixels.shape} does not match image_grid_thw "
                f"({int(patches.sum())} patches of {vision.patch_dim} values)"
            )
        starts = np.concatenate([[0], np.cumsum(patches)])
        for i, grid in enumerate(grids):
            n = int(patches[i])
            pixel_patches[i, :n] = pixels[starts[i] : starts[i + 1]]
            valid[i, :n] = True
            pos_index[i, :n], pos_weight[i, :n], rope_hw[i, :n] = _image_patch_tables(
                tuple(int(v) for v in grid), merge, vision.num_position_embeddings)

    # The k-th image token overall (row-major over [B, T]) belongs to image i at offset o: row i*L/m^2 + o.
    merged_per_row = length // unit
    vision_index = np.full(input_ids.shape, -1, np.int32)
    image_of_token = np.repeat(np.arange(num_images), tokens_per_image)
    first_token_of_image = np.cumsum(tokens_per_image) - tokens_per_image
    offset_of_token = np.arange(int(tokens_per_image.sum())) - np.repeat(first_token_of_image, tokens_per_image)
    vision_index[is_image_token] = image_of_token * merged_per_row + offset_of_token

    positions, _ = rope_position_ids(input_ids, mm_token_type_ids, grids, attention_mask, merge)
    if position_offset_b is not None:
        offset = np.asarray(position_offset_b, np.int32)[None, :, None]
        positions = np.where(attention_mask[None] > 0, positions + offset, 0).astype(np.int32)
    return ModelInputs(
        input_ids_bt=input_ids,
        attention_mask_bt=attention_mask,
        position_ids_3bt=positions,
        vision_token_index_bt=vision_index,
        pixel_patches_nlp=pixel_patches,
        patch_valid_nl=valid,
        patch_pos_index_nl4=pos_index,
        patch_pos_weight_nl4=pos_weight,
        patch_rope_hw_nl2=rope_hw,
    )


def _check_image_tokens(is_image_token: np.ndarray, tokens_per_image: np.ndarray) -> None:
    """Each contiguous run of image tokens must be exactly the next image(s) in image_grid_thw order."""
    expected = iter(tokens_per_image.tolist())
    image = 0
    for b, row in enumerate(is_image_token):
        for is_image, run in itertools.groupby(row.tolist()):
            if not is_image:
                continue
            run_length = len(list(run))
            while run_length > 0:
                want = next(expected, None)
                if want is None:
                    raise InputError(
                        f"sample {b} has image tokens beyond the {len(tokens_per_image)} image(s) in image_grid_thw"
                    )
                if want > run_length:
                    raise InputError(
                        f"image tokens don't match the grids: sample {b} has a run of {run_length} image tokens "
                        f"where image {image} needs {want} (grid tokens = t*h*w/merge^2)"
                    )
                run_length -= want
                image += 1
    if image != len(tokens_per_image):
        raise InputError(
            f"image tokens don't match the grids: input_ids hold tokens for {image} image(s), "
            f"image_grid_thw describes {len(tokens_per_image)}"
        )
