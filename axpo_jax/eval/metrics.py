"""From per-question records to a benchmark's figures: Pass@k, tool use, tool failures by category, turns.

Per benchmark (`benchmark_metrics`): pass@k for each reported k (unbiased estimator, `passk`), the share of
trajectories that called a tool, tool calls per trajectory, failed calls per failure category (the executor's
statuses, zeros included) and their share of all calls, policy turns per trajectory (mean and max), the share of
trajectories that gave an answer, the share of those answers that are the most common one (`top_answer_share`,
whitespace and case folded: 1.0 is one answer to every question, a policy that ignores what it is shown), and
how trajectories ended. Across benchmarks (`average_metrics`): the plain mean of each benchmark's pass@k, as the
paper's "Avg." column.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence

import numpy as np

from axpo_jax.eval.passk import mean_pass_at_k
from axpo_jax.tools.base import OK, STATUSES

FAILURE_STATUSES = tuple(status for status in STATUSES if status != OK)


def benchmark_metrics(records: Sequence[dict], pass_k: Sequence[int]) -> dict:
    if not records:
        raise ValueError("no records: nothing was evaluated")
    sizes = {len(r["samples"]) for r in records}
    if len(sizes) != 1:
        raise ValueError(f"questions have different numbers of samples {sorted(sizes)}: records of different runs "
                         f"mixed")
    samples = [s for r in records for s in r["samples"]]
    correct_qn = np.array([[s["correct"] for s in r["samples"]] for r in records], bool)
    statuses = Counter()
    for s in samples:
        statuses.update(s["tool_statuses"])
    calls = sum(s["tool_calls"] for s in samples)
    answers = Counter(" ".join(s["answer"].split()).casefold() for s in samples if s["answer"] is not None)
    failures = {status: int(statuses.get(status, 0)) for status in FAILURE_STATUSES}
    metrics = {f"pass@{k}": mean_pass_at_k(correct_qn, k) for k in pass_k}
    metrics.update({
        "questions": len(records),
        "samples_per_question": sizes.pop(),
        "tool_use_rate": float(np.mean([s["used_tool"] for s in samples])),
        "tool_calls_per_trajectory": calls / len(samples),
        "tool_failures": failures,
        "tool_failure_rate": sum(failures.values()) / calls if calls else 0.0,
        "turns_mean": float(np.mean([s["turns"] for s in samples])),
        "turns_max": int(max(s["turns"] for s in samples)),
        "answer_rate": float(np.mean([s["answer"] is not None for s in samples])),
        "top_answer_share": answers.most_common(1)[0][1] / sum(answers.values()) if answers else 0.0,
        "finish_reasons": dict(sorted(Counter(s["finish_reason"] for s in samples).items())),
    })
    return metrics


def average_metrics(metrics_by_benchmark: Mapping[str, dict], pass_k: Sequence[int]) -> dict:
    """The mean over benchmarks of each pass@k (every benchmark weighs the same, as in the paper's table)."""
    return {f"pass@{k}": float(np.mean([m[f"pass@{k}"] for m in metrics_by_benchmark.values()])) for k in pass_k}


def flat_metrics(metrics_by_benchmark: Mapping[str, dict], pass_k: Sequence[int], prefix: str = "eval") -> dict:
    """One level of "prefix/benchmark/name" keys with numbers only, for logging (e.g. eval/vstar/pass@1)."""
    flat = {}
    for name, metrics in metrics_by_benchmark.items():
        for key, value in metrics.items():
            if isinstance(value, dict):
                for sub, number in value.items():
                    flat[f"{prefix}/{name}/{key}/{sub}"] = number
            else:
                flat[f"{prefix}/{name}/{key}"] = value
    if metrics_by_benchmark:
        for key, value in average_metrics(metrics_by_benchmark, pass_k).items():
            flat[f"{prefix}/average/{key}"] = value
    return flat
