"""Bench records side by side (mode `compare`): a markdown table and a bar plot, optionally with a verl run's log
as the baseline row.

    python launch.py --config configs/compare.py --config.records='("runs/*/bench_records.jsonl",)' \
        [--config.verl_log=path/to/verl.log --config.verl_device_kind="NVIDIA A100-SXM4-80GB"]
"""

import ml_collections


def get_config():
    config = ml_collections.ConfigDict()
    config.mode = "compare"
    config.seed = 0
    # BenchRecord files: .jsonl (one record a line), .json, or a saved launch.py stdout; globs are expanded.
    # Default: none, so a verl log alone can be read; the rl mode writes <workdir>/bench_records.jsonl.
    config.records = ()
    # A verl run's console log or its file-logger JSONL ($VERL_FILE_LOGGER_PATH); "" for none.
    config.verl_log = ""
    config.verl_label = "verl"
    config.verl_device_kind = "unknown (verl log)"  # verl logs do not name the GPU, e.g. "NVIDIA A100-SXM4-80GB"
    config.verl_device_count = 0  # 0: inferred from perf/total_num_tokens / (perf/throughput * perf/time_per_step)
    config.verl_skip_steps = 1  # warm-up steps left out of the medians
    config.verl_model_preset = ""
    config.output_dir = "runs/compare"  # comparison.md and comparison.png
    return config
