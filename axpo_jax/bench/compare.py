"""Mode `compare`: bench records side by side, as a markdown table and a bar plot, with a verl run as a baseline row.

    python launch.py --config configs/compare.py --config.records='("runs/*/bench_records.jsonl",)' \\
        --config.verl_log=verl_console.log --config.verl_device_kind="NVIDIA A100-SXM4-80GB"

Inputs are `bench.record.BenchRecord` files (JSONL, JSON, or a launch.py stdout capture) named by paths or globs,
and optionally one verl run's log. Writes `comparison.md` and `comparison.png` to `output_dir` and returns the
rows.

Reading verl. verl prints one line per training step to the console
(`verl.utils.tracking`, `concat_dict_to_str`: "step:12 - timing_s/gen:41.021 - perf/mfu/actor:0.312 - ...",
values formatted "%.3f") and, with `trainer.logger` including "file", writes the same metrics as JSON lines
`{"step": 12, "data": {...}}` to $VERL_FILE_LOGGER_PATH. Both forms are read. The metrics used, and what they
become (medians over the steps after the first `verl_skip_steps`, which compile and warm up):

  verl metric                          record field                  notes
  timing_s/step                        step_s
  timing_s/gen                         rollout_s                     generation; with verl's agent loop it also
                                                                     contains the tool calls, which run inside it
  timing_s/update_actor                update_s                      the policy update only (old_log_prob and ref
                                                                     are separate timers, kept in extra)
  timing_per_token_ms/gen              rollout_tokens_per_s          1000 / x; verl divides by response tokens
  timing_per_token_ms/update_actor     update_tokens_per_s           1000 / x; verl divides by prompt+response
  perf/mfu/actor                       update_mfu                    verl's FLOPs counter / promised FLOPs
  perf/total_num_tokens, perf/throughput, perf/time_per_step
                                       device_count                  total / (throughput x time); verl's
                                                                     throughput is per GPU
  timing_s/agent_loop/tool_calls/mean  extra (not tools_s)           per trajectory, summed over its turns, not
                                                                     a share of the step's wall time

verl logs do not name the GPU, so `verl_device_kind` says what it was (default "unknown (verl log)"; MFU from
verl's own counter is kept either way).
"""

from __future__ import annotations

import glob
import json
import math
import os
import re
import statistics
import sys
from typing import Any

from axpo_jax import modes
from axpo_jax.bench.record import BenchRecord, read_records

_STEP_LINE = re.compile(r"(?<![\w/])step:(\d+)\s+-\s+(.*)$")
# "key:value" pairs separated by " - "; values may be bare numbers or numpy reprs ("np.float64(0.5)").
_PAIR = re.compile(r"^\s*([^:\s][^:]*?):\s*(?:np\.\w+\()?\s*([-+0-9.eE]+|nan|inf|-inf)\)?\s*$")


class CompareError(modes.ModeError, ValueError):
    """Bad compare inputs (no records found, an unreadable verl log); the message names the file. A ModeError, so
    launch.py prints it as one line."""


# ------------------------------------------------------------------------------------------- verl


def parse_verl_log(text: str) -> dict[int, dict[str, float]]:
    """{step: {metric: value}} from a verl console log or a verl file-logger JSONL (both may be mixed in one
    capture). A step logged on several lines (validation metrics come on their own line) is merged."""
    steps: dict[int, dict[str, float]] = {}
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                raw = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(raw, dict) and "step" in raw:
                data = raw.get("data", {k: v for k, v in raw.items() if k != "step"})
                numbers = {k: float(v) for k, v in data.items() if isinstance(v, (int, float))}
                steps.setdefault(int(raw["step"]), {}).update(numbers)
            continue
        match = _STEP_LINE.search(line)  # console lines may carry a prefix such as "(TaskRunner pid=2860) "
        if not match:
            continue
        metrics = steps.setdefault(int(match.group(1)), {})
        for part in match.group(2).split(" - "):
            pair = _PAIR.match(part)
            if pair:
                metrics[pair.group(1).strip()] = float(pair.group(2))
    return steps


def _median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.median(values) if values else None


