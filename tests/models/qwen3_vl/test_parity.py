"""The Flax port against transformers' PyTorch Qwen3-VL: logits and per-token log-probs, fp32, <= 1e-4."""

import contextlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from axpo_jax.models import qwen3_vl
from axpo_jax.models.qwen3_vl.tiny import random_model

from .conftest import hf_logits, make_batch

TOL = 1e-4

# Text runs (ints) and image grids (t, h, w) per sample: 0, 1 and 3 images, odd grid sizes, mixed per batch.
CASES = {
    "text_only": [[9], [5]],
    "one_image": [[3, (1, 4, 6), 4], [2, (1, 6, 4), 6]],
    "three_images_and_none": [[2, (1, 4, 6), 3, (1, 2, 2), 1, (1, 6, 8), 2], [11]],
    # longer than one causal query block (64 on the CPU): the training forward runs in blocks
    "long": [[70, (1, 4, 6), 80], [140]],
}


@nnx.jit
def _jitted_logprobs(model, inputs, targets):
    return model.token_logprobs(inputs, targets, chunk_size=8)


@jax.jit  # run eagerly, every op of a forward compiles on its own: seconds per test
def _jitted_forward(model, inputs):
    return model.forward(inputs)


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
    """Extra all-padding image rows and longer patch rows (static-shape buckets) leave the logits unchanged, with
    the einsum attention (a mask) and the fused one (each image row's length; "xla" here, "cudnn" on a GPU)."""
    hf, folder = hf_checkpoint
    model = qwen3_vl.from_pretrained(folder)
    batch = make_batch(hf.config, CASES["one_image"], padding="right")
    tight = qwen3_vl.prepare_inputs(model.config, **batch)
    roomy = qwen3_vl.prepare_inputs(model.config, **batch, num_image_rows=4, patches_per_image=40)
    assert roomy.pixel_patches_nlp.shape[:2] == (4, 40)
    a = np.asarray(_jitted_forward(model, jax.tree.map(jnp.asarray, tight)))
    b = np.asarray(_jitted_forward(model, jax.tree.map(jnp.asarray, roomy)))
    np.testing.assert_allclose(a, b, atol=1e-5)
    fused = np.asarray(_jitted_forward(qwen3_vl.from_pretrained(folder).use_fused_attention_("xla"),
                                       jax.tree.map(jnp.asarray, roomy)))
    real = batch["attention_mask"].astype(bool)
    np.testing.assert_allclose(fused[real], a[real], atol=1e-4)


def test_processor_outputs_match_transformers(tmp_path):
    """Real processor outputs (chat template, tools, images in user and tool turns) through both models."""
    from PIL import Image

    from axpo_jax.data.processor import load_processor
    from axpo_jax.data.tiny_processor import build_tiny_processor
    from axpo_jax.tools.schemas import IMAGE_ZOOM_IN

    from .conftest import build_hf_checkpoint

    special = build_tiny_processor(tmp_path, patch_size=8, min_pixels=16 * 16, max_pixels=64 * 64)
    hf = build_hf_checkpoint(tmp_path, seed=5, vocab_size=special["vocab_size"], patch_size=8,
                             num_position_embeddings=64, special_token_ids=special)
    processor = load_processor(tmp_path)
    processor.tokenizer.padding_side = "left"
    rng = np.random.default_rng(0)

    def image(w, h):
        return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))

    call = {"name": "image_zoom_in", "arguments": {"bbox_2d": [0, 0, 500, 500], "label": "corner"}}
    conversations = [
        [
            {"role": "user", "content": [{"type": "image", "image": image(48, 32)},
                                         {"type": "image", "image": image(24, 40)},
                                         {"type": "text", "text": "Compare the two pictures."}]},
        ],
        [
            {"role": "user", "content": [{"type": "image", "image": image(40, 40)},
                                         {"type": "text", "text": "What is in the corner?"}]},
            {"role": "assistant", "content": "<think>\nzoom\n</think>\n", "tool_calls": [{"function": call}]},
            {"role": "tool", "content": [{"type": "image", "image": image(32, 24)},
                                         {"type": "text", "text": "zoomed"}]},
        ],
    ]
    batch = processor.apply_chat_template(
        conversations, tools=[IMAGE_ZOOM_IN], add_generation_prompt=True, tokenize=True, return_dict=True,
        return_tensors="np", processor_kwargs={"padding": True},
    )
    assert len(batch["image_grid_thw"]) == 4 and batch["attention_mask"].min() == 0
    batch = {k: np.asarray(v) for k, v in batch.items()}
    reference = hf_logits(hf, batch)
    model = qwen3_vl.from_pretrained(tmp_path)
    logits = np.asarray(model(**batch))
    real = batch["attention_mask"].astype(bool)
    assert np.abs(logits - reference)[real].max() <= TOL


