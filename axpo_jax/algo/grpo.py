"""GRPO (docs/AXPO.md §3): group-normalized advantages and the clipped policy loss.

Host side (numpy, before the update): `group_advantages` turns a [G groups, N rollouts] reward array into
per-rollout advantages, `apply_truncation` decides what happens to rollouts cut off by the length/turn limit,
`token_advantages` broadcasts per-rollout advantages over trained tokens.

Device side (jnp, jittable, differentiable in `logp_new`): `policy_loss` (DAPO asymmetric clip + optional KL to
the reference policy, three aggregation modes) and `kl_penalty` (k1 / k2 / k3 / low_var_kl).

Choices where the paper is silent (§3 "Unstated"), all parameters with these defaults:
- std: the POPULATION std (ddof=0) of the group: A = (r − mean) / (std + eps), eps = 1e-6. `ddof=1` gives the
  sample std that verl's `compute_grpo_outcome_advantage` uses (torch.std is unbiased); with binary rewards and
  N = 8 the two differ by a factor sqrt(8/7) ≈ 1.07 in every advantage, which at the same lr is a 7% step-size
  change and nothing else. All-equal groups (std = 0) get exactly 0, not 0/eps round-off.
- aggregation: "token-mean" (DAPO; every trained token of the batch weighs the same, so long responses are not
  down-weighted; the paper follows DAPO's clip, so we follow its aggregation too).
- KL estimator: "low_var_kl" (verl's name for a clamped k3; the paper trained with verl, whose GRPO recipes use
  it), β = 1e-3 is the caller's `kl_coef`.
- truncated rollouts (hit the length/turn limit without an answer): "keep" with reward 0 (the paper's reward is
  answer correctness, and an unanswered rollout is simply wrong); "exclude" drops them from the group statistics
  and from the loss (DAPO's overlong filtering).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "AGGREGATIONS",
    "KL_KINDS",
    "GRPOConfig",
    "aggregate",
    "apply_truncation",
    "check_normalizer",
    "group_advantages",
    "kl_penalty",
    "masked_group_normalize",
    "policy_loss",
    "token_advantages",
]

Aggregation = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"]
AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")
KL_KINDS = ("k1", "k2", "k3", "low_var_kl")


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
    """GRPO's advantage knobs (§3). Defaults are the paper's where it states them, else documented choices.

    std_normalize: divide by the group std (GRPO); False gives Dr. GRPO's mean-centering only.
    eps: added to the std (verl's 1e-6).
    ddof: 0 = population std (default), 1 = sample std (verl).
    truncation: "keep" (reward 0, trained as a failure) or "exclude" (no statistics, no loss).
    """

    std_normalize: bool = True
    eps: float = 1e-6
    ddof: int = 0
    truncation: Literal["keep", "exclude"] = "keep"

    def __post_init__(self):
        check_normalizer(self)


def check_normalizer(config) -> None:
    """Refuses group-normalizer fields (of a GRPOConfig or an AXPOConfig) that would compute nonsense quietly."""
    name = type(config).__name__
    if config.truncation not in ("keep", "exclude"):
        raise ValueError(f"{name}.truncation={config.truncation!r}; expected one of ('keep', 'exclude')")
    if not isinstance(config.std_normalize, bool):
        raise ValueError(f"{name}.std_normalize must be True or False, got {config.std_normalize!r}")
    if not (math.isfinite(config.eps) and config.eps >= 0):
        raise ValueError(f"{name}.eps must be a finite number >= 0, got {config.eps}")
    if config.ddof not in (0, 1):
        raise ValueError(f"{name}.ddof must be 0 (population std) or 1 (sample std), got {config.ddof!r}")


# ----------------------------------------------------------------------------------------------------------------
# Advantages (numpy, host)


def masked_group_normalize(rewards: np.ndarray, include: np.ndarray | None = None, *, std_normalize: bool = True,
                           eps: float = 1e-6, ddof: int = 0) -> np.ndarray:
    """(r − mean) / (std + eps) along the last axis over the included members; excluded members get 0.

    The one normalizer both GRPO groups and AXPO's K-groups use. A group whose included rewards are all equal
    (std = 0, also a single member) gets exactly 0. With `ddof=1` a group of one included member gets 0.
    """
    r = np.asarray(rewards, dtype=np.float64)
    inc = np.ones(r.shape, dtype=bool) if include is None else np.asarray(include, dtype=bool)
    if inc.shape != r.shape:
        raise ValueError(f"include has shape {inc.shape}, rewards {r.shape}")
    count = inc.sum(axis=-1, keepdims=True)
    safe_count = np.maximum(count, 1)
    mean = np.where(inc, r, 0.0).sum(axis=-1, keepdims=True) / safe_count
    centered = np.where(inc, r - mean, 0.0)
    if not std_normalize:
        out = centered
    else:
        var = (centered ** 2).sum(axis=-1, keepdims=True) / np.maximum(count - ddof, 1)
        std = np.sqrt(var)
        out = centered / (std + eps)
    big = np.where(inc, r, -np.inf).max(axis=-1, keepdims=True)
    small = np.where(inc, r, np.inf).min(axis=-1, keepdims=True)
    constant = (big <= small) | (count <= ddof)
    return np.where(inc & ~constant, out, 0.0)


def group_advantages(rewards_gn: np.ndarray, *, std_normalize: bool = True, eps: float = 1e-6, ddof: int = 0,
                     include_gn: np.ndarray | None = None) -> np.ndarray:
    """§3: A_i = (r_i − mean(r)) / (std(r) + eps) within each group (row) of `rewards_gn` [G, N].

    std is the population std by default (`ddof=0`; `ddof=1` for verl's sample std). `std_normalize=False` returns
    r − mean. All-equal groups → 0. `include_gn` (bool [G, N]) drops members from the statistics; they get 0
    (see `apply_truncation`). Example: [1, 0, 0, 0] → mean .25, std .433 → [1.732, −.577, −.577, −.577].
    """
    return masked_group_normalize(rewards_gn, include_gn, std_normalize=std_normalize, eps=eps, ddof=ddof)


def apply_truncation(rewards: np.ndarray, truncated_mask: np.ndarray,
                     mode: str = "keep") -> tuple[np.ndarray, np.ndarray]:
    """What happens to rollouts that hit the length/turn limit without an answer (`truncated_mask`, bool).

    "keep" (default): they stay in their group with reward 0 — the paper's reward is answer correctness and an
    unanswered rollout is wrong; returns (rewards with truncated set to 0, all-True include mask).
    "exclude": they leave the group statistics and the loss (DAPO overlong filtering, so a rollout that ran out of
    room is not punished as if it were wrong); returns (rewards unchanged, include = ~truncated). Pass the include
    mask to `group_advantages(include_gn=...)` and `token_advantages(include_b=...)`.
    """
    r = np.asarray(rewards, dtype=np.float64)
    t = np.asarray(truncated_mask, dtype=bool)
    if t.shape != r.shape:
        raise ValueError(f"truncated_mask has shape {t.shape}, rewards {r.shape}")
    if mode == "keep":
        return np.where(t, 0.0, r), np.ones(r.shape, dtype=bool)
    if mode == "exclude":
        return r, ~t
    raise ValueError(f"unknown truncation mode {mode!r}; expected 'keep' or 'exclude'")


def token_advantages(advantages_b, loss_mask_bt, include_b=None):
    """§3 "broadcast to every trained token of rollout i": returns (advantages_bt, loss_mask_bt) where
    advantages_bt[b, t] = A_b on trained tokens (loss_mask = 1) and 0 elsewhere, and the loss mask is zeroed on
    rows whose include_b is False (excluded rollouts then drop out of every aggregation's denominator too).
    Works on numpy and jax arrays alike (uses the arrays' own namespace)."""
    xp = jnp if isinstance(loss_mask_bt, jax.Array) or isinstance(advantages_b, jax.Array) else np
    mask = xp.asarray(loss_mask_bt)
    if include_b is not None:
        mask = mask * xp.asarray(include_b, dtype=mask.dtype)[:, None]
    adv = xp.asarray(advantages_b)[:, None] * (mask != 0)
    return adv, mask


# ----------------------------------------------------------------------------------------------------------------
# Loss (jnp, device)


def kl_penalty(logp_new, logp_ref, kind: str = "low_var_kl"):
    """Per-token estimate of KL(π_θ ‖ π_ref) from tokens sampled by the policy (§3's −β·KL term).

    With d = logp_ref − logp_new (= log π_ref/π_θ):
      "k1": −d = log π_θ − log π_ref            unbiased, high variance, can be negative
      "k2": ½ d²                                 biased, low variance, ≥ 0
      "k3": exp(d) − d − 1                       unbiased, low variance, ≥ 0 (Schulman, "Approximating KL")
      "low_var_kl": k3 with d clamped to [−20, 20] and the result to ≤ 10 (verl's name and clamps; avoids
                    exp overflow in float32 when π_ref ≫ π_θ on a rare token)
    """
    logp_new = jnp.asarray(logp_new)
    d = jnp.asarray(logp_ref) - logp_new
    if kind == "k1":
        return -d
    if kind == "k2":
        return 0.5 * jnp.square(d)
    if kind == "k3":
        return jnp.expm1(d) - d
    if kind == "low_var_kl":
        d = jnp.clip(d, -20.0, 20.0)
        return jnp.minimum(jnp.expm1(d) - d, 10.0)
    raise ValueError(f"unknown KL kind {kind!r}; expected one of {KL_KINDS}")


def aggregate(values_bt, mask_bt, mode: str = "token-mean", denominator=None):
    """Reduces per-token values to a scalar over trained tokens (mask ≠ 0).

    "token-mean":          Σ_b Σ_t m·v / Σ_b Σ_t m — every trained token of the batch weighs the same (DAPO).
    "seq-mean-token-mean": mean over sequences of (Σ_t m·v / Σ_t m) — every sequence weighs the same, its tokens
                           share its weight (original GRPO).
    "seq-mean-token-sum":  mean over sequences of Σ_t m·v — a sequence's weight grows with its length.
    Sequences with no trained token (padding rows of a static-shape batch) are left out of the sequence means.
    `denominator`, when given, replaces the token count ("token-mean") or the sequence count (seq-mean-*), e.g. the
    global count when the batch is split into gradient-accumulation micro-batches; an empty batch gives 0.
    """
    m = jnp.asarray(mask_bt, dtype=jnp.float32)
    v = jnp.asarray(values_bt, dtype=jnp.float32) * m
    if mode == "token-mean":
        denom = m.sum() if denominator is None else denominator
        return v.sum() / jnp.maximum(denom, 1.0)
    row_tokens = m.sum(axis=-1)
    row_has = (row_tokens > 0).astype(jnp.float32)
    denom = row_has.sum() if denominator is None else denominator
    if mode == "seq-mean-token-mean":
        per_row = v.sum(axis=-1) / jnp.maximum(row_tokens, 1.0)
    elif mode == "seq-mean-token-sum":
        per_row = v.sum(axis=-1)
    else:
        raise ValueError(f"unknown aggregation {mode!r}; expected one of {AGGREGATIONS}")
    return (per_row * row_has).sum() / jnp.maximum(denom, 1.0)


def policy_loss(logp_new_bt, logp_old_bt, advantages_bt, loss_mask_bt, *, eps_low: float = 0.2,
                eps_high: float = 0.4, aggregation: str = "token-mean", logp_ref_bt=None, kl_coef: float = 0.0,
                kl_kind: str = "low_var_kl", denominator=None, log_ratio_clamp: float = 20.0):
    """§3 objective as a loss: −[min(ρA, clip(ρ, 1−ε_low, 1+ε_high)A) − β·KL(π_θ‖π_ref)], aggregated.

    ρ = exp(logp_new − logp_old) per token (the log-ratio is clamped to ±`log_ratio_clamp` before exp so a wild
    token cannot overflow; inside the clamp the value and gradient are exact). Paper: ε_low = 0.2, ε_high = 0.4
    (DAPO asymmetric clip), β = 1e-3 (`kl_coef`; the KL term is added only when `logp_ref_bt` is given).
    Every stream of AXPO (§4.7) goes through this same loss: the caller supplies per-token advantages and masks.

    Jittable (pass `aggregation`/`kl_kind` as static), differentiable in `logp_new_bt`. Returns (loss, metrics),
    metrics being stop-gradient scalars over trained tokens:
      clip_frac_low:  fraction where the low clip binds (A < 0 and ρ < 1−ε_low: the gradient is cut),
      clip_frac_high: fraction where the high clip binds (A > 0 and ρ > 1+ε_high),
      clip_frac:      their sum,
      approx_kl:      mean of (ρ − 1) − log ρ, the k3 estimate of KL(π_old ‖ π_θ) (how far this update moved),
      ratio_mean, ratio_max, ratio_min, pg_loss (the surrogate part), kl (the mean KL estimate, 0 without ref),
      n_tokens (trained tokens).
    """
    mask = jnp.asarray(loss_mask_bt, dtype=jnp.float32)
    logp_new = jnp.asarray(logp_new_bt, dtype=jnp.float32)
    adv = jnp.asarray(advantages_bt, dtype=jnp.float32)
    log_ratio = jnp.clip(logp_new - jnp.asarray(logp_old_bt, dtype=jnp.float32), -log_ratio_clamp, log_ratio_clamp)
    ratio = jnp.exp(log_ratio)
    unclipped = ratio * adv
    clipped = jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high) * adv
    pg_tok = -jnp.minimum(unclipped, clipped)
    pg_loss = aggregate(pg_tok, mask, aggregation, denominator)
    if logp_ref_bt is not None:
        kl_tok = kl_penalty(logp_new, jnp.asarray(logp_ref_bt, dtype=jnp.float32), kl_kind)
        kl = aggregate(kl_tok, mask, aggregation, denominator)
        loss = pg_loss + kl_coef * kl
    else:
        kl = jnp.zeros((), jnp.float32)
        loss = pg_loss

    sg = jax.lax.stop_gradient
    r = sg(ratio)
    n = mask.sum()
    safe_n = jnp.maximum(n, 1.0)

    def tok_mean(x):
        return (x * mask).sum() / safe_n

    low = ((adv < 0) & (r < 1.0 - eps_low)).astype(jnp.float32)
    high = ((adv > 0) & (r > 1.0 + eps_high)).astype(jnp.float32)
    trained = mask > 0
    metrics = {
        "clip_frac_low": tok_mean(low),
        "clip_frac_high": tok_mean(high),
        "clip_frac": tok_mean(low + high),
        "approx_kl": tok_mean((r - 1.0) - sg(log_ratio)),
        "ratio_mean": tok_mean(r),
        "ratio_max": jnp.where(n > 0, jnp.max(jnp.where(trained, r, -jnp.inf)), 1.0),
        "ratio_min": jnp.where(n > 0, jnp.min(jnp.where(trained, r, jnp.inf)), 1.0),
        "pg_loss": sg(pg_loss),
        "kl": sg(kl),
        "n_tokens": n,
    }
    return loss, metrics
