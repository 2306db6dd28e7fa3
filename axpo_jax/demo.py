"""The embedded default job: SFT then AXPO on the synthetic zoom task, with a tiny Qwen3-VL made on the spot.

    python launch.py --config configs/demo.py

1. Builds a tiny checkpoint folder (random weights, a locally trained tokenizer with Qwen's special tokens and
   chat template, the processor config) and loads it exactly like a real checkpoint.
2. Evaluates Pass@1 and tool-use rate on held-out tasks (greedy decoding).
3. SFT on expert trajectories (think -> image_zoom_in on the right box -> answer), saved as a transformers
   folder that also serves as the KL reference.
4. RL with the configured algorithm (AXPO by default) through the full loop: rollouts with real tool calls,
   AXPO resampling forked from the KV cache, two-stream advantages, the clipped update; orbax checkpoints, so an
   interrupted run resumes where it stopped.
5. Evaluates again, writes metrics (JSONL) and learning-curve plots, and returns the before/after figures.
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np
from tqdm.auto import tqdm


def _log(message: str) -> None:
    print(f"[demo] {message}", file=sys.stderr, flush=True)


def build_tiny_checkpoint(folder: str, *, seed: int, **model_overrides) -> dict:
    """Processor files + random weights in one transformers-format folder; returns the config dict."""
    from axpo_jax.data.tiny_processor import build_tiny_processor
    from axpo_jax.models.qwen3_vl.tiny import tiny_config_dict, write_random_checkpoint

    special = build_tiny_processor(folder, patch_size=8, min_pixels=32 * 32, max_pixels=96 * 96)
    config = tiny_config_dict(vocab_size=special["vocab_size"], patch_size=8, num_position_embeddings=64,
                              special_token_ids=special, **model_overrides)
    write_random_checkpoint(folder, config, seed=seed)
    return config


def evaluate(agent, tasks, rng, params, *, num_samples: int = 1) -> dict:
    """Pass@1 (mean reward over samples) and the rate of trajectories that called a tool."""
    from axpo_jax.train.rl import reward

    trajectories = agent.run(tasks, num_samples, rng, params).trajectories
    rewards = [reward(t, tasks[t.task_index], "exact") for t in trajectories]
    return {"pass@1": float(np.mean(rewards)), "tool_use_rate": float(np.mean([t.used_tool for t in trajectories])),
            "answer_rate": float(np.mean([t.answer is not None for t in trajectories]))}


def _plot(path: str, sft_losses: list[float], rl_records: list[dict], evals: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot(sft_losses)
    axes[0].set(title="SFT loss (token NLL)", xlabel="step")
    steps = [r["step"] for r in rl_records]
    for key in ("reward", "tool_use_rate", "recovery_rate"):
        axes[1].plot(steps, [r.get(key, np.nan) for r in rl_records], marker="o", label=key)
    axes[1].set(title="RL rollouts", xlabel="step", ylim=(-0.05, 1.05))
    axes[1].legend(fontsize=8)
    names = list(evals)
    for i, key in enumerate(("pass@1", "tool_use_rate")):
        axes[2].bar(np.arange(len(names)) + 0.4 * i, [evals[n][key] for n in names], width=0.4, label=key)
    axes[2].set_xticks(np.arange(len(names)) + 0.2, names)
    axes[2].set(title="held-out evaluation", ylim=(0, 1.05))
    axes[2].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(config) -> dict:
    import jax

    from axpo_jax.algo import registry as algorithms
    from axpo_jax.data.processor import load_processor
    from axpo_jax.data.synthetic import (SyntheticTaskSource, make_task, sft_conversations, sft_example,
                                         task_dataset, task_seed)
    from axpo_jax.models import qwen3_vl
    from axpo_jax.rollout.agent_loop import AgentLoop
    from axpo_jax.rollout.sampler import SamplingParams
    from axpo_jax.tools.executor import ToolExecutor
    from axpo_jax.tools.registry import build_registry
    from axpo_jax.models.qwen3_vl.inputs import bucket
    from axpo_jax.train.batch import make_batch
    from axpo_jax.train.checkpoints import Checkpointer, StopRequest
    from axpo_jax.train.learner import Learner, LossConfig
    from axpo_jax.train.optimizer import make_optimizer
    from axpo_jax.train.rl import RLTrainer

    started = time.perf_counter()
    stop = StopRequest().install()
    workdir = os.path.abspath(config.workdir)
    os.makedirs(workdir, exist_ok=True)
    base = os.path.join(workdir, "tiny_checkpoint")
    sft_folder = os.path.join(workdir, "sft_checkpoint")
    if not os.path.isfile(os.path.join(base, "config.json")):
        _log(f"building a tiny Qwen3-VL checkpoint in {base}")
        build_tiny_checkpoint(base, seed=config.seed, **config.model.to_dict())
    processor = load_processor(base)
    executor = ToolExecutor(build_registry(["image_zoom_in"]), timeout_s=config.tool_timeout_s)
    # Greedy: a model this small is derailed by the paper's presence penalty of 1.5 (its tool-call JSON and
    # answers repeat tokens); the paper's sampling settings belong to the evaluation mode.
    eval_params = SamplingParams(temperature=0.0)
    eval_tasks = [make_task(task_seed(config.seed + 10_000, i)) for i in range(config.eval_tasks)]

    def agent_for(model):
        return AgentLoop(model, processor, executor, max_turns=config.max_turns,
                         max_new_tokens_per_turn=config.max_new_tokens_per_turn, capacity=config.capacity,
                         log=lambda m: None)

    evals = {}
    eval_key = jax.random.key(config.seed + 1)
    # ------------------------------------------------------------------------------------------------ SFT
    sft_losses: list[float] = []
    if os.path.isfile(os.path.join(sft_folder, "config.json")):
        _log(f"SFT already done ({sft_folder}); resuming from it")
        model = qwen3_vl.from_pretrained(sft_folder)
        evals_path = os.path.join(workdir, "evals.json")
        if os.path.isfile(evals_path):
            with open(evals_path) as f:
                evals.update(json.load(f))
    else:
        model = qwen3_vl.from_pretrained(base)
        evals["before"] = evaluate(agent_for(model), eval_tasks, eval_key, eval_params)
        _log(f"before SFT: {evals['before']}")
        tasks = [make_task(task_seed(config.seed, i)) for i in range(config.sft_examples)]
        examples = [sft_example(c, processor, executor.registry.schemas())
                    for c in sft_conversations(tasks, tool_fraction=config.sft_tool_fraction, seed=config.seed)]
        length = bucket(max(len(e["input_ids"]) for e in examples), 64)
        learner = Learner(model, make_optimizer(learning_rate=config.sft_lr, total_steps=config.sft_steps,
                                                warmup_steps=config.sft_steps // 10), LossConfig(kind="sft"))
        rng = np.random.default_rng(config.seed)
        progress = tqdm(range(config.sft_steps), desc="SFT", file=sys.stderr, mininterval=2.0, dynamic_ncols=True)
        for step in progress:
            chosen = [examples[i] for i in rng.choice(len(examples), config.sft_batch, replace=False)]
            images = [e for e in chosen if "pixel_values" in e]
            batch = make_batch(
                model.config, [e["input_ids"].tolist() for e in chosen], [e["loss_mask"] for e in chosen],
                pixel_values=np.concatenate([e["pixel_values"] for e in images]) if images else None,
                image_grid_thw=np.concatenate([e["image_grid_thw"] for e in images]) if images else None,
                length=length, num_image_rows=bucket(2 * config.sft_batch, 1),
                pad_id=processor.tokenizer.pad_token_id,
            )
            sft_losses.append(learner.step([batch])["loss"])
            progress.set_postfix(loss=f"{sft_losses[-1]:.3f}")
        _log(f"SFT: loss {sft_losses[0]:.3f} -> {sft_losses[-1]:.3f} ({time.perf_counter() - started:.0f}s)")
        qwen3_vl.save_pretrained(model, sft_folder)
        processor.save_pretrained(sft_folder)
        evals["after_sft"] = evaluate(agent_for(model), eval_tasks, eval_key, eval_params)
        _log(f"after SFT: {evals['after_sft']} ({time.perf_counter() - started:.0f}s)")
        with open(os.path.join(workdir, "evals.json"), "w") as f:
            json.dump(evals, f)

    # ------------------------------------------------------------------------------------------------- RL
    reference = qwen3_vl.from_pretrained(sft_folder) if config.kl_coef else None
    learner = Learner(model, make_optimizer(learning_rate=config.rl_lr, total_steps=config.rl_steps),
                      LossConfig(kind="rl", kl_coef=config.kl_coef), reference=reference)
    estimator = algorithms.make(config.algo) if config.algo == "grpo" else algorithms.make(
        config.algo, ratio=config.ratio, k=config.k)
    agent = agent_for(model)
    trainer = RLTrainer(learner, agent, estimator, num_samples=config.num_samples,
                        micro_batch_size=config.micro_batch_size, sampling=SamplingParams(temperature=1.0))
    dataset = iter(task_dataset(SyntheticTaskSource(config.rl_tasks, config.seed + 1), seed=config.seed,
                                batch_size=config.questions_per_step))
    checkpointer = Checkpointer(os.path.join(workdir, "rl_checkpoints"), keep=2)
    rng, first_step = jax.random.key(config.seed), 0
    restored = checkpointer.restore(model, learner.optimizer)
    if restored is not None:
        first_step, rng, extra = restored
        dataset.set_state(extra["data"])
        _log(f"resumed RL from step {first_step}")
    metrics_path = os.path.join(workdir, "rl_metrics.jsonl")
    rl_records = []
    if os.path.isfile(metrics_path):
        with open(metrics_path) as f:
            rl_records = [r for r in map(json.loads, f) if r["step"] <= first_step]
    for step in range(first_step, config.rl_steps):
        rng, key = jax.random.split(rng)
        out = trainer.step(next(dataset), key, step)
        record = {"step": step + 1, **{k: v for k, v in out.metrics.items() if np.isscalar(v)}}
        rl_records.append(record)
        with open(metrics_path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rl_records)
        checkpointer.save(step + 1, model, learner.optimizer, rng=rng, extra={"data": dataset.get_state()})
        _log(f"RL step {step + 1}/{config.rl_steps} ({config.algo}): reward {record['reward']:.2f}, tool use "
             f"{record['tool_use_rate']:.2f}, triggered {record.get('axpo/num_triggered', 0):.0f}, resamples "
             f"{record['resamples_used']}/{record['resample_budget']}, loss {record['loss']:.4f} "
             f"({time.perf_counter() - started:.0f}s)")
        if stop:
            _log(f"{stop.signal_name}: checkpoint of step {step + 1} saved; stopping (rerun to resume)")
            checkpointer.close()
            return {"stopped_at_step": step + 1, "signal": stop.signal_name}
    checkpointer.close()
    evals["after_rl"] = evaluate(agent, eval_tasks, eval_key, eval_params)
    _log(f"after RL: {evals['after_rl']}")
    plot_path = os.path.join(workdir, "learning_curves.png")
    _plot(plot_path, sft_losses, rl_records, evals)
    return {
        "algo": config.algo,
        **{f"{stage}/{k}": v for stage, figures in evals.items() for k, v in figures.items()},
        "rl_steps": config.rl_steps,
        "rl_final_reward": rl_records[-1]["reward"] if rl_records else None,
        "metrics": metrics_path,
        "plot": plot_path,
        "seconds": round(time.perf_counter() - started, 1),
    }
