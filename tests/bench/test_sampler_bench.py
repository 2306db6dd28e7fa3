"""The rollout benchmark modes (bench_sampler, bench_fork, bench_decode_window, bench_tool_overlap) on micro sizes."""

import ml_collections
import numpy as np
import pytest

from axpo_jax.bench import forward, sampler


def _config(**fields):
    return ml_collections.ConfigDict(dict(seed=0, **fields))


def test_sampler_bench_micro_matches_generate():
    pytest.importorskip("torch")
    record = sampler.run_sampler(_config(mode="bench_sampler", preset="micro", batch=2, prompt_len=16,
                                         image_size=32, new_tokens=8, repeats=1, min_identical_rows=1.0,
                                         torch_threads=1))
    expected = {"flax_compile_s", "torch_median_s", "flax_median_s", "flax_extend_median_s", "flax_decode_median_s",
                "torch_prefill_median_s", "torch_tokens_per_s", "flax_tokens_per_s", "flax_over_torch_tokens_per_s",
                "flax_decode_only_tokens_per_s", "torch_decode_only_tokens_per_s", "identical_rows_fraction",
                "host", "num_params", "decode_products_only_s", "flax_decode_over_products_only",
                "flax_over_torch_bound_if_only_products", "flax_over_torch_decode_only_bound_if_only_products",
                "host_blas_weights_step_s", "flax_over_torch_bound_at_host_blas_speed"}
    assert expected <= set(record)
    assert record["identical_rows_fraction"] == 1.0 and record["first_differing_step_per_bad_row"] == []
    assert record["generated_tokens"] == 16 and record["image_tokens_per_prompt"] == 4
    assert record["flax_traces"] == {"extend": 1, "decode": 1} and not record["flax_retraced_while_timing"]
    assert record["flax_median_s"] > 0 and record["torch_median_s"] > 0 and record["flax_decode_median_s"] > 0
    assert record["decode_products_only_s"] > 0 and record["host_blas_weights_step_s"] > 0  # JAX runs on the CPU


def test_sampler_bench_micro_eval_sampling_times_the_draw():
    pytest.importorskip("torch")
    record = sampler.run_sampler(_config(mode="bench_sampler", preset="micro", batch=2, prompt_len=16,
                                         image_size=32, new_tokens=8, repeats=1, min_identical_rows=1.0,
                                         torch_threads=1, sampling="eval"))
    assert record["sampling_params"] == dict(temperature=0.7, top_p=0.8, top_k=20, presence_penalty=1.5)
    assert record["identical_rows_fraction"] is None  # sampled tokens are not compared
    assert record["draw_ms_per_step"] > 0 and record["whole_vocabulary_draw_ms_per_step"] > 0
    with pytest.raises(forward.BenchError, match="sampling must be one of"):
        sampler.run_sampler(_config(mode="bench_sampler", preset="micro", batch=2, prompt_len=16, image_size=32,
                                    new_tokens=8, repeats=1, sampling="beam"))


def test_decode_step_bytes_by_hand():
    """Weights once + each row's filled K and V, for a made-up 2-layer decoder in bf16 and fp32."""
    from axpo_jax.models.qwen3_vl.config import Qwen3VLConfig
    from axpo_jax.models.qwen3_vl.tiny import tiny_config_dict

    text = Qwen3VLConfig.from_dict(tiny_config_dict(
        vocab_size=100, hidden_size=8, intermediate_size=12, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=4, mrope_section=(0, 1, 1), deepstack_visual_indexes=(0,))).text
    # per layer: q 8*2*4, o 2*4*8, k and v 8*1*4 each, mlp 3*8*12 -> 64+64+32+32+288 = 480; x2 layers + head 8*100
    weights = 2 * 480 + 800
    kv_per_token = 2 * 2 * 1 * 4  # K and V, 2 layers, 1 kv head of 4
    assert sampler.decode_step_bytes(text, dtype="bfloat16", batch=3, mean_context=10) == 2 * (weights + 3 * 10 * kv_per_token)
    assert sampler.decode_step_bytes(text, dtype="float32", batch=1, mean_context=5) == 4 * (weights + 5 * kv_per_token)


def test_accelerator_presets_and_ceilings():
    config = forward.hf_config_dict("2b")
    assert config["tie_word_embeddings"] and config["text_config"]["rope_parameters"]["mrope_section"] == [24, 20, 20]
    assert not forward.hf_config_dict("tiny")["tie_word_embeddings"]
    assert forward.device_copy_gbps() is None  # the CPU has no device memory to measure
    assert forward.torch_device_for("auto") == "cpu" and forward.torch_device_for("cuda") == "cuda"


def test_fork_bench_micro_tokens_agree():
    record = sampler.run_fork(_config(mode="bench_fork", preset="micro", prefixes=2, k=2, prefix_len=32,
                                      num_images=1, image_size=32, new_tokens=4, repeats=1,
                                      fork_in_place=False))  # one compile less; its tokens are checked the same way
    assert record["rows"] == 4
    assert record["identical_rows_fraction"] == {"fork": 1.0, "re_prefill": 1.0}
    assert record["rows_of_a_prefix_agree"]
    assert record["prefill_tokens"] == {"fork": 64, "re_prefill": 128}
    for name in ("fork", "re_prefill"):
        assert set(record["median_s"][name]) == {"prefill", "decode", "total"}
        assert record["median_s"][name]["prefill"] > 0
    assert {"re_prefill_over_fork_prefill", "re_prefill_over_fork_total", "re_prefill_over_fork_prefill_best_run",
            "re_prefill_over_fork_total_best_run", "noisy", "host"} <= set(record)
    assert not record["retraced_while_timing"]