def test_decoding_copy_computes_the_same_step(hf_checkpoint):
    """`for_decoding` (weights stored [in, out], q/k/v and gate/up fused) changes layouts only: a decode step from
    the same cache gives the model's logits and cache, and the model itself is left as it was."""
    from axpo_jax.models.qwen3_vl.model import KVCache

    hf, folder = hf_checkpoint
    model = qwen3_vl.from_pretrained(folder)
    copy = model.for_decoding()
    fused = copy.model.language_model.layers[0]
    assert fused.self_attn.q_proj is None and fused.self_attn.qkv_proj.in_out and fused.mlp.gate_up_proj.in_out
    assert model.model.language_model.layers[0].self_attn.qkv_proj is None
    batch = make_batch(hf.config, CASES["one_image"], padding="right")
    inputs = jax.tree.map(jnp.asarray, qwen3_vl.prepare_inputs(model.config, **batch))
    logits, cache = nnx.jit(lambda m: m.extend(inputs, KVCache.empty(m.config.text, 2, 64)))(model)
    tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    decode_step = nnx.jit(lambda m, tokens, cache: m.decode_step(tokens, cache))
    want_logits, want_cache = decode_step(model, tokens, cache)
    got_logits, got_cache = decode_step(copy, tokens, cache)
    np.testing.assert_allclose(np.asarray(got_logits), np.asarray(want_logits), atol=1e-5)
    for got, want in zip(jax.tree.leaves(got_cache), jax.tree.leaves(want_cache)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)


def test_causal_blocks_give_the_same_attention():
    """Query blocks against keys up to each block's end (`causal_attention`) = one piece, values and gradients, at
    every query that attends to some key (a padded query's row attends to none: its output is never read)."""
    from axpo_jax.models.qwen3_vl.model import attention, causal_attention

    b, t, h, k, e = 2, 150, 4, 2, 16
    keys = jax.random.split(jax.random.key(0), 3)
    q_bthe = jax.random.normal(keys[0], (b, t, h, e))
    k_bkes = jax.random.normal(keys[1], (b, k, e, t))
    v_bkse = jax.random.normal(keys[2], (b, k, t, e))
    real_bt = jnp.arange(t)[None] < jnp.array([[t], [97]])  # the second row right-padded
    mask_bts = jnp.tril(jnp.ones((t, t), bool))[None] & real_bt[:, None, :]
    weights_bthe = jax.random.normal(jax.random.key(1), (b, t, h * e)) * real_bt[..., None]

    def loss(fn, *qkv):
        return (fn(*qkv) * weights_bthe).sum()

    whole = jax.jit(attention)(q_bthe, k_bkes, v_bkse, mask_bts)
    blocked = jax.jit(causal_attention, static_argnums=4)(q_bthe, k_bkes, v_bkse, mask_bts, 64)  # 64, 64, 22
    assert np.abs(np.asarray(blocked - whole))[np.asarray(real_bt)].max() < 1e-5
    grads_whole = jax.jit(jax.grad(lambda *a: loss(lambda *x: attention(*x, mask_bts), *a), argnums=(0, 1, 2)))(
        q_bthe, k_bkes, v_bkse)
    grads_blocked = jax.jit(jax.grad(lambda *a: loss(lambda *x: causal_attention(*x, mask_bts, 64), *a),
                                     argnums=(0, 1, 2)))(q_bthe, k_bkes, v_bkse)
    for g_whole, g_blocked in zip(grads_whole, grads_blocked):
        assert np.abs(np.asarray(g_blocked - g_whole)).max() < 1e-4
    # a block of the whole length, or none, is the one-piece computation
    assert np.array_equal(jax.jit(causal_attention, static_argnums=4)(q_bthe, k_bkes, v_bkse, mask_bts, 0), whole)