def verl_record(steps: dict[int, dict[str, float]], *, label: str = "verl", device_kind: str = "unknown (verl log)",
                device_count: int = 0, skip_steps: int = 1, model_preset: str = "") -> BenchRecord:
    """A BenchRecord from parsed verl steps (see the module docstring for the mapping)."""
    timed = [m for step, m in sorted(steps.items()) if "timing_s/step" in m]
    if len(timed) > skip_steps:
        timed = timed[skip_steps:]
    if not timed:
        raise CompareError("the verl log has no training step lines with timing_s/step")

    def med(key):
        return _median([m.get(key) for m in timed])

    def inverse_ms(key):
        value = med(key)
        return 1000.0 / value if value else None

    if device_count <= 0:
        counts = [m["perf/total_num_tokens"] / (m["perf/throughput"] * m["perf/time_per_step"])
                  for m in timed if m.get("perf/throughput") and m.get("perf/time_per_step")
                  and "perf/total_num_tokens" in m]
        device_count = int(round(_median(counts))) if counts else 0
    step_s, rollout_s, update_s = med("timing_s/step"), med("timing_s/gen"), med("timing_s/update_actor")
    rollout_tps, update_tps = inverse_ms("timing_per_token_ms/gen"), inverse_ms("timing_per_token_ms/update_actor")
    named = [x for x in (rollout_s, update_s) if x is not None]
    extra = {key: med(key) for key in ("timing_s/old_log_prob", "timing_s/ref", "timing_s/reward", "timing_s/adv",
                                       "timing_s/agent_loop/tool_calls/mean", "perf/throughput",
                                       "response_length/mean", "perf/max_memory_allocated_gb")
             if med(key) is not None}
    return BenchRecord(
        label=label, source="verl", device_kind=device_kind, device_count=device_count, process_count=0,
        model_preset=model_preset, step_s=step_s, rollout_s=rollout_s, tools_s=None, update_s=update_s,
        other_s=step_s - sum(named) if step_s is not None and named else None,
        rollout_tokens_per_s=rollout_tps, update_tokens_per_s=update_tps,
        rollout_tokens_per_s_per_device=rollout_tps / device_count if rollout_tps and device_count else None,
        update_tokens_per_s_per_device=update_tps / device_count if update_tps and device_count else None,
        update_mfu=med("perf/mfu/actor"), steps=len(timed),
        notes="from a verl log: rollout_s includes tool calls (verl runs them inside generation)", extra=extra,
    )


# ------------------------------------------------------------------------------------------- table and plot

_COLUMNS = [  # (header, field, format)
    ("run", "label", "{}"),
    ("source", "source", "{}"),
    ("device", "device_kind", "{}"),
    ("devices", "device_count", "{}"),
    ("model", "model_preset", "{}"),
    ("step s", "step_s", "{:.2f}"),
    ("rollout s", "rollout_s", "{:.2f}"),
    ("tools s", "tools_s", "{:.2f}"),
    ("update s", "update_s", "{:.2f}"),
    ("other s", "other_s", "{:.2f}"),
    ("rollout tok/s", "rollout_tokens_per_s", "{:,.0f}"),
    ("rollout tok/s/dev", "rollout_tokens_per_s_per_device", "{:,.0f}"),
    ("update tok/s", "update_tokens_per_s", "{:,.0f}"),
    ("update tok/s/dev", "update_tokens_per_s_per_device", "{:,.0f}"),
    ("update MFU", "update_mfu", "{:.1%}"),
]


def _cell(value, fmt: str) -> str:
    if value is None or value == "":
        return "-"
    return fmt.format(value)