def test_decode_window_bench_micro_same_tokens_smaller_windows():
    record = sampler.run_decode_window(_config(mode="bench_decode_window", preset="micro", batch=2, prompt_len=16,
                                               image_size=32, max_new_tokens=96, capacity=128, stop_near=40,
                                               repeats=1))
    assert record["identical_rows_fraction"] == 1.0
    assert max(record["tokens_per_row"]) <= 41  # every row ends at its token of step 40 or earlier
    assert record["window_whole_turn"] == 128 and record["windows_growing"] == [64]
    assert record["traces"]["whole_turn"] == {"decode": 1} and not record["retraced_while_timing"]
    assert record["median_s"]["growing"] > 0 and record["whole_turn_over_growing"] > 0


def test_tool_overlap_micro_pipelined_loop_hides_tool_time():
    record = sampler.run_tool_overlap(_config(mode="bench_tool_overlap", tasks=1, samples=2, tool_turns=1,
                                              tool_sleep_s=0.05, think_tokens=4, capacity=1024, repeats=1,
                                              pipeline_groups=2))
    assert record["rows"] == 2 and record["policy_turns"] == 2 and record["pipeline_groups"] == 2
    sync, piped = record["synchronous"], record["pipelined"]
    for r in (sync, piped):
        assert {"wall_s", "device_s", "tool_s", "overlap", "overlap_measured", "host_other_s"} <= set(r)
        assert r["device_s"] > 0 and r["tool_call_s_sum"] >= 0.1
    assert sync["sampler_calls"] == 4  # prompt extend, decode, observation extend, decode
    assert piped["sampler_calls"] == 8  # the same per group of one row
    assert 0.05 <= sync["tool_s"] < 0.05 + 0.5  # the two rows' calls run concurrently
    assert sync["wall_s"] >= sync["device_s"] + sync["tool_s"] - 1e-3
    assert sync["overlap_measured"] == 0.0 and sync["overlap"] <= 1e-3  # decode, then tools, then extend
    # group 1 decodes while group 0's tool sleeps
    assert piped["overlap_measured"] > 0 and record["overlap"] == piped["overlap"]
    assert record["synchronous_over_pipelined_wall"] > 0
    assert not record["retraced_while_timing"]


def test_interval_arithmetic():
    a = [(0.0, 1.0), (0.5, 2.0), (3.0, 4.0)]
    b = [(1.5, 3.5)]
    assert sampler._union(a) == [(0.0, 2.0), (3.0, 4.0)]
    assert sampler._length(a) == pytest.approx(3.0)
    assert sampler._intersection(a, b) == pytest.approx(1.0)
    assert sampler._intersection(b, a) == pytest.approx(1.0)
    assert sampler._intersection(a, [(5.0, 6.0)]) == 0.0


def test_take_rows_repeats_prefixes_with_their_images():
    hf = forward.hf_config_dict("micro")
    batch, _ = forward.make_batch(hf, batch=2, seq_len=32, num_images=2, image_size=32, seed=0)
    batch["pixel_values"][:32] = 0.0  # prefix 0's two images (16 patches each): zeros; prefix 1's stay random
    copies = sampler._take_rows(batch, [1, 0, None])
    np.testing.assert_array_equal(copies["input_ids"][:2], batch["input_ids"][[1, 0]])
    assert copies["attention_mask"][2].sum() == 0 and len(copies["image_grid_thw"]) == 4
    np.testing.assert_array_equal(copies["pixel_values"][:32], batch["pixel_values"][32:])
    assert not copies["pixel_values"][32:].any() and batch["pixel_values"][32:].all()


def test_mismatch_fails_loudly(capsys):
    with pytest.raises(forward.BenchError, match="differ"):
        sampler._fail_unless(False, {"identical_rows_fraction": 0.5}, "tokens differ")
    assert '"identical_rows_fraction": 0.5' in capsys.readouterr().err


def test_late_stop_tokens_end_rows_between_half_and_stop_near():
    tokens_bn = np.array([[1, 2, 3, 4, 5, 6, 7],
                          [2, 1, 2, 9, 4, 9, 8],
                          [1, 1, 1, 1, 1, 1, 1]])  # the last row only repeats itself: it gets no stop
    # steps 0-1 hold {1, 2}; from step 2 to 6 row 0 last writes 7, row 1 last writes 8 (9 appears earlier in it)
    assert sampler.late_stop_tokens(tokens_bn, stop_near=6) == [7, 8]
    # by step 4 row 0 last writes 5 and row 1 writes 4 (row 0 will end at its step 3, on row 1's stop)
    assert sampler.late_stop_tokens(tokens_bn, stop_near=4) == [4, 5]