def test_query_block_defaults_and_override():
    from axpo_jax.models.qwen3_vl.model import causal_query_block, causal_query_blocks

    assert jax.default_backend() == "cpu"
    assert [causal_query_block(t) for t in (64, 1024, 1040, 4096)] == [64, 64, 65, 256]
    with causal_query_blocks(0):  # what the memory plan compiles: an accelerator's one piece
        assert causal_query_block(4096) == 0
        with causal_query_blocks(128):
            assert causal_query_block(4096) == 128
        assert causal_query_block(4096) == 0
    assert causal_query_block(4096) == 256


def test_fused_attention_matches_transformers_and_the_einsum_path(hf_checkpoint):
    """`use_fused_attention_` (jax.nn.dot_product_attention with is_causal + kv lengths; "xla" here, the form a GPU
    runs as "cudnn") on right-padded rows: log-probs as transformers', gradients through remat as the einsum
    attention's, and a prompt into an empty cache gives the same logits and cache."""
    from axpo_jax.models.qwen3_vl.model import KVCache

    hf, folder = hf_checkpoint
    einsum_model = qwen3_vl.from_pretrained(folder)
    fused_model = qwen3_vl.from_pretrained(folder).use_fused_attention_("xla")
    batch = make_batch(hf.config, CASES["long"], padding="right")
    real = batch["attention_mask"].astype(bool)
    inputs = jax.tree.map(jnp.asarray, qwen3_vl.prepare_inputs(fused_model.config, **batch))
    targets = np.roll(batch["input_ids"], -1, axis=1)
    reference = hf_logits(hf, batch)
    ref_logprobs = np.take_along_axis(jax.nn.log_softmax(reference, -1), targets[..., None], -1)[..., 0]
    logprobs = np.asarray(_jitted_logprobs(fused_model, inputs, jnp.asarray(targets, jnp.int32)))
    assert np.isfinite(logprobs).all()  # padding queries stay finite, so a masked loss cannot pick up a NaN
    assert np.abs(logprobs - ref_logprobs)[real].max() <= TOL

    weights_bt = jnp.asarray(real, jnp.float32)

    @nnx.jit
    def grads(model):
        def loss(m):
            return (m.token_logprobs(inputs, jnp.asarray(targets, jnp.int32), chunk_size=64, remat=True)
                    * weights_bt).sum()
        return nnx.grad(loss)(model)

    for g_fused, g_einsum in zip(jax.tree.leaves(grads(fused_model)), jax.tree.leaves(grads(einsum_model))):
        np.testing.assert_allclose(np.asarray(g_fused), np.asarray(g_einsum), atol=2e-4, rtol=1e-3)

    empty = KVCache.empty(fused_model.config.text, 2, 512)
    extend = nnx.jit(lambda model: model.extend(inputs, empty, empty_cache=True))
    want_logits, want_cache = extend(einsum_model)
    got_logits, got_cache = extend(fused_model)
    np.testing.assert_allclose(np.asarray(got_logits), np.asarray(want_logits), atol=1e-4)
    np.testing.assert_array_equal(got_cache.length_b, want_cache.length_b)
    np.testing.assert_array_equal(got_cache.next_position_b, want_cache.next_position_b)
    filled_bs = np.arange(empty.capacity)[None] < np.asarray(want_cache.length_b)[:, None]  # slots past a row's
    for got, want in zip(got_cache.keys, want_cache.keys):  # length hold padding, never read, rewritten later
        np.testing.assert_allclose(np.moveaxis(np.asarray(got), 3, 1)[filled_bs],
                                   np.moveaxis(np.asarray(want), 3, 1)[filled_bs], atol=1e-4)
    for got, want in zip(got_cache.values, want_cache.values):
        np.testing.assert_allclose(np.moveaxis(np.asarray(got), 2, 1)[filled_bs],
                                   np.moveaxis(np.asarray(want), 2, 1)[filled_bs], atol=1e-4)


