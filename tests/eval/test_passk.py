"""The unbiased pass@k estimator against hand-computed values and against brute-force enumeration of every
k-subset of the samples."""

import itertools
from fractions import Fraction
from math import comb

import numpy as np
import pytest

from axpo_jax.eval.passk import mean_pass_at_k, pass_at_k


@pytest.mark.parametrize("n, c, k, expected", [
    (4, 0, 1, 0.0),
    (4, 1, 1, 0.25),  # pass@1 = c / n
    (4, 3, 1, 0.75),
    (4, 1, 4, 1.0),  # pass@n = any correct
    (4, 0, 4, 0.0),
    (5, 2, 2, 0.7),  # 1 - C(3,2)/C(5,2) = 1 - 3/10
    (10, 3, 5, 1 - 21 / 252),  # 1 - C(7,5)/C(10,5)
    (8, 1, 3, 3 / 8),  # one correct: it is in a random 3-subset with probability 3/8
    (6, 5, 2, 1.0),  # n - c < k: every pair holds a correct one
])
def test_hand_computed(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_equals_brute_force_enumeration():
    for n in range(1, 8):
        for c in range(n + 1):
            samples = [True] * c + [False] * (n - c)
            for k in range(1, n + 1):
                subsets = list(itertools.combinations(range(n), k))
                hits = sum(any(samples[i] for i in subset) for subset in subsets)
                exact = Fraction(hits, len(subsets))
                assert exact == 1 - Fraction(comb(n - c, k), comb(n, k))  # the closed form itself
                assert pass_at_k(n, c, k) == pytest.approx(float(exact), abs=1e-12), (n, c, k)


def test_mean_over_questions():
    correct_qn = np.array([[1, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]], bool)
    assert mean_pass_at_k(correct_qn, 1) == pytest.approx((0.25 + 0 + 1) / 3)
    assert mean_pass_at_k(correct_qn, 4) == pytest.approx(2 / 3)
    assert mean_pass_at_k(correct_qn, 2) == pytest.approx((0.5 + 0 + 1) / 3)


def test_invalid_arguments():
    with pytest.raises(ValueError, match="k=5 must lie in"):
        pass_at_k(4, 1, 5)
    with pytest.raises(ValueError, match="num_correct=5"):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError, match="at least one question"):
        mean_pass_at_k(np.zeros((0, 4), bool), 1)
