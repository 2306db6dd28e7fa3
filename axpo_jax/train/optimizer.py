"""The optimizer: AdamW with linear warmup and cosine decay, global-norm clipping, and a guard that skips any
update whose gradients are not finite (the skip is counted in the optimizer state and logged)."""

from __future__ import annotations

import optax


def make_optimizer(*, learning_rate: float, total_steps: int, warmup_steps: int = 0, final_lr_ratio: float = 0.1,
                   weight_decay: float = 0.0, b1: float = 0.9, b2: float = 0.999, max_grad_norm: float = 1.0,
                   max_consecutive_nonfinite: int = 10) -> optax.GradientTransformation:
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0 if warmup_steps else learning_rate, peak_value=learning_rate,
        warmup_steps=warmup_steps, decay_steps=max(total_steps, warmup_steps + 1),
        end_value=learning_rate * final_lr_ratio,
    )
    tx = optax.chain(optax.clip_by_global_norm(max_grad_norm), optax.adamw(schedule, b1, b2, weight_decay=weight_decay))
    return optax.apply_if_finite(tx, max_consecutive_errors=max_consecutive_nonfinite)


def skipped_updates(opt_state) -> int:
    """Total updates skipped for non-finite gradients so far."""
    return int(opt_state.total_notfinite)