def test_attention_setting_resolves_per_backend_and_dtype():
    assert jax.default_backend() == "cpu"
    assert qwen3_vl.fused_attention_for("auto", jnp.bfloat16) is None  # cuDNN needs a GPU
    assert qwen3_vl.fused_attention_for("einsum", jnp.bfloat16) is None
    assert qwen3_vl.fused_attention_for("xla", jnp.float32) == "xla"
    with pytest.raises(ValueError, match="needs an NVIDIA GPU"):
        qwen3_vl.fused_attention_for("cudnn", jnp.bfloat16)
    with pytest.raises(ValueError, match="attention must be one of"):
        qwen3_vl.fused_attention_for("flash", jnp.bfloat16)
    # planned for another machine (the memory plan): cuDNN on a GPU in bf16 only
    assert qwen3_vl.fused_attention_for("auto", jnp.bfloat16, backend="gpu") == "cudnn"
    assert qwen3_vl.fused_attention_for("auto", jnp.float32, backend="gpu") is None
    assert qwen3_vl.fused_attention_for("auto", jnp.bfloat16, backend="tpu") is None
    # splash: a TPU kernel, interpreted here; never picked by "auto" (not run on a TPU yet)
    assert qwen3_vl.fused_attention_for("splash", jnp.float32) == "splash"
    assert qwen3_vl.fused_attention_for("splash", jnp.bfloat16, backend="tpu") == "splash"
    with pytest.raises(ValueError, match="attention='splash' is a TPU kernel"):
        qwen3_vl.fused_attention_for("splash", jnp.bfloat16, backend="gpu")


def _einsum_causal_reference(q_bthe, k_btke, v_btke, kv_len_b):
    b, t, h, e = q_bthe.shape
    kv_heads = k_btke.shape[2]
    scores = jnp.einsum("btkge,bske->bkgts", q_bthe.reshape(b, t, kv_heads, h // kv_heads, e), k_btke) * e**-0.5
    visible_bts = jnp.tril(jnp.ones((t, t), bool))[None] & (jnp.arange(t)[None, None] < kv_len_b[:, None, None])
    probs = jax.nn.softmax(jnp.where(visible_bts[:, None, None], scores, -1e30), -1)
    return jnp.einsum("bkgts,bske->btkge", probs, v_btke).reshape(b, t, h * e)


def test_splash_attention_matches_causal_attention_on_padded_rows():
    """Pallas' TPU splash kernel, interpreted on the CPU: right-padded rows of 96 tokens (padded inside to the
    kernel's 128-wide tiles), 4 query heads over 2 kv heads; rows of 96, 50, 1 and 0 real tokens. Real queries'
    outputs and every gradient through them equal a masked einsum attention's."""
    from axpo_jax.models.qwen3_vl.model import splash_causal_attention

    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((4, 96, heads, 16)), jnp.float32) for heads in (4, 2, 2))
    kv_len_b = jnp.asarray([96, 50, 1, 0], jnp.int32)
    real_bt = jnp.arange(96)[None] < kv_len_b[:, None]
    out = jax.jit(splash_causal_attention)(q, k, v, kv_len_b)
    np.testing.assert_allclose(np.asarray(out)[np.asarray(real_bt)],
                               np.asarray(_einsum_causal_reference(q, k, v, kv_len_b))[np.asarray(real_bt)],
                               atol=1e-5)
    assert np.isfinite(np.asarray(out)).all()  # padding queries too

    def loss(attend):
        return lambda q, k, v: ((attend(q, k, v, kv_len_b) * real_bt[..., None]) ** 2).sum()

    got = jax.jit(jax.grad(loss(splash_causal_attention), argnums=(0, 1, 2)))(q, k, v)
    want = jax.grad(loss(_einsum_causal_reference), argnums=(0, 1, 2))(q, k, v)
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-4)


