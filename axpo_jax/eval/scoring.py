"""Scoring a sampled answer against a benchmark question: the benchmark's own scorer, or a judge.

A question carries the scorer its benchmark is graded with when no model is available (exact, numeric, choice,
math equivalence or token F1, `axpo_jax.algo.rewards`) and whether its authors graded with an LLM judge; when a
`Judge` is given, those questions go to it instead. Every score is binary (docs/AXPO.md §1).
"""

from __future__ import annotations

from collections.abc import Callable

from axpo_jax.algo.rewards import Judge, score_answer
from axpo_jax.eval.benchmarks.base import EvalItem

JudgeFn = Judge | Callable[[str, str, str], float]


def scorer_kind(item: EvalItem, judge: JudgeFn | None) -> str:
    return "judge" if item.prefers_judge and judge is not None else item.kind


def is_correct(item: EvalItem, answer: str | None, judge: JudgeFn | None = None) -> bool:
    """Whether an extracted answer (None: the rollout gave none) is correct for the question."""
    if answer is None:
        return False
    kind = scorer_kind(item, judge)
    return bool(score_answer(answer, item.references, kind, question=item.question,
                             judge=judge if kind == "judge" else None, config=item.reward_config))


def describe_scorer(item: EvalItem, judge: JudgeFn | None) -> str:
    """How the question was scored, for reports: "choice", "judge", "math (judge preferred, none configured)"."""
    kind = scorer_kind(item, judge)
    if item.prefers_judge and kind != "judge":
        return f"{kind} (judge preferred, none configured)"
    return kind
