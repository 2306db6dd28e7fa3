"""The embedded default job: SFT then AXPO on the synthetic zoom task, with a tiny Qwen3-VL made on the spot.

    python launch.py --config configs/demo.py

1. Builds a tiny checkpoint folder (random weights, a locally trained tokenizer with Qwen's special tokens and
   chat template, the processor config) and loads it exactly like a real checkpoint.
2. Evaluates Pass@1 and tool-use rate on held-out tasks (greedy decoding).
3. Writes expert trajectories (think -> image_zoom_in on the right box -> answer) as an SFT JSONL with PNGs and runs
   the `sft` mode on it (axpo_jax/train/sft_run.py), which saves a transformers folder.
4. Runs the `rl` mode (axpo_jax/train/rl_run.py) from that folder with the configured algorithm (AXPO by
   default): rollouts with real tool calls, AXPO resampling forked from the KV cache, two-stream advantages, the
   clipped update against the SFT model; orbax checkpoints, so an interrupted run resumes where it stopped.
5. Evaluates again, plots the learning curves and returns the before/after figures.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time


def _log(message: str) -> None:
    print(f"[demo] {message}", file=sys.stderr, flush=True)


def build_tiny_checkpoint(folder: str, *, seed: int, via: str = "flax", torch_device: str = "cpu",
                          **model_overrides) -> dict:
    """Processor files + random weights in one transformers-format folder; returns the config dict. `via`,
    `torch_device`: who initializes the weights (models/qwen3_vl/tiny.py write_random_checkpoint)."""
    from axpo_jax.data.tiny_processor import build_tiny_processor
    from axpo_jax.models.qwen3_vl.tiny import tiny_config_dict, write_random_checkpoint

    special = build_tiny_processor(folder, patch_size=8, min_pixels=32 * 32, max_pixels=96 * 96)
    config = tiny_config_dict(vocab_size=special["vocab_size"], patch_size=8, num_position_embeddings=64,
                              special_token_ids=special, **model_overrides)
    write_random_checkpoint(folder, config, seed=seed, via=via, torch_device=torch_device)
    return config


def stage_configs(config):
    """The `sft` and `rl` mode configs of a demo run: its sub-configs with the folders and data it makes filled in."""
    from axpo_jax.data.tasks import synthetic_spec

    workdir = os.path.abspath(config.workdir)
    sft, rl = config.sft.copy_and_resolve_references(), config.rl.copy_and_resolve_references()
    sft.seed = rl.seed = config.seed
    sft.checkpoint, sft.workdir = os.path.join(workdir, "tiny_checkpoint"), os.path.join(workdir, "sft")
    sft.data = os.path.join(workdir, "sft_data", "sft.jsonl")
    sft.tools = rl.tools  # the SFT conversations' system prompt lists the tools RL and evaluation prompts list
    rl.checkpoint, rl.workdir = os.path.join(sft.workdir, "hf_checkpoint"), os.path.join(workdir, "rl")
    # the demo's task variant for RL and the held-out questions too (another seed than the training tasks)
    if rl.tasks.startswith("synthetic:"):
        rl.tasks = synthetic_spec(int(rl.tasks[len("synthetic:"):].partition(":")[0]), config.task.to_dict())
    rl.eval_tasks = synthetic_spec(config.eval_tasks, config.task.to_dict())
    return sft, rl


def prepare_sft_policy(config, sft, *, before_sft=None) -> dict | None:
    """Builds the tiny checkpoint and the SFT data unless they exist, calls `before_sft()`, and runs the sft mode
    unless its result exists. Returns the sft mode's result when it was stopped by a signal, else None."""
    from axpo_jax.data.synthetic import make_synthetic_task, sft_conversations, task_seed, write_sft_jsonl
    from axpo_jax.train import sft_run

    # each is built beside its place and renamed into it whole: an interrupted build is redone, not reused
    if not os.path.isdir(sft.checkpoint):
        _log(f"building a tiny Qwen3-VL checkpoint in {sft.checkpoint}")
        partial = sft.checkpoint + ".partial"
        shutil.rmtree(partial, ignore_errors=True)
        build_tiny_checkpoint(partial, seed=config.seed, **config.model.to_dict())
        os.replace(partial, sft.checkpoint)
    if not os.path.isfile(sft.data):
        tasks = [make_synthetic_task(task_seed(config.seed, i), **config.task.to_dict())
                 for i in range(config.sft_examples)]
        folder = os.path.dirname(sft.data)  # the JSONL and its images folder
        partial = folder + ".partial"
        shutil.rmtree(partial, ignore_errors=True)
        os.makedirs(partial)
        write_sft_jsonl(os.path.join(partial, os.path.basename(sft.data)),
                        sft_conversations(tasks, tool_fraction=config.sft_tool_fraction, seed=config.seed))
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(partial, folder)
    if before_sft is not None:
        before_sft()
    if os.path.isfile(os.path.join(sft.workdir, "hf_checkpoint", "config.json")):
        return None
    result = sft_run.run(sft)
    if "stopped_at_step" in result:
        return result
    _log(f"SFT: loss {result['first_loss']:.3f} -> {result['final_loss']:.3f} ({result['seconds']:.0f}s)")
    return None


