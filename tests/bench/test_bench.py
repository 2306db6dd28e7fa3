"""The benchmark modes on micro models, in-process on the default (1-device) CPU backend."""

import math

import ml_collections
import pytest

from axpo_jax.bench import forward, memory
from tests.config_files import load_config


def _forward_config(**overrides):
    config = ml_collections.ConfigDict(
        dict(mode="bench_forward", seed=0, preset="micro", batch=1, seq_len=32, num_images=1, image_size=32,
             repeats=1, max_logits_diff=1e-4)
    )
    config.update(overrides)
    return config


def test_forward_bench_micro_matches_transformers():
    pytest.importorskip("torch")
    record = forward.run(_forward_config())
    expected = {"flax_compile_s", "torch_median_s", "flax_median_s", "torch_tokens_per_s", "flax_tokens_per_s",
                "flax_over_torch_tokens_per_s", "max_abs_logits_diff", "logits_diff_ok", "host", "num_params"}
    assert expected <= set(record)
    assert record["tokens"] == 32 and record["image_tokens_per_image"] == 4
    assert record["max_abs_logits_diff"] < 1e-4 and record["logits_diff_ok"]
    assert record["flax_median_s"] > 0 and record["torch_median_s"] > 0
    assert {"cpu_count", "jax_backend", "versions", "guest_halt_poll_ns"} <= set(record["host"])


def test_bf16_reference_keeps_float32_rope_frequencies():
    """The torch side of a bf16 benchmark is built as from_pretrained(dtype=bfloat16) builds it: weights in bf16,
    rope frequencies in float32 (`.to(bfloat16)` alone rounds them, and the reference's angles drift with position),
    and the Flax side gets the same weights."""
    import numpy as np
    import torch

    hf_model, flax_model, _ = forward.build_models("micro", 0, log=lambda m: None, dtype="bfloat16")
    rope = {name: buf for name, buf in hf_model.named_buffers() if name.endswith("inv_freq")}
    assert len(rope) >= 2  # the text decoder's and the vision tower's
    assert all(buf.dtype == torch.float32 for buf in rope.values())
    text = rope["model.language_model.rotary_emb.inv_freq"]
    dim = hf_model.config.text_config.head_dim
    exact = 1.0 / hf_model.config.text_config.rope_parameters["rope_theta"] ** (np.arange(0, dim, 2) / dim)
    np.testing.assert_allclose(text.numpy(), exact, rtol=1e-6)
    assert next(hf_model.parameters()).dtype == torch.bfloat16
    assert str(flax_model.model.language_model.embed_tokens.weight[...].dtype) == "bfloat16"


def test_host_info_reads_the_vms_halt_polling(tmp_path, monkeypatch):
    # the decode's timings on a VM depend on it (README, Benchmarks): a record must say what the host had
    setting = tmp_path / "guest_halt_poll_ns"
    setting.write_text("200000\n")
    monkeypatch.setattr(forward, "_HALT_POLL_NS", str(setting))
    assert forward.host_info(None, None)["guest_halt_poll_ns"] == 200000
    monkeypatch.setattr(forward, "_HALT_POLL_NS", str(tmp_path / "absent"))  # not a haltpoll guest
    assert forward.host_info(None, None)["guest_halt_poll_ns"] is None


def test_forward_bench_batch_layout():
    hf = forward.hf_config_dict("micro")
    inputs, image_tokens = forward.make_batch(hf, batch=2, seq_len=32, num_images=2, image_size=32, seed=0)
    assert image_tokens == 4
    ids, types = inputs["input_ids"], inputs["mm_token_type_ids"]
    assert ((ids == hf["image_token_id"]) == (types == 1)).all()
    assert (types.sum(1) == 2 * image_tokens).all()
    assert ((ids == hf["vision_start_token_id"]).sum(1) == 2).all() and ((ids == hf["vision_end_token_id"]).sum(1) == 2).all()
    assert inputs["pixel_values"].shape == (4 * 16, 3 * 2 * 8 * 8) and inputs["image_grid_thw"].tolist() == [[1, 4, 4]] * 4
    with pytest.raises(forward.BenchError, match="too short"):
        forward.make_batch(hf, batch=1, seq_len=8, num_images=2, image_size=32, seed=0)


