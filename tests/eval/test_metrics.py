"""Benchmark figures from per-question records, by hand."""

import pytest

from axpo_jax.eval.metrics import benchmark_metrics


def _sample(answer, correct=False):
    return {"correct": correct, "tool_statuses": [], "tool_calls": 0, "used_tool": False, "turns": 1,
            "answer": answer, "finish_reason": "answer" if answer is not None else "no_answer"}


def test_top_answer_share_flags_one_answer_for_everything():
    # 3 questions x 2 samples; answered 5 times: "2" three times (case and spaces folded), "7", "(A)"
    records = [{"samples": [_sample("2", True), _sample(" 2 ")]},
               {"samples": [_sample("7"), _sample(None)]},
               {"samples": [_sample("2"), _sample("(A)")]}]
    metrics = benchmark_metrics(records, (1,))
    assert metrics["answer_rate"] == pytest.approx(5 / 6)
    assert metrics["top_answer_share"] == pytest.approx(3 / 5)
    assert metrics["pass@1"] == pytest.approx(1 / 6)
    constant = [{"samples": [_sample("Red")]}, {"samples": [_sample("red ")]}]
    assert benchmark_metrics(constant, (1,))["top_answer_share"] == 1.0
    assert benchmark_metrics([{"samples": [_sample(None)]}], (1,))["top_answer_share"] == 0.0
