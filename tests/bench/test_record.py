"""Bench records: FLOPs per token and MFU against hand-computed values, the device table, JSON files."""

import json

import pytest

from axpo_jax.bench import devices, record
from axpo_jax.models.qwen3_vl.config import TextConfig

# d=4, 2 query heads and 1 kv head of size 2, MLP width 8, 3 layers, vocabulary 10
TINY = TextConfig(vocab_size=10, hidden_size=4, intermediate_size=8, num_hidden_layers=3, num_attention_heads=2,
                  num_key_value_heads=1, head_dim=2, mrope_section=(1, 0, 0))


def test_flops_per_token_by_hand():
    # per layer: q 4x4 + o 4x4 + k 4x2 + v 4x2 = 48, MLP 3 x 4 x 8 = 96; 3 layers = 432; LM head 4 x 10 = 40
    assert record.decoder_matmul_params(TINY) == 472
    # attention forward per token over 5 keys: 4 * 3 layers * 2 heads * 2 dims * 5 = 240
    assert record.attention_flops_per_token(TINY, 5) == 240
    assert record.train_flops_per_token(TINY, 5) == 6 * 472 + 3 * 240 == 3552
    assert record.inference_flops_per_token(TINY, 7) == 2 * 472 + 4 * 3 * 2 * 2 * 7 == 1280


def test_matmul_params_of_the_8b_preset():
    from axpo_jax.models.qwen3_vl.config import preset

    # per layer 2 x 4096^2 (q, o) + 2 x 4096 x 1024 (k, v) + 3 x 4096 x 12288 (MLP) = 192,937,984; x 36 layers
    # = 6,945,767,424; + LM head 4096 x 151,936 = 622,329,856
    assert record.decoder_matmul_params(preset("8b").text) == 7_568_097_280


def test_device_table_lookup():
    assert devices.lookup("TPU v5").peak_bf16_flops == 459e12  # v5p, as JAX names it
    assert devices.lookup("TPU v5 lite") is devices.TPU_V5E and devices.lookup("TPU v6 lite") is devices.TPU_V6E
    assert devices.lookup("NVIDIA H100 80GB HBM3").peak_bf16_flops == 989e12
    assert devices.lookup("NVIDIA H100 PCIe").peak_bf16_flops == 756e12
    assert devices.lookup("NVIDIA H200").memory_bytes == 141 * 1000**3
    assert devices.lookup("NVIDIA H200 NVL").peak_bf16_flops == 835.5e12  # the PCIe board, slower than the SXM
    assert devices.lookup("NVIDIA A100-SXM4-40GB").memory_bytes == 40 * 1000**3
    assert devices.lookup("NVIDIA A100-SXM4-80GB").peak_bf16_flops == 312e12
    assert devices.lookup("cpu") is None and devices.lookup("TPU v99") is None
    # other boards whose names contain a known model's: not that model's figures
    assert all(devices.lookup(name) is None for name in ("NVIDIA RTX A1000 Laptop GPU", "NVIDIA GH200 480GB",
                                                         "NVIDIA H100 NVL"))
    assert devices.chips_of("v5p-64") == 32 and devices.chips_of("v5litepod-16") == 16
    with pytest.raises(ValueError, match="unknown accelerator type"):
        devices.chips_of("v5p-x")


def test_make_record_derives_throughput_and_mfu():
    r = record.make_record(label="tiny on v5e", device_kind="TPU v5 lite", device_count=2, process_count=1,
                           model_preset="tiny", text_config=TINY, seq_len=5, decode_context=7,
                           step_s=10.0, rollout_s=4.0, tools_s=1.5, update_s=2.0,
                           rollout_tokens=800, update_tokens=1000, steps=3)
    assert r.other_s == pytest.approx(2.5)
    assert r.rollout_tokens_per_s == 200 and r.update_tokens_per_s == 500
    assert r.update_tokens_per_s_per_device == 250 and r.rollout_tokens_per_s_per_device == 100
    assert r.update_flops_per_token == 3552 and r.rollout_flops_per_token == 1280
    assert r.peak_flops_per_device == 197e12
    assert r.update_mfu == pytest.approx(3552 * 500 / (2 * 197e12))
    assert r.rollout_mfu == pytest.approx(1280 * 200 / (2 * 197e12))


def test_unknown_device_gives_unknown_mfu_not_a_guess():
    r = record.make_record(label="x", device_kind="cpu", device_count=1, text_config=TINY, seq_len=5,
                           update_s=1.0, update_tokens=10)
    assert r.update_tokens_per_s == 10 and r.update_flops_per_token == 3552
    assert r.peak_flops_per_device is None and r.update_mfu is None and r.rollout_mfu is None
    assert r.other_s is None  # no step time measured


def test_records_round_trip_through_files(tmp_path):
    a = record.make_record(label="a", device_kind="TPU v5", device_count=4, update_s=1.0, update_tokens=8)
    b = record.make_record(label="b", device_kind="NVIDIA H100 80GB HBM3", device_count=8, extra={"k": 1})
    path = tmp_path / "runs" / "bench.jsonl"
    record.append_jsonl(a, path)
    record.append_jsonl(b, path)
    assert record.read_records(path) == [a, b]
    listed = tmp_path / "list.json"
    listed.write_text(json.dumps([a.to_dict(), b.to_dict()], indent=2))
    assert record.read_records(listed) == [a, b]
    # a captured launch.py stdout: log noise, then the mode's result line wrapping the record
    captured = tmp_path / "stdout.txt"
    captured.write_text("I0101 starting\n{not json\n" + json.dumps({"mode": "bench_rl", "record": a.to_dict()}) + "\n")
    assert record.read_records(captured) == [a]
    # the rl mode's own result line, which holds its record as "bench_record"
    captured.write_text(json.dumps({"algo": "axpo", "steps": 3, "bench_record": b.to_dict()}) + "\n")
    assert record.read_records(captured) == [b]
    # a `launch.py ... 2>&1` capture starts with the mode's "[rl] ..." progress lines, which are not a JSON list
    captured.write_text("[rl] step 1/3\n[rl] step 2/3\n" + json.dumps({"bench_record": a.to_dict()}) + "\n")
    assert record.read_records(captured) == [a]


def test_from_dict_keeps_unknown_fields_and_rejects_non_records():
    raw = dict(label="x", source="axpo_jax", device_kind="TPU v4", device_count=1, future_field=3)
    assert record.BenchRecord.from_dict(raw).extra == {"future_field": 3}
    with pytest.raises(ValueError, match="missing"):
        record.BenchRecord.from_dict({"label": "x"})