def markdown_table(records: list[BenchRecord]) -> str:
    """One row per record; '-' where a record has no value (e.g. verl has no separate tool time)."""
    lines = ["| " + " | ".join(h for h, _, _ in _COLUMNS) + " |", "|" + "---|" * len(_COLUMNS)]
    for r in records:
        lines.append("| " + " | ".join(_cell(getattr(r, f), fmt) for _, f, fmt in _COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def plot(records: list[BenchRecord], path: str) -> None:
    """Three panels: step time split (stacked), tokens/s per device (rollout, update), update MFU."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [r.label for r in records]
    y = list(range(len(records)))
    fig, (ax_time, ax_tps, ax_mfu) = plt.subplots(1, 3, figsize=(15, 1.6 + 0.6 * len(records)), sharey=True)
    left = [0.0] * len(records)
    for field, name, color in (("rollout_s", "rollout", "tab:blue"), ("tools_s", "tools", "tab:orange"),
                               ("update_s", "update", "tab:green"), ("other_s", "other", "tab:gray")):
        widths = [max(getattr(r, field) or 0.0, 0.0) for r in records]
        ax_time.barh(y, widths, left=left, color=color, label=name)
        left = [a + b for a, b in zip(left, widths)]
    ax_time.set_xlabel("seconds per RL step")
    ax_time.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=4, fontsize="small", frameon=False)
    height = 0.38
    for offset, field, name, color in ((-height / 2, "rollout_tokens_per_s_per_device", "rollout", "tab:blue"),
                                       (height / 2, "update_tokens_per_s_per_device", "update", "tab:green")):
        ax_tps.barh([i + offset for i in y], [getattr(r, field) or 0.0 for r in records], height=height,
                    color=color, label=name)
    ax_tps.set_xlabel("tokens/s per device")
    ax_tps.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, fontsize="small", frameon=False)
    ax_mfu.barh(y, [100 * (r.update_mfu or 0.0) for r in records], color="tab:purple")
    for i, r in enumerate(records):
        if r.update_mfu is None:
            ax_mfu.text(0, i, " n/a (peak or FLOPs unknown)", va="center", fontsize="small")
    ax_mfu.set_xlabel("update MFU (%)")
    ax_time.set_yticks(y, labels)
    ax_time.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------- the mode


def expand(patterns) -> list[str]:
    """Paths from paths and globs, in the order given, each once; a pattern that matches nothing is an error."""
    if isinstance(patterns, str):
        patterns = [patterns]
    paths: list[str] = []
    for pattern in patterns:
        found = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else ([pattern] if os.path.exists(pattern) else [])
        if not found:
            raise CompareError(f"no record file matches {pattern!r}")
        paths.extend(p for p in found if p not in paths)
    return paths


def load_all(record_patterns, verl_log: str = "", **verl_options) -> list[BenchRecord]:
    records: list[BenchRecord] = []
    for path in expand(record_patterns) if record_patterns else []:
        try:
            found = read_records(path)
        except (ValueError, TypeError, KeyError) as e:  # JSON that is not records: say which file
            raise CompareError(f"{path} does not hold bench records: {type(e).__name__}: {e}") from None
        if not found:
            raise CompareError(f"{path} holds no bench records (JSON objects with label, source, device_kind, "
                               f"device_count)")
        records.extend(found)
    if verl_log:
        if not os.path.isfile(verl_log):
            raise CompareError(f"verl log {verl_log!r} not found")
        with open(verl_log, errors="replace") as f:
            steps = parse_verl_log(f.read())
        if not steps:
            raise CompareError(f"{verl_log} has no verl step lines ('step:N - key:value - ...' or JSON "
                               f"{{\"step\": N, \"data\": {{...}}}})")
        try:
            records.insert(0, verl_record(steps, **verl_options))  # the baseline is the first row
        except CompareError as e:
            raise CompareError(f"{verl_log}: {e}") from None
    if not records:
        raise CompareError("nothing to compare: give record files (config.records) and/or a verl log")
    return records


def run(config) -> dict[str, Any]:
    records = load_all(
        tuple(config.records), str(config.get("verl_log", "") or ""),
        label=str(config.get("verl_label", "verl")), device_kind=str(config.get("verl_device_kind", "unknown (verl log)")),
        device_count=int(config.get("verl_device_count", 0)), skip_steps=int(config.get("verl_skip_steps", 1)),
        model_preset=str(config.get("verl_model_preset", "")),
    )
    out = str(config.output_dir)
    os.makedirs(out, exist_ok=True)
    table = markdown_table(records)
    table_path, plot_path = os.path.join(out, "comparison.md"), os.path.join(out, "comparison.png")
    with open(table_path, "w") as f:
        f.write(table)
    plot(records, plot_path)
    print(table, file=sys.stderr, flush=True)
    return dict(mode="compare", table=table_path, plot=plot_path, rows=[r.to_dict() for r in records])
