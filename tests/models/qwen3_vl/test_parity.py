"""The Flax port against transformers' PyTorch Qwen3-VL: logits and per-token log-probs, fp32, <= 1e-4."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from axpo_jax.models import qwen3_vl

from .conftest import hf_logits, make_batch

TOL = 1e-4

# Text runs (ints) and image grids (t, h, w) per sample: 0, 1 and 3 images, odd grid sizes, mixed per batch.
CASES = {
    "text_only": [[9], [5]],
    "one_image": [[3, (1, 4, 6), 4], [2, (1, 6, 4), 6]],
    "three_images_and_none": [[2, (1, 4, 6), 3, (1, 2, 2), 1, (1, 6, 8), 2], [11]],
}


@nnx.jit
def _jitted_logprobs(model, inputs, targets):
    return model.token_logprobs(inputs, targets, chunk_size=8)


@pytest.mark.parametrize("padding", ["left", "right"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_and_logprobs_match_transformers(hf_checkpoint, case, padding):
    hf, folder = hf_checkpoint
    model = qwen3_vl.from_pretrained(folder)
    batch = make_batch(hf.config, CASES[case], padding=padding)
    reference = hf_logits(hf, batch)
    real = batch["attention_mask"].astype(bool)

    logits = np.asarray(model(**batch))  # the processor-outputs entry point
    assert np.abs(logits - reference)[real].max() <= TOL

    inputs = jax.tree.map(jnp.asarray, qwen3_vl.prepare_inputs(model.config, **batch))
    targets = np.roll(batch["input_ids"], -1, axis=1)
    logprobs = _jitted_logprobs(model, inputs, jnp.asarray(targets, jnp.int32))
    ref_logprobs = np.take_along_axis(jax.nn.log_softmax(reference, -1), targets[..., None], -1)[..., 0]
    assert np.abs(np.asarray(logprobs) - ref_logprobs)[real].max() <= TOL


def test_rope_positions_match_transformers(hf_checkpoint):
    import torch

    hf, _ = hf_checkpoint
    batch = make_batch(hf.config, CASES["three_images_and_none"], padding="left")
    expected, expected_delta = hf.model.get_rope_index(
        torch.from_numpy(batch["input_ids"]), torch.from_numpy(batch["mm_token_type_ids"]),
        torch.from_numpy(batch["image_grid_thw"]), attention_mask=torch.from_numpy(batch["attention_mask"]),
    )
    merge = hf.config.vision_config.spatial_merge_size
    positions, delta = qwen3_vl.inputs.rope_position_ids(
        batch["input_ids"], batch["mm_token_type_ids"], batch["image_grid_thw"], batch["attention_mask"], merge
    )
    np.testing.assert_array_equal(positions, expected.numpy())
    np.testing.assert_array_equal(delta, expected_delta.numpy()[:, 0])


def test_padded_image_buckets_do_not_change_logits(hf_checkpoint):
    """Extra all-padding image rows and longer patch rows (static-shape buckets) leave the logits unchanged."""
    hf, folder = hf_checkpoint
    model = qwen3_vl.from_pretrained(folder)
    batch = make_batch(hf.config, CASES["one_image"], padding="right")
    tight = qwen3_vl.prepare_inputs(model.config, **batch)
    roomy = qwen3_vl.prepare_inputs(model.config, **batch, num_image_rows=4, patches_per_image=40)
    assert roomy.pixel_patches_nlp.shape[:2] == (4, 40)
    a = np.asarray(model.forward(jax.tree.map(jnp.asarray, tight)))
    b = np.asarray(model.forward(jax.tree.map(jnp.asarray, roomy)))
    np.testing.assert_allclose(a, b, atol=1e-5)