def _right_padded_rows_with_an_image():
    """A tiny config, and the ModelInputs and next-token targets of two right-padded rows (20 tokens with an
    image, 40 of text)."""
    from axpo_jax.models.qwen3_vl.tiny import tiny_config_dict

    config = qwen3_vl.Qwen3VLConfig.from_dict(tiny_config_dict())
    rng = np.random.default_rng(1)
    image = [config.vision_start_token_id] + [config.image_token_id] * 6 + [config.vision_end_token_id]
    ids = np.zeros((2, 40), np.int64)
    mask = np.zeros_like(ids)
    ids[0, :20], mask[0, :20] = np.r_[rng.integers(0, 200, 4), image, rng.integers(0, 200, 8)], 1
    ids[1, :40], mask[1, :40] = rng.integers(0, 200, 40), 1
    batch = dict(input_ids=ids, attention_mask=mask, image_grid_thw=np.array([[1, 4, 6]]),
                 pixel_values=rng.standard_normal((24, config.vision.patch_dim)).astype(np.float32))
    inputs = jax.tree.map(jnp.asarray, qwen3_vl.prepare_inputs(config, **batch))
    return config, inputs, jnp.asarray(np.roll(ids, -1, 1), jnp.int32)


def test_splash_model_matches_the_einsum_model():
    """A whole model with attention="splash" (the decoder; the vision tower keeps its einsums): the same
    log-probs and gradients through remat as the einsum model on right-padded rows with an image, and the same
    prompt logits and KV cache."""
    from axpo_jax.models.qwen3_vl.model import KVCache

    hf_like, inputs, targets = _right_padded_rows_with_an_image()
    einsum_model = random_model(hf_like)
    splash_model = random_model(hf_like).use_fused_attention_("splash")
    assert splash_model.model.visual.fused_attention is None
    mask = np.asarray(inputs.attention_mask_bt)
    weights_bt = jnp.asarray(mask, jnp.float32)

    @nnx.jit
    def logprobs_and_grads(model):
        def loss(m):
            logp = m.token_logprobs(inputs, targets, chunk_size=64, remat=True)
            return (logp * weights_bt).sum(), logp
        return nnx.grad(loss, has_aux=True)(model)

    want_grads, want_logp = logprobs_and_grads(einsum_model)
    got_grads, got_logp = logprobs_and_grads(splash_model)
    real = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(got_logp)[real], np.asarray(want_logp)[real], atol=1e-4)
    for g, w in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=2e-4, rtol=1e-3)
    empty = KVCache.empty(hf_like.text, 2, 64)
    extend = nnx.jit(lambda model: model.extend(inputs, empty, empty_cache=True))
    want_logits, want_cache = extend(einsum_model)
    got_logits, got_cache = extend(splash_model)
    np.testing.assert_allclose(np.asarray(got_logits), np.asarray(want_logits), atol=1e-4)
    np.testing.assert_array_equal(np.asarray(got_cache.length_b), np.asarray(want_cache.length_b))


def test_splash_model_exports_a_tpu_program():
    """On a machine without a TPU, the gradient of a splash model's log-probs (remat on) exports for a TPU with
    Pallas' Mosaic kernels in it: splash's forward and both backward kernels, with the vmaps over rows and kv
    heads lowered onto them. Without `splash_traced_for_tpu` the same export holds the interpreted form and no
    kernel. Mosaic compiles the kernels on the TPU itself: this checks their lowering, not their compile or
    their numbers."""
    from axpo_jax.models.qwen3_vl.model import splash_traced_for_tpu

    config, inputs, targets = _right_padded_rows_with_an_image()
    graph, params = nnx.split(random_model(config).use_fused_attention_("splash"))

    def exported_kernels(for_tpu: bool) -> set[str]:
        def logprob_grads(params, inputs, targets):  # a new function per call: jit keeps traces per function
            def total(p):
                return nnx.merge(graph, p).token_logprobs(inputs, targets, chunk_size=64, remat=True).sum()
            return jax.grad(total)(params)

        with splash_traced_for_tpu() if for_tpu else contextlib.nullcontext():
            exported = jax.export.export(jax.jit(logprob_grads), platforms=["tpu"])(params, inputs, targets)
        return set(re.findall(r'kernel_name = "(\w+)"', exported.mlir_module()))

    assert exported_kernels(True) == {"splash_mqa_fwd_segmented_residuals", "splash_mqa_dq_segmented_no_residuals",
                                      "splash_mqa_dkv_segmented_no_residuals"}
    assert exported_kernels(False) == set()