def demo_settings(config) -> dict:
    """The fields that what the demo keeps in its workdir depends on: its own, the SFT stage's (skipped once its
    export exists) and those of the evaluations (kept per stage in evals.json), which RL's resume check leaves to
    the demo."""
    from axpo_jax.train.checkpoints import RESUMABLE_FIELDS

    settings = {key: config[key].to_dict() if hasattr(config[key], "to_dict") else config[key]
                for key in ("seed", "model", "task", "eval_tasks", "sft_examples", "sft_tool_fraction")}
    settings["sft"] = {k: v for k, v in config.sft.to_dict().items() if k not in RESUMABLE_FIELDS}
    settings["rl_eval"] = {k: v for k, v in config.rl.to_dict().items() if k.startswith("eval_") or k == "tools"}
    return settings


def run(config) -> dict:
    from axpo_jax.modes import check_run_settings
    from axpo_jax.tools.executor import ToolExecutor
    from axpo_jax.tools.registry import build_registry
    from axpo_jax.train import rl_run, sft_run
    from axpo_jax.train.plots import plot_rl_run

    started = time.perf_counter()
    workdir = os.path.abspath(config.workdir)
    os.makedirs(workdir, exist_ok=True)
    sft, rl = stage_configs(config)
    sft_run.checked_settings(sft)  # both stages' fields, before minutes of SFT
    rl_run.checked_settings(rl)
    # What the workdir's model, SFT data, SFT policy and evaluations are made of: a rerun with another task, model
    # or SFT recipe would reuse the old ones and report the old evaluations (RL checks its own training fields).
    check_run_settings(os.path.join(workdir, "demo_config.json"), demo_settings(config), write=True,
                       holds="the tiny model, SFT data and evaluations", option="workdir")
    executor = ToolExecutor(build_registry(list(rl.tools)), timeout_s=rl.tool_timeout_s)
    evals_path = os.path.join(workdir, "evals.json")
    evals = json.load(open(evals_path)) if os.path.isfile(evals_path) else {}

    def evaluate(stage: str, folder: str) -> None:
        # Greedy (configs/rl.py's eval_* fields): a model this small is derailed by the paper's presence penalty
        # of 1.5 (its tool-call JSON and answers repeat tokens); the eval mode defaults to the paper's settings.
        if stage in evals:
            return
        metrics = rl_run.evaluate_checkpoint(rl, folder, executor)
        evals[stage] = {k: metrics[f"eval/heldout/{k}"]
                        for k in ("pass@1", "tool_use_rate", "answer_rate", "top_answer_share")}
        _log(f"{stage}: {evals[stage]} ({time.perf_counter() - started:.0f}s)")
        with open(evals_path, "w") as f:
            json.dump(evals, f)

    stopped = prepare_sft_policy(config, sft, before_sft=lambda: evaluate("before", sft.checkpoint))
    if stopped:
        return stopped
    evaluate("after_sft", rl.checkpoint)
    rl_result = rl_run.run(rl)
    if "stopped_at_step" in rl_result:
        return rl_result
    evaluate("after_rl", rl_result["checkpoint"])

    with open(os.path.join(sft.workdir, "sft_metrics.jsonl")) as f:
        sft_losses = [json.loads(line)["loss"] for line in f if line.strip()]
    with open(rl_result["metrics"]) as f:
        rl_records = [json.loads(line) for line in f if line.strip()]
    plot_path = plot_rl_run(os.path.join(workdir, "learning_curves.png"), rl_records, sft_losses=sft_losses,
                            evals=evals)
    executor.close()
    return {
        "algo": rl.algo,
        **{f"{stage}/{k}": v for stage, figures in evals.items() for k, v in figures.items()},
        "rl_steps": rl.steps,
        "rl_final_reward": rl_result["final_reward"],
        "rl_sampled_tokens": rl_result["sampled_tokens"],
        "metrics": rl_result["metrics"],
        "plot": plot_path,
        "seconds": round(time.perf_counter() - started, 1),
    }
