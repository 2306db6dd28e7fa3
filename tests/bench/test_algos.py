"""The AXPO-vs-GRPO comparison's pieces: the equal-budget GRPO group size, the per-variant summary, the plot (the
runs themselves are `rl` mode runs, tested in tests/train/test_modes.py)."""

import os

import numpy as np
import pytest

from axpo_jax.bench.algos import plot, summarize, variant_config
from tests.config_files import load_config


def _algos_config(workdir):
    config = load_config("bench", "algos")
    config.workdir = str(workdir)
    return config


def test_variants(tmp_path):
    rl = load_config("rl")  # N=4, r=0.5, K=2: AXPO adds at most r*B*N continuations, GRPO gets N' = N(1 + r) = 6
    axpo, grpo_equal, grpo = (variant_config(rl, v, 3, str(tmp_path)) for v in ("axpo", "grpo_equal", "grpo"))
    assert (axpo.algo, axpo.num_samples, axpo.seed) == ("axpo", 4, 3)
    assert (grpo_equal.algo, grpo_equal.num_samples) == ("grpo", 6)
    assert (grpo.algo, grpo.num_samples) == ("grpo", 4)
    assert axpo.workdir.endswith("axpo_seed3") and rl.algo == "axpo" and rl.num_samples == 4  # rl untouched


def test_summary_and_plot(tmp_path):
    def run(rewards, evals, tokens):
        records = [{"step": i + 1, "reward": r, "sampled_tokens": tokens} for i, r in enumerate(rewards)]
        for step, value in evals.items():
            records[step - 1]["eval/average/pass@1"] = value
        return records

    runs = {"axpo": [run([0.0, 0.5, 1.0, 1.0], {2: 0.25, 4: 0.5}, 100), run([0, 0, 0, 0.5], {4: 0.0}, 80)],
            "grpo_equal": [run([0, 0, 0.5, 0.5], {4: 0.25}, 120)]}
    summary = summarize(runs)
    assert summary["axpo"]["final_eval_pass@1_per_seed"] == [0.5, 0.0]
    assert np.isclose(summary["axpo"]["final_eval_pass@1_mean"], 0.25)
    assert np.isclose(summary["axpo"]["late_rollout_reward_mean"], (1.0 + 0.25) / 2)  # steps 3-4 of each seed
    assert summary["axpo"]["sampled_tokens_per_seed"] == [400, 320] and summary["grpo_equal"]["seeds"] == 1
    path = plot(str(tmp_path / "p.png"), runs, start=[0.0, 0.0])
    assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_runs_train_and_evaluate_on_the_demos_task(tmp_path):
    """Every run's training and held-out questions are the demo's task with its options (an earlier version
    evaluated on the default task, another grid and kind, than the one trained on)."""
    from axpo_jax.bench.algos import stage_configs
    from axpo_jax.data.tasks import task_source

    config = _algos_config(tmp_path)
    base, _, rl = stage_configs(config)
    options = base.task.to_dict()
    train, held_out = task_source(rl.tasks, seed=0), task_source(rl.eval_tasks, seed=10_000)
    assert len(held_out) == config.eval_tasks and rl.steps == config.steps
    for source in (train, held_out):
        task = source[0]
        assert task.kind == options["kind"] and task.grid == options["grid"]
    assert held_out[0].ask == train[0].ask == options.get("ask", "cell")


def test_a_wrong_variant_or_field_stops_it_before_the_sft_policy_is_made(tmp_path):
    from axpo_jax.bench.algos import run
    from axpo_jax.modes import ModeError

    config = _algos_config(tmp_path)
    config.variants = ("axpo", "grpo_eq")
    with pytest.raises(ModeError, match=r"\(variants\): unknown variant 'grpo_eq'"):
        run(config)
    config.variants = ("axpo",)
    config.demo.rl.temperature = -1.0
    with pytest.raises(ModeError, match=r"temperature must be >= 0"):
        run(config)
    assert not os.path.exists(tmp_path / "sft_policy" / "tiny_checkpoint")
