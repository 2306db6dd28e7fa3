"""The markdown report: the paper's results table (one column per benchmark and the average, each cell
"Pass@1 / Pass@k" in percent, one row for the evaluated model), then tool use per benchmark, then how each
benchmark was scored and anything that differs from the paper's setup."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from axpo_jax.eval.benchmarks import BENCHMARKS
from axpo_jax.eval.metrics import FAILURE_STATUSES, average_metrics


def _cell(metrics: Mapping, pass_k: Sequence[int]) -> str:
    return " / ".join(f"{100 * metrics[f'pass@{k}']:.1f}" for k in pass_k)


def markdown_report(model_name: str, metrics_by_benchmark: Mapping[str, dict], pass_k: Sequence[int], *,
                    settings_text: str, notes: Sequence[str] = ()) -> str:
    names = list(metrics_by_benchmark)
    headers = [BENCHMARKS[n].display_name if n in BENCHMARKS else n for n in names]
    k_label = " / ".join(f"Pass@{k}" for k in pass_k)
    lines = [f"# Evaluation of {model_name}", "", f"Settings: {settings_text}.", "",
             f"Cells: {k_label} (%).", "",
             "| Model | " + " | ".join(headers) + " | Avg. |",
             "| --- |" + " --- |" * (len(names) + 1),
             f"| {model_name} | " + " | ".join(_cell(metrics_by_benchmark[n], pass_k) for n in names)
             + f" | {_cell(average_metrics(metrics_by_benchmark, pass_k), pass_k)} |",
             "", "## Tool use", "",
             "| Benchmark | questions | tool-use rate | tool calls / trajectory | turns (mean / max) | answered | "
             "failed calls | " + " | ".join(FAILURE_STATUSES) + " |",
             "| --- |" + " --- |" * (6 + len(FAILURE_STATUSES))]
    for name, header in zip(names, headers):
        m = metrics_by_benchmark[name]
        failures = m["tool_failures"]
        lines.append(f"| {header} | {m['questions']} | {m['tool_use_rate']:.2f} | {m['tool_calls_per_trajectory']:.2f}"
                     f" | {m['turns_mean']:.2f} / {m['turns_max']} | {m['answer_rate']:.2f} | "
                     f"{sum(failures.values())} ({100 * m['tool_failure_rate']:.1f}%) | "
                     + " | ".join(str(failures[s]) for s in FAILURE_STATUSES) + " |")
    if notes:
        lines += ["", "## Notes", ""] + [f"- {note}" for note in notes]
    return "\n".join(lines) + "\n"
