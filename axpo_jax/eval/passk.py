"""Pass@k: the chance that at least one of k samples answers a question correctly, estimated from n >= k samples.

The unbiased estimator of Chen et al. (2021, "Evaluating Large Language Models Trained on Code"): with c of n
samples correct, pass@k = 1 - C(n-c, k) / C(n, k), the probability that k samples drawn without replacement from
the n contain a correct one. With k = n it is "any of the n is correct" (the paper's Pass@4 from 4 samples); with
k = 1 it is c / n (the paper's Pass@1, the mean over the samples).
"""

from __future__ import annotations

import math

import numpy as np


def pass_at_k(num_samples: int, num_correct: int, k: int) -> float:
    """1 - C(n-c, k) / C(n, k) for one question with n samples of which c are correct."""
    n, c = int(num_samples), int(num_correct)
    if not 0 <= c <= n:
        raise ValueError(f"num_correct={c} must lie in [0, num_samples={n}]")
    if not 1 <= k <= n:
        raise ValueError(f"k={k} must lie in [1, num_samples={n}]: pass@k needs at least k samples per question")
    if n - c < k:  # every k-subset holds a correct sample
        return 1.0
    # C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (1 - k / i): a product of terms in [0, 1], no huge binomials
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def mean_pass_at_k(correct_qn, k: int) -> float:
    """pass@k averaged over questions; `correct_qn` is [questions, samples] of booleans (same n per question)."""
    correct_qn = np.asarray(correct_qn, bool)
    if correct_qn.ndim != 2 or correct_qn.shape[0] == 0:
        raise ValueError(f"correct_qn must be [questions, samples] with at least one question, got {correct_qn.shape}")
    n = correct_qn.shape[1]
    return float(np.mean([pass_at_k(n, c, k) for c in correct_qn.sum(axis=1)]))
