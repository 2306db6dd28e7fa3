"""The optimizer: AdamW with linear warmup and cosine decay, global-norm clipping, and a guard that skips any
update whose gradients are not finite (the skip is counted in the optimizer state and logged)."""

from __future__ import annotations

import numpy as np
import optax

from axpo_jax.modes import ModeError

# optax.apply_if_finite gives up after this many non-finite updates in a row and applies the next one, which writes
# NaN into the weights and Adam's moments for good; its counter saturates at the int32 maximum, so with this bound
# it never gives up. The training runs stop on a streak themselves instead (NonFiniteUpdates).
_NEVER_APPLY_NON_FINITE = int(np.iinfo(np.int32).max)


class NonFiniteUpdates(ModeError):
    """`streak` optimizer updates in a row had non-finite gradients and were skipped: the run stops before the
    step's checkpoint. The weights are still those of the last finite update (a skip leaves them and Adam's state as
    they were), but a run that only skips would go on saving the same weights and pruning the checkpoints from
    before the streak."""

    def __init__(self, step: int, streak: int, limit: int):
        super().__init__(f"step {step}: the last {streak} optimizer updates had non-finite gradients and were skipped "
                         f"(max_consecutive_skipped_updates={limit}); stopped without saving this step: the last "
                         f"checkpoint holds weights no newer than the last finite update (check the data, lower "
                         f"learning_rate)")


def make_optimizer(*, learning_rate: float, total_steps: int, warmup_steps: int = 0, final_lr_ratio: float = 0.1,
                   weight_decay: float = 0.0, b1: float = 0.9, b2: float = 0.999, max_grad_norm: float = 1.0,
                   updates_per_step: int = 1) -> optax.GradientTransformation:
    """`total_steps` and `warmup_steps` count training steps of `updates_per_step` optimizer updates each: optax's
    schedule advances once per update, so a step's updates must be counted or an RL run with several updates a
    step would reach the end of its schedule that many times too early."""
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0 if warmup_steps else learning_rate, peak_value=learning_rate,
        warmup_steps=warmup_steps * updates_per_step,
        decay_steps=max(total_steps, warmup_steps + 1) * updates_per_step,
        end_value=learning_rate * final_lr_ratio,
    )
    tx = optax.chain(optax.clip_by_global_norm(max_grad_norm), optax.adamw(schedule, b1, b2, weight_decay=weight_decay))
    return optax.apply_if_finite(tx, max_consecutive_errors=_NEVER_APPLY_NON_FINITE)


def skipped_updates(opt_state) -> int:
    """Total updates skipped for non-finite gradients so far."""
    return int(opt_state.total_notfinite)


def consecutive_skipped_updates(opt_state) -> int:
    """Updates skipped for non-finite gradients since the last one that was applied."""
    return int(opt_state.notfinite_count)
