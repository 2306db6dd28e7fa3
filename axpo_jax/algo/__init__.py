"""The RL algorithm as pure functions over arrays (docs/AXPO.md §1, §3–§5), usable without a model.

  rewards   answer extraction and binary scorers (exact, numeric, choice, math, f1, judge)
  grpo      group advantages, truncation policy, the clipped policy loss and KL estimators (jnp, jittable)
  axpo      resample selection (trigger, candidates, ranking, budget) and two-stream advantages (numpy)
  registry  advantage estimators by name ("grpo", "axpo")

Submodules are not imported here, so `axpo_jax.algo.rewards` does not pull in jax.
"""