def _expected_param_count(cfg) -> int:
    """Qwen3-VL's parameter count from its config, written out independently of the model code."""
    t, v = cfg.text, cfg.vision
    d, e = t.hidden_size, t.head_dim
    attn = d * e * (t.num_attention_heads * 2 + t.num_key_value_heads * 2) + 2 * e
    if t.attention_bias:
        attn += e * (t.num_attention_heads * 2 + t.num_key_value_heads * 2) - e * t.num_attention_heads + d
    layer = attn + 3 * d * t.intermediate_size + 2 * d
    text = t.vocab_size * d * (1 if cfg.tie_word_embeddings else 2) + d + t.num_hidden_layers * layer
    dv, merged = v.hidden_size, v.hidden_size * v.spatial_merge_size**2
    block = 4 * dv + (3 * dv * dv + 3 * dv) + (dv * dv + dv) + 2 * v.intermediate_size * dv + v.intermediate_size + dv
    merger_fc = merged * merged + merged + v.out_hidden_size * merged + v.out_hidden_size
    vision = (dv * v.patch_dim + dv) + v.num_position_embeddings * dv + v.depth * block
    vision += (2 * dv + merger_fc) + len(v.deepstack_visual_indexes) * (2 * merged + merger_fc)
    return text + vision


def test_param_count_formula_matches_published_8b():
    assert _expected_param_count(memory.config_for("8b")) == 8_767_123_696


def test_memory_plan_micro_one_device():
    config = ml_collections.ConfigDict(
        dict(mode="memory_plan", seed=0, presets=("micro",), mesh=dict(data=1, fsdp=1, tensor=1),
             device_memory_gib=1, seq_len=32, batch_per_device=1, images_per_sample=1, patches_per_image=16,
             kv_cache_tokens=64, logprob_chunk=16, targets=("logits", "token_logprobs"), compile_layers=0)
    )
    record = memory.run(config)
    micro = record["presets"]["micro"]
    assert micro["num_params"] == _expected_param_count(memory.config_for("micro"))
    assert micro["params_bytes"] == micro["num_params"] * 2  # bfloat16, nothing split on one device
    for target in ("logits", "token_logprobs"):
        b = micro["compiled"][target]["bytes"]
        assert b["argument"] > micro["params_bytes"] and b["inputs"] > 0 and b["output"] > 0 and b["temp"] > 0
        assert micro["compiled"][target]["fits"]
    # logits [1, 32, V] in bf16 vs logprobs [1, 32] in f32
    assert micro["compiled"]["logits"]["bytes"]["output"] == 32 * 512 * 2
    assert micro["compiled"]["token_logprobs"]["bytes"]["output"] == 32 * 4
    analytic = micro["analytic"]["bytes"]
    assert analytic["grads"] == micro["params_bytes"] and analytic["adamw_fp32"] == micro["num_params"] * 8
    t = memory.config_for("micro").text
    assert analytic["kv_cache"] == t.num_hidden_layers * 2 * t.num_key_value_heads * t.head_dim * 64 * 1 * 2


def test_shard_bytes_rounds_up_per_split():
    mesh = type("M", (), {"shape": {"data": 1, "fsdp": 4, "tensor": 2}})()
    assert memory.shard_bytes((8, 6), 2, (("tensor",), "fsdp"), mesh) == 4 * 2 * 2
    assert memory.shard_bytes((8, 6), 2, (None, None), mesh) == 8 * 6 * 2
    assert memory.shard_bytes((10,), 4, (), mesh) == 40


def test_memory_config_device_count_follows_mesh_overrides():
    config = load_config("bench", "memory")
    assert config.xla_host_device_count == 8
    config.mesh.fsdp = 2
    config.mesh.tensor = 2
    assert config.xla_host_device_count == 4
    assert math.prod(config.mesh.values()) == 4


def test_memory_plan_extrapolation_path():
    config = ml_collections.ConfigDict(
        dict(mode="memory_plan", seed=0, presets=("tiny",), mesh=dict(data=1, fsdp=1, tensor=1),
             device_memory_gib=1, seq_len=32, batch_per_device=1, images_per_sample=1, patches_per_image=16,
             kv_cache_tokens=64, logprob_chunk=16, targets=("token_logprobs",), compile_layers=2)
    )
    tiny = memory.run(config)["presets"]["tiny"]
    compiled = tiny["compiled"]["token_logprobs"]
    assert compiled["how"] == "extrapolated from 2 and 4 layers (of 4)" and len(compiled["compile_s"]) == 2
    assert compiled["argument_gib"] is None and compiled["bytes"]["temp"] > 0
    assert compiled["bytes"]["total"] >= tiny["params_bytes"]
