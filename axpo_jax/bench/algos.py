"""AXPO vs GRPO on the synthetic zoom task at equal sampled tokens, over several seeds.

    python launch.py --config configs/bench.py:algos

One SFT policy (the demo's SFT stage, made once in the workdir) is the start of every run. For each seed, RL runs
for the same number of steps with:
  - "axpo": N rollouts per question plus AXPO's forked continuations (at most r·B·N per step);
  - "grpo_equal": plain GRPO with N' = N·(1 + r) rollouts per question (`grpo_equal_budget_group_size`), the group
    size at which GRPO samples as many responses per step as AXPO at full budget — an upper bound on AXPO's
    tokens, since its continuations are shorter than whole responses and it may not use its budget;
  - optionally "grpo": plain GRPO with the same N.
Every run logs its sampled tokens per step (a forked continuation's copied prefix is not counted) and evaluates
greedy Pass@1 on held-out tasks during training; the starting policy is evaluated on the same tasks (x = 0). The record compares final held-out Pass@1 and rollout reward per
variant (mean and standard deviation over seeds) together with the tokens each sampled, and the plot draws held-out
Pass@1 and rollout reward against cumulative sampled tokens, so runs are compared at equal tokens by eye.
Runs resume where they stopped (each is an `rl` mode run with its own workdir).
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np


def _log(message: str) -> None:
    print(f"[bench_algos] {message}", file=sys.stderr, flush=True)


def variant_config(rl, variant: str, seed: int, workdir: str):
    """The rl mode config of one run."""
    from axpo_jax.algo.axpo import AXPOConfig, grpo_equal_budget_group_size

    cfg = rl.copy_and_resolve_references()
    cfg.seed = seed
    cfg.workdir = os.path.join(workdir, f"{variant}_seed{seed}")
    if variant == "axpo":
        cfg.algo = "axpo"
    elif variant == "grpo_equal":
        cfg.algo = "grpo"
        axpo = AXPOConfig(**cfg.axpo.to_dict())
        cfg.num_samples = grpo_equal_budget_group_size(cfg.num_samples, axpo)
    elif variant == "grpo":
        cfg.algo = "grpo"
    else:
        raise ValueError(f"unknown variant {variant!r}; use axpo, grpo_equal or grpo")
    return cfg


def starting_pass_at_1(rl, seed: int) -> float:
    """Held-out Pass@1 of the starting (SFT) policy on the evaluation tasks of the runs of `seed`."""
    from axpo_jax.tools.executor import ToolExecutor
    from axpo_jax.tools.registry import build_registry
    from axpo_jax.train import rl_run

    cfg = rl.copy_and_resolve_references()
    cfg.seed = seed
    with ToolExecutor(build_registry(list(cfg.tools))) as executor:
        return float(rl_run.evaluate_checkpoint(cfg, cfg.checkpoint, executor)["eval/average/pass@1"])


def summarize(runs: dict[str, list[list[dict]]]) -> dict:
    """Per variant: mean/std over seeds of the final held-out Pass@1, the mean rollout reward of the second half of
    training, and the total sampled tokens."""
    summary = {}
    for variant, seeds in runs.items():
        final_eval = [[r for r in records if "eval/average/pass@1" in r][-1]["eval/average/pass@1"] for records in seeds]
        late_reward = [float(np.mean([r["reward"] for r in records[len(records) // 2:]])) for records in seeds]
        tokens = [int(sum(r["sampled_tokens"] for r in records)) for records in seeds]
        summary[variant] = {
            "seeds": len(seeds),
            "final_eval_pass@1_mean": round(float(np.mean(final_eval)), 4),
            "final_eval_pass@1_std": round(float(np.std(final_eval)), 4),
            "final_eval_pass@1_per_seed": final_eval,
            "late_rollout_reward_mean": round(float(np.mean(late_reward)), 4),
            "late_rollout_reward_std": round(float(np.std(late_reward)), 4),
            "sampled_tokens_mean": int(np.mean(tokens)),
            "sampled_tokens_per_seed": tokens,
        }
    return summary


def plot(path: str, runs: dict[str, list[list[dict]]], start: list[float]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for color, (variant, seeds) in zip(plt.rcParams["axes.prop_cycle"].by_key()["color"], runs.items()):
        for i, records in enumerate(seeds):
            tokens = np.cumsum([r["sampled_tokens"] for r in records])
            evals = [(0, start[i])] + [(t, r["eval/average/pass@1"]) for t, r in zip(tokens, records)
                                         if "eval/average/pass@1" in r]
            label = variant if i == 0 else None
            axes[0].plot(*zip(*evals), marker="o", color=color, alpha=0.8, label=label)
            axes[1].plot(tokens, [r["reward"] for r in records], color=color, alpha=0.6, label=label)
    axes[0].set(title="held-out Pass@1 (greedy)", xlabel="cumulative sampled tokens", ylim=(-0.05, 1.05))
    axes[1].set(title="rollout reward", xlabel="cumulative sampled tokens", ylim=(-0.05, 1.05))
    for ax in axes:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def stage_configs(config):
    """(the demo config that makes the SFT policy, its sft stage, the rl config every run starts from)."""
    from axpo_jax import demo

    base = config.demo.copy_and_resolve_references()
    base.workdir = os.path.join(os.path.abspath(config.workdir), "sft_policy")
    base.eval_tasks = config.eval_tasks  # the demo's stages make them questions of its own task, with its options
    sft, rl = demo.stage_configs(base)
    rl.eval_every = config.eval_every
    rl.steps = config.steps
    return base, sft, rl


def run(config) -> dict:
    from axpo_jax import demo
    from axpo_jax.modes import config_fields
    from axpo_jax.train import rl_run, sft_run

    started = time.perf_counter()
    workdir = os.path.abspath(config.workdir)
    base, sft, rl = stage_configs(config)
    # every run's fields, before the SFT policy is made (minutes): a wrong variant or field is one line now
    with config_fields("variants"):
        runs_of_seed_0 = [variant_config(rl, variant, 0, workdir) for variant in config.variants]
    sft_run.checked_settings(sft)
    for cfg in runs_of_seed_0:
        rl_run.checked_settings(cfg)
    stopped = demo.prepare_sft_policy(base, sft)
    if stopped:
        return stopped
    runs: dict[str, list[list[dict]]] = {v: [] for v in config.variants}
    for seed in config.seeds:
        for variant in config.variants:
            cfg = variant_config(rl, variant, seed, workdir)
            _log(f"{variant}, seed {seed}: N={cfg.num_samples}, {cfg.steps} steps ({time.perf_counter() - started:.0f}s)")
            result = rl_run.run(cfg)
            if "stopped_at_step" in result:
                return result
            with open(result["metrics"]) as f:
                runs[variant].append([json.loads(line) for line in f if line.strip()])
            _log(f"{variant}, seed {seed}: final held-out Pass@1 {result['final_eval_pass@1']}, "
                 f"{result['sampled_tokens']} sampled tokens")
    start = [starting_pass_at_1(rl, seed) for seed in config.seeds]
    summary = summarize(runs)
    plot_path = plot(os.path.join(workdir, "axpo_vs_grpo.png"), runs, start)
    return {"mode": "bench_algos", "seeds": list(config.seeds), "steps": config.steps,
            "questions_per_step": rl.questions_per_step, "num_samples": rl.num_samples, "k": rl.axpo.k,
            "ratio": rl.axpo.ratio, "eval_tasks": config.eval_tasks, "sft_policy_eval_pass@1_per_seed": start,
            "summary": summary, "plot": plot_path,
            "seconds": round(time.perf_counter() - started, 1)}
