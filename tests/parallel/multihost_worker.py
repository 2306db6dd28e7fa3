"""One process of a multi-host run on 127.0.0.1, started by tests/parallel/test_multihost.py (or by hand):

    python tests/parallel/multihost_worker.py --checkpoint DIR --sft-data SFT.npz --out OUT.json [--sft-steps 3] \
        [--rl-steps 1] [--process-id I --num-processes P --port PORT] [--devices-per-process D] [--mesh data=2,fsdp=2]

(SFT.npz: `write_sft_data(DIR, SFT.npz, count)`; PYTHONPATH must hold the repository root.)

With --num-processes 1 it is the single-process reference: the same global batch in one process. Each process
builds only its own rows of every global batch (`distributed.data_shard`), joins the cluster through the same
environment variables `launch.py` reads, and writes what it measured (per-step losses and metrics, its rows) to
OUT.json, so the test compares processes with each other and with the reference.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np


def parse_args(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoint", required=True, help="tiny transformers-format checkpoint folder")
    parser.add_argument("--sft-data", required=True, help="npz written by write_sft_data")
    parser.add_argument("--out", required=True)
    parser.add_argument("--process-id", type=int, default=0)
    parser.add_argument("--num-processes", type=int, default=1)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--devices-per-process", type=int, default=1)
    parser.add_argument("--mesh", default="fsdp=-1", help="mesh axes over all devices, e.g. data=2,fsdp=2")
    parser.add_argument("--sft-steps", type=int, default=3, help="the run's last SFT step (global step count)")
    parser.add_argument("--sft-batch", type=int, default=4, help="SFT examples per step (global)")
    parser.add_argument("--save-at", type=int, default=0, help="checkpoint after this SFT step (0: never)")
    parser.add_argument("--stop-after-save", action="store_true", help="exit right after the checkpoint")
    parser.add_argument("--rl-steps", type=int, default=0, help="AXPO steps after SFT")
    parser.add_argument("--rl-questions", type=int, default=4, help="questions per RL step (global)")
    # the sampling key of RL step s is key(rl_key + s); the test needs one whose AXPO selection is uneven over
    # the two processes (so one of them forks padding rows), which depends on the sampler's draws
    parser.add_argument("--rl-key", type=int, default=104)
    parser.add_argument("--layout-shards", type=int, default=0,
                        help="RLTrainer.layout_shards (a single-process reference takes the multi-process count)")
    parser.add_argument("--resume", action="store_true", help="restore the latest checkpoint first")
    parser.add_argument("--checkpoint-dir", default="", help="orbax directory for --save-at / --resume")
    return parser.parse_args(argv)


def setup(args):
    """Environment before jax starts: the fake CPU devices, and the cluster through launch.py's variables."""
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices_per_process}"
    if args.num_processes > 1:
        os.environ.update({"JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{args.port}",
                           "JAX_NUM_PROCESSES": str(args.num_processes), "JAX_PROCESS_ID": str(args.process_id)})
    from axpo_jax.parallel import distributed

    distributed.avoid_cpu_collective_deadlocks()  # several CPU devices per process (the reference has 4)
    distributed.initialize_from_env("auto")
    info = distributed.process_info()
    assert info.initialized == (args.num_processes > 1), info
    assert info.process_count == args.num_processes and info.process_index == args.process_id, info
    assert info.device_count == args.num_processes * args.devices_per_process, info
    return info


def make_mesh(spec: str):
    from axpo_jax.parallel.mesh import make_mesh as mesh_of

    return mesh_of({k: int(v) for k, v in (part.split("=") for part in spec.split(","))})


# ------------------------------------------------------------------------------------------------------------ SFT
def write_sft_data(checkpoint: str, path: str, count: int) -> None:
    """The SFT data set: expert zoom trajectories of synthetic tasks 0..count-1, as training arrays (one npz, one
    entry per example), so a worker reads only its own examples and never needs the HF processor (or torch)."""
    from axpo_jax.data.processor import load_processor
    from axpo_jax.data.synthetic import expert_trajectory, make_task, sft_example, task_seed
    from axpo_jax.tools.registry import build_registry

    processor = load_processor(checkpoint)
    schemas = build_registry(["image_zoom_in"]).schemas()
    arrays = {"pad_id": processor.tokenizer.pad_token_id}
    for i in range(count):
        example = sft_example(expert_trajectory(make_task(task_seed(7, i))), processor, schemas)
        arrays.update({f"{i}/{key}": value for key, value in example.items()})
    np.savez(path, **arrays)


def sft_batch(config, data, indices):
    """The TrainBatch of the SFT examples with these indices (read from the data file, nothing else)."""
    from axpo_jax.models.qwen3_vl.inputs import bucket
    from axpo_jax.train.batch import make_batch

    examples = [{key.split("/", 1)[1]: data[key] for key in data.files if key.startswith(f"{i}/")} for i in indices]
    images = [e for e in examples if "pixel_values" in e]
    return make_batch(
        config, [e["input_ids"].tolist() for e in examples], [e["loss_mask"] for e in examples],
        pixel_values=np.concatenate([e["pixel_values"] for e in images]) if images else None,
        image_grid_thw=np.concatenate([e["image_grid_thw"] for e in images]) if images else None,
        length=bucket(max(len(e["input_ids"]) for e in examples), 64), pad_id=int(data["pad_id"]),
    )


