"""Mode `compare`: records and a verl log side by side (table, plot), with the verl metrics mapped by hand."""

import json

import ml_collections
import pytest

from axpo_jax.bench import compare, record
from tests.config_files import load_config

# What verl prints (verl.utils.tracking: "step:N - key:value - ...", "%.3f"), as seen through Ray's prefix; step 1
# is the warm-up the medians skip; a validation line and a numpy repr value must not confuse the parser.
VERL_CONSOLE = """\
(TaskRunner pid=2860) Training Progress:   0%|          | 0/3
(TaskRunner pid=2860) step:1 - timing_s/gen:80.000 - timing_s/update_actor:15.000 - timing_s/step:100.000 - perf/mfu/actor:0.050
(TaskRunner pid=2860) step:2 - timing_s/gen:25.000 - timing_s/old_log_prob:2.000 - timing_s/update_actor:10.000 - timing_s/step:40.000 - timing_per_token_ms/gen:0.500 - timing_per_token_ms/update_actor:0.020 - perf/total_num_tokens:64000.000 - perf/time_per_step:40.000 - perf/throughput:200.000 - perf/mfu/actor:0.300 - response_length/mean:np.float64(512.0)
(TaskRunner pid=2860) step:3 - timing_s/gen:27.000 - timing_s/old_log_prob:2.000 - timing_s/update_actor:12.000 - timing_s/step:44.000 - timing_per_token_ms/gen:0.400 - timing_per_token_ms/update_actor:0.025 - perf/total_num_tokens:70400.000 - perf/time_per_step:44.000 - perf/throughput:200.000 - perf/mfu/actor:0.200
(TaskRunner pid=2860) step:3 - val-core/mathvista/acc/mean@1:0.612
"""


def test_parse_verl_console_log():
    steps = compare.parse_verl_log(VERL_CONSOLE)
    assert sorted(steps) == [1, 2, 3]
    assert steps[2]["timing_s/gen"] == 25.0 and steps[2]["response_length/mean"] == 512.0
    assert steps[3]["val-core/mathvista/acc/mean@1"] == 0.612 and steps[3]["timing_s/step"] == 44.0  # merged


def test_verl_record_maps_medians_by_hand():
    r = compare.verl_record(compare.parse_verl_log(VERL_CONSOLE), device_kind="NVIDIA A100-SXM4-80GB")
    assert r.source == "verl" and r.steps == 2  # step 1 skipped
    assert r.step_s == 42.0 and r.rollout_s == 26.0 and r.update_s == 11.0 and r.other_s == 5.0
    assert r.tools_s is None  # verl runs tool calls inside generation
    assert r.rollout_tokens_per_s == pytest.approx(1000 / 0.45)  # median of 0.5 and 0.4 ms per token
    assert r.update_tokens_per_s == pytest.approx(1000 / 0.0225)
    assert r.device_count == 8  # 64000 / (200 * 40) and 70400 / (200 * 44)
    assert r.rollout_tokens_per_s_per_device == pytest.approx(1000 / 0.45 / 8)
    assert r.update_mfu == pytest.approx(0.25)
    assert r.extra["timing_s/old_log_prob"] == 2.0


def test_verl_file_logger_jsonl_reads_the_same():
    lines = [json.dumps({"step": s, "data": m}) for s, m in compare.parse_verl_log(VERL_CONSOLE).items()]
    a = compare.verl_record(compare.parse_verl_log(VERL_CONSOLE))
    b = compare.verl_record(compare.parse_verl_log("\n".join(lines)))
    assert (a.step_s, a.update_tokens_per_s, a.update_mfu, a.device_count) == \
        (b.step_s, b.update_tokens_per_s, b.update_mfu, b.device_count)


def test_verl_log_without_steps_is_an_error(tmp_path):
    with pytest.raises(compare.CompareError, match="no training step lines"):
        compare.verl_record({3: {"val-core/x": 1.0}})
    empty = tmp_path / "empty.log"
    empty.write_text("nothing here\n")
    with pytest.raises(compare.CompareError, match="empty.log has no verl step lines"):
        compare.load_all((), str(empty))
    with pytest.raises(compare.CompareError, match="no record file matches"):
        compare.load_all((str(tmp_path / "missing-*.jsonl"),))
    not_records = tmp_path / "list.json"
    not_records.write_text("[1, 2]")
    with pytest.raises(compare.CompareError, match="list.json does not hold bench records"):
        compare.load_all((str(not_records),))


def test_default_config_reads_a_verl_log_alone(tmp_path):
    config = load_config("compare")
    log = tmp_path / "verl.log"
    log.write_text(VERL_CONSOLE)
    records = compare.load_all(config.records, str(log))
    assert [r.source for r in records] == ["verl"]


def _records(tmp_path):
    tpu = record.make_record(label="axpo v5p-32", device_kind="TPU v5", device_count=16, model_preset="8b",
                             step_s=30.0, rollout_s=20.0, tools_s=3.0, update_s=5.0, rollout_tokens=400_000,
                             update_tokens=2_000_000)
    gpu = record.make_record(label="axpo 8xH100", device_kind="NVIDIA H100 80GB HBM3", device_count=8,
                             model_preset="8b", step_s=50.0, rollout_s=35.0, tools_s=3.0, update_s=10.0)
    path = tmp_path / "bench.jsonl"
    record.write_records([tpu, gpu], path)
    return path


def test_markdown_table_has_one_row_per_record_and_dashes_for_gaps(tmp_path):
    records = compare.load_all((str(_records(tmp_path)),))
    table = compare.markdown_table(records).splitlines()
    assert table[0].startswith("| run | source | device | devices |") and len(table) == 4
    assert "| axpo v5p-32 | axpo_jax | TPU v5 | 16 | 8b | 30.00 | 20.00 | 3.00 | 5.00 | 2.00 | 20,000 |" in table[2]
    assert table[3].count("| - ") >= 4  # the GPU record has no token counts, so no throughput or MFU


def test_compare_mode_writes_table_and_plot(tmp_path):
    log = tmp_path / "verl.log"
    log.write_text(VERL_CONSOLE)
    config = ml_collections.ConfigDict(dict(
        mode="compare", records=(str(tmp_path / "*.jsonl"),), verl_log=str(log), verl_label="verl 8xA100",
        verl_device_kind="NVIDIA A100-SXM4-80GB", verl_device_count=0, verl_skip_steps=1, verl_model_preset="8b",
        output_dir=str(tmp_path / "out")))
    _records(tmp_path)
    result = compare.run(config)
    assert [row["label"] for row in result["rows"]] == ["verl 8xA100", "axpo v5p-32", "axpo 8xH100"]
    assert "| verl 8xA100 | verl | NVIDIA A100-SXM4-80GB | 8 | 8b | 42.00 |" in open(result["table"]).read()
    with open(result["plot"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
