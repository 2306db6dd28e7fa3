"""The optimizer's learning-rate schedule, read off the updates it makes (no model: a tiny parameter tree)."""

import jax
import jax.numpy as jnp
import numpy as np

from axpo_jax.train import rl_run
from tests.config_files import load_config


def _learning_rates(tx, updates: int) -> list[float]:
    """The learning rate of each of `updates` updates: under a constant gradient Adam's bias-corrected step is
    the rate itself (m / sqrt(v) = 1; the parameters stay 0, so weight decay adds nothing)."""
    params = {"w": jnp.zeros(4)}
    grads = {"w": jnp.ones(4)}
    state = tx.init(params)
    update = jax.jit(tx.update)
    rates = []
    for _ in range(updates):
        step, state = update(grads, state, params)
        rates.append(-float(step["w"][0]))
    return rates


def test_rl_schedule_spans_the_steps_whatever_the_updates_per_step():
    """Each RL step makes `updates_per_step` optimizer updates, and optax's schedule counts updates: the first update
    of step k runs at the rate of step k of a run with one update a step (paper preset: 400 steps x 4 updates, whose
    schedule must not reach its floor at step 100)."""
    config = load_config("rl")
    config.update(dict(steps=10, learning_rate=1e-3, warmup_fraction=0.2, updates_per_step=1))
    one = _learning_rates(rl_run.optimizer(config), config.steps)
    config.updates_per_step = 4
    four = _learning_rates(rl_run.optimizer(config), config.steps * 4)
    np.testing.assert_allclose(four[::4], one, rtol=1e-5)
    assert one[0] == 0 and max(one) > 0.9e-3 and one[-1] > 0.1e-3  # warmup, peak, not yet the floor
    assert four[-1] < one[-1]  # the last step's updates go on decaying toward the floor