def run_sft(args, mesh, model, record) -> bool:
    """SFT steps on expert zoom trajectories, each process building only its rows; checkpoint / resume. Returns
    False when the run stops after its checkpoint."""
    import jax

    from axpo_jax.parallel import distributed
    from axpo_jax.train.checkpoints import Checkpointer
    from axpo_jax.train.learner import Learner, LossConfig
    from axpo_jax.train.optimizer import make_optimizer

    data = np.load(args.sft_data)
    # a high rate: three steps teach a random model the task's token statistics, tool-call tags included, so the
    # RL rollouts that follow call tools and AXPO has prefixes to fork
    learner = Learner(model, make_optimizer(learning_rate=3e-2, total_steps=10), LossConfig(kind="sft"), mesh=mesh)
    shard = distributed.data_shard(mesh)
    rows = shard.rows(args.sft_batch)
    checkpointer = Checkpointer(args.checkpoint_dir) if args.checkpoint_dir else None
    rng, first = jax.random.key(0), 0
    if args.resume:
        first, rng, extra = checkpointer.restore(model, learner.optimizer)
        # this process's own cursor over its part of the data came back to it
        assert extra["process_extra"] == {"next_example": first * args.sft_batch + rows.start}, extra
        assert extra["phase"] == "sft" and distributed.allgather(first).tolist() == [first] * shard.count
        record["resumed_from"] = first
    for step in range(first, args.sft_steps):
        step_started = time.perf_counter()
        indices = range(step * args.sft_batch + rows.start, step * args.sft_batch + rows.stop)
        metrics = learner.step([sft_batch(model.config, data, indices)])
        record["sft"].append({"step": step + 1, "rows": list(indices),
                              "seconds": round(time.perf_counter() - step_started, 2),
                              **{key: metrics[key] for key in ("loss", "grad_norm", "trained_tokens", "entropy")}})
        rng, _ = jax.random.split(rng)
        if step + 1 == args.save_at:
            checkpointer.save(step + 1, model, learner.optimizer, rng=rng, extra={"phase": "sft"},
                              process_extra={"next_example": (step + 1) * args.sft_batch + rows.start})
            if args.stop_after_save:
                checkpointer.close()
                return False
    if checkpointer is not None:
        checkpointer.close()
    return True


def run_rl(args, mesh, model, record) -> None:
    """AXPO steps: each process rolls out its questions (N samples each) and runs their tools; selection is global;
    each process forks the prefixes it owns; one update over every process's rows."""
    import jax

    from axpo_jax.algo import registry
    from axpo_jax.data.processor import load_processor
    from axpo_jax.data.synthetic import make_task, task_seed
    from axpo_jax.parallel import distributed
    from axpo_jax.rollout.agent_loop import AgentLoop
    from axpo_jax.rollout.sampler import SamplingParams
    from axpo_jax.tools.executor import ToolExecutor
    from axpo_jax.tools.registry import build_registry
    from axpo_jax.train.learner import Learner, LossConfig
    from axpo_jax.train.optimizer import make_optimizer
    from axpo_jax.train.rl import RLTrainer

    processor = load_processor(args.checkpoint)
    executor = ToolExecutor(build_registry(["image_zoom_in"]), timeout_s=10.0)
    agent = AgentLoop(model, processor, executor, max_turns=2, max_new_tokens_per_turn=48, capacity=768, mesh=mesh,
                      log=lambda m: None)
    learner = Learner(model, make_optimizer(learning_rate=1e-3, total_steps=10), LossConfig(kind="rl", kl_coef=0.0),
                      mesh=mesh)
    # A policy three SFT steps old answers nothing correctly, so every reward would be 0 and every advantage 0;
    # this reward (policy tokens odd) varies, which makes the loss compared with the reference non-trivial.
    trainer = RLTrainer(learner, agent, registry.make("axpo", ratio=0.5, k=2), num_samples=4, micro_batch_size=4,
                        sampling=SamplingParams(temperature=1.0), layout_shards=args.layout_shards or None,
                        reward_fn=lambda trajectory, task: float(sum(trajectory.policy_mask) % 2))
    rows = distributed.data_shard(mesh).rows(args.rl_questions)
    for step in range(args.rl_steps):
        step_started = time.perf_counter()
        questions = range(step * args.rl_questions + rows.start, step * args.rl_questions + rows.stop)
        out = trainer.step([make_task(task_seed(11, i)) for i in questions], jax.random.key(args.rl_key + step), step)
        first_row = rows.start * trainer.num_samples
        record["rl"].append({
            "step": step + 1, "questions": list(questions),
            "seconds": round(time.perf_counter() - step_started, 2),
            "metrics": {k: v for k, v in out.metrics.items() if isinstance(v, (int, float))},
            "rewards_qn": out.rewards_qn.tolist(), "resample_rewards_sk": out.resample_rewards_sk.tolist(),
            "selections": [[s.question, s.rollout] for s in out.advantages.selections],
            # this process's trajectories by their row in the step, its forks by the row they were forked from
            "trajectories": {first_row + b: t.token_ids for b, t in enumerate(out.trajectories)},
            "resamples": [[first_row + t.resampled_from, t.token_ids] for t in out.resamples],
        })


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    info = setup(args)
    mesh = make_mesh(args.mesh)
    from axpo_jax.models import qwen3_vl
    from axpo_jax.parallel import distributed

    record = {"process_index": info.process_index, "process_count": info.process_count,
              "data_shard": [distributed.data_shard(mesh).index, distributed.data_shard(mesh).count],
              "sft": [], "rl": []}
    model = qwen3_vl.from_pretrained(args.checkpoint, mesh=mesh)  # every device reads only its own slices
    record["setup_seconds"] = round(time.perf_counter() - started, 2)
    if run_sft(args, mesh, model, record) and args.rl_steps:
        run_rl(args, mesh, model, record)
    record["seconds"] = round(time.perf_counter() - started, 1)
    with open(args.out, "w") as f:
        json.dump(record, f)
    distributed.sync("worker done")  # nobody tears the cluster down while another process still needs it
    print(f"worker {info.process_index} done in {record['seconds']}s", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    sys.exit(main())
