"""The RL mode: AXPO (or GRPO, or an ablation) from a transformers checkpoint folder, usually the SFT result.

    python launch.py --config configs/rl.py[:preset] --config.checkpoint=<folder> --config.tasks=<tasks.jsonl>

Each step (axpo_jax/train/rl.py): rollouts of `questions_per_step` x N with real tools, rewards, AXPO selection and
forked continuations, two-stream advantages, the clipped update against the reference (the starting checkpoint).
Orbax checkpoints hold params, optimizer, step, RNG and the data iterator, so a killed run resumes exactly;
SIGTERM (a TPU preemption) saves and exits. Metrics go to `<workdir>/rl_metrics.jsonl` and TensorBoard, held-out
evaluations every `eval_every` steps into the same records, learning curves to `<workdir>/learning_curves.png`,
and the final policy to `<workdir>/hf_checkpoint` (a transformers folder).

Multi-host (launch.py joins jax.distributed): each process rolls out its share of every step's questions and runs
their tools (axpo_jax/train/rl.py), evaluations split their questions the same way, process 0 alone logs and
writes files, and a stop request seen by any process stops all of them after the same step.
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np


def _log(message: str) -> None:
    print(f"[rl] {message}", file=sys.stderr, flush=True)


def sampling_params(config):
    from axpo_jax.rollout.sampler import SamplingParams

    return SamplingParams(temperature=config.temperature, top_p=config.top_p, top_k=config.top_k,
                          presence_penalty=config.presence_penalty)


def make_estimator(config):
    """The advantage estimator named by `config.algo`: its group normalizer from `config.advantage`, and AXPO's
    own fields from `config.axpo` (AXPOConfig)."""
    from axpo_jax.algo import registry

    shared = config.advantage.to_dict()
    if config.algo == "axpo":
        return registry.make("axpo", {**config.axpo.to_dict(), **shared})
    return registry.make(config.algo, shared)


def loss_config(config, sampling):
    """The RL loss of `config`, scoring the policy at the rollouts' sampling temperature."""
    from axpo_jax.train.learner import LossConfig

    return LossConfig(kind="rl", eps_low=config.eps_low, eps_high=config.eps_high, kl_coef=config.kl_coef,
                      kl_kind=config.kl_kind, aggregation=config.loss_aggregation,
                      logprob_chunk=config.logprob_chunk, remat=config.remat,
                      temperature=sampling.logprob_temperature)


def optimizer(config):
    """The run's optimizer (axpo_jax/train/optimizer.py): its schedule spans the run's `steps` of `updates_per_step`
    optimizer updates each."""
    from axpo_jax.train.optimizer import make_optimizer

    return make_optimizer(learning_rate=config.learning_rate, total_steps=config.steps,
                          warmup_steps=int(config.warmup_fraction * config.steps),
                          updates_per_step=config.updates_per_step, weight_decay=config.weight_decay,
                          max_grad_norm=config.max_grad_norm)


def eval_settings(config):
    """The evaluation during training (axpo_jax/eval/settings.py) from the config's eval_* fields."""
    from axpo_jax.eval.settings import EvalSettings

    return EvalSettings(num_samples=config.eval_samples, temperature=config.eval_temperature, top_p=config.eval_top_p,
                        top_k=config.eval_top_k, presence_penalty=config.eval_presence_penalty,
                        max_turns=config.eval_max_turns, max_total_tokens=config.eval_capacity,
                        max_new_tokens_per_turn=config.eval_max_new_tokens_per_turn)


def eval_benchmark_names(config) -> list[str]:
    """`eval_benchmarks` as names: a tuple of them, or comma-separated (`--config.eval_benchmarks=vstar,hrbench4k`
    gives one string, as the eval mode's `benchmarks` does); a name that is no benchmark is a ValueError."""
    from axpo_jax.eval.benchmarks import BENCHMARKS

    value = config.eval_benchmarks
    names = [part.strip() for item in ([value] if isinstance(value, str) else value)
             for part in str(item).split(",") if part.strip()]
    unknown = [name for name in names if name not in BENCHMARKS]
    if unknown:
        raise ValueError(f"eval_benchmarks: unknown {unknown}; the benchmarks are {','.join(BENCHMARKS)}")
    return names


def eval_items(config) -> dict:
    """Held-out questions by benchmark: "heldout" from `eval_tasks` (a task source spec), plus every benchmark of
    `eval_benchmarks` read from `eval_data_dir` (axpo_jax/eval/benchmarks)."""
    from axpo_jax.data.tasks import task_source
    from axpo_jax.eval.benchmarks import load_benchmark
    from axpo_jax.eval.runner import items_from_tasks

    items = {}
    if config.eval_tasks:
        source = task_source(config.eval_tasks, seed=config.seed + 10_000)
        items["heldout"] = items_from_tasks("heldout", [source[i] for i in range(len(source))], config.reward_kind)
    for name in eval_benchmark_names(config):
        items[name] = load_benchmark(name, config.eval_data_dir, max_questions=config.eval_max_questions)[1]
    return items


def evaluate_checkpoint(config, folder: str, executor) -> dict:
    """The evaluation `run` does during training (the same questions, settings and key) of the policy saved in
    `folder`: flat metrics, eval/<benchmark>/pass@1, ... (e.g. of the starting policy, before any step)."""
    import jax

    from axpo_jax.data.processor import load_processor
    from axpo_jax.eval.runner import evaluate, make_agent
    from axpo_jax.models import qwen3_vl
    from axpo_jax.modes import checked_attention

    settings = eval_settings(config)
    dtype = qwen3_vl.dtype_named(config.dtype)  # as the run's own model, so its evaluations compare
    model = qwen3_vl.from_pretrained(folder, dtype=dtype).use_fused_attention_(checked_attention(config, dtype))
    agent = make_agent(model, load_processor(folder, config.max_image_pixels), executor, settings)
    return evaluate(agent, eval_items(config), jax.random.key(config.seed + 2), settings,
                    batch_size=config.eval_batch_size)


def memory_settings(config, batch_devices: int, processes: int | None = None, backend: str | None = None,
                    image_pixels: int | None = None):
    """What one RL step of this config holds (axpo_jax/bench/memory.py's RLMemorySettings) on `batch_devices`
    (data x fsdp) devices of `processes` processes (default: this run's; a pod's host count plans it from here) of
    `backend` (default: this run's), with images of up to `image_pixels` (default: `max_image_pixels`; the run
    passes its processor's limit, which is the folder's own when that is 0)."""
    import jax

    from axpo_jax.algo.axpo import AXPOConfig, resample_budget
    from axpo_jax.bench.memory import RLMemorySettings
    from axpo_jax.models.qwen3_vl import dtype_named, fused_attention_for
    from axpo_jax.parallel.sharding import rounded_rows_per_process, rows_per_device

    extra = resample_budget(config.questions_per_step, config.num_samples, AXPOConfig(**config.axpo.to_dict()))[0] \
        if config.algo == "axpo" else 0
    half = config.dtype == "bfloat16"
    rows = config.questions_per_step * config.num_samples + extra
    processes = jax.process_count() if processes is None else processes
    # micro_batch_size counts each process's rows, which the update rounds up to the process's batch devices
    # (RLTrainer._update); a micro-batch the batch devices cannot divide is replicated: each device holds all of it
    micro = rounded_rows_per_process(config.micro_batch_size, batch_devices, processes)
    rows_per_update = -(-rows // (processes * config.updates_per_step))
    attention = fused_attention_for(config.attention, dtype_named(config.dtype), backend)
    return RLMemorySettings(
        seq_len=config.capacity, kv_cache_tokens=config.capacity,
        micro_batch_per_device=rows_per_device(config.micro_batch_size, {"fsdp": batch_devices}, processes),
        micro_batches=-(-rows_per_update // micro), rollout_rows=rows,
        param_bytes=2 if half else 4, grad_bytes=2 if half else 4, compute_bytes=2 if half else 4,
        reference_model=bool(config.kl_coef), remat=config.remat, logprob_chunk=config.logprob_chunk,
        image_pixels=config.max_image_pixels if image_pixels is None else image_pixels,
        # only cuDNN's and splash's kernels keep no S x S scores (XLA's dot_product_attention materializes them);
        # splash is the decoder's only
        fused_attention=attention in ("cudnn", "splash"), fused_vision_attention=attention == "cudnn")


def check_memory(config, mesh, image_pixels: int | None = None) -> None:
    """Refuses (PlanDoesNotFit, one line) a run whose RL step would not fit the device, before anything is
    allocated: the analytic plan of axpo_jax/bench/memory.py for this config's model, mesh, rollout size and
    largest image (`image_pixels`: the processor's limit)."""
    from axpo_jax.bench.memory import ensure_plan_fits
    from axpo_jax.models.qwen3_vl import Qwen3VLConfig

    batch_devices = 1 if mesh is None else mesh.shape["data"] * mesh.shape["fsdp"]
    ensure_plan_fits(Qwen3VLConfig.from_pretrained(config.checkpoint), mesh or {"fsdp": 1},
                     memory_settings(config, batch_devices, image_pixels=image_pixels),
                     device_memory_gib=config.device_memory_gib or None)


def bench_record(config, records: list[dict], text_config):
    """The run as one benchmark record (axpo_jax/bench/record.py), comparable with other machines and with verl:
    medians over the steps that compiled nothing (steady state), else over the steps after the first, which
    compiles most; `notes` says which. Update tokens are every position the update reads (its FLOPs are spent on
    prompts and observations too), over rows of the update's length; a decode step's context is the rows' mean
    length (an upper bound: a step attends over the tokens so far). Steps whose update was skipped
    (`skip_zero_signal_steps`) are left out while any step updated."""
    from axpo_jax.bench import record as bench

    updated = [r for r in records if not r.get("update_skipped")] or records
    steady = [r for r in updated if r.get("compiles") == 0]
    timed = steady or updated[1:] or updated
    notes = (f"medians of {len(steady)} steps without compilation" if steady else
             "no step ran without compiling: medians of the steps after the first, compile time included")

    def median(key: str) -> float:
        return float(np.median([r[key] for r in timed]))

    return bench.make_record(
        label=f"{config.algo} {os.path.basename(os.path.normpath(config.checkpoint))}", **bench.current_devices(),
        text_config=text_config, seq_len=int(median("update_seq_len")),
        decode_context=int(median("mean_trajectory_tokens")), step_s=median("step_s"),
        rollout_s=median("time_rollout_s"), tools_s=median("time_tools_s"), update_s=median("time_update_s"),
        rollout_tokens=int(median("sampled_tokens")), update_tokens=int(median("update_positions")),
        steps=len(timed), notes=notes)


def python_sessions(config, estimator) -> int:
    """How many python kernels to keep: one per row a rollout batch holds on this process (the rollout's, the
    AXPO continuations', an evaluation batch's; each batch closes its sessions when it ends), at least the tool's
    default. Fewer would shut a live conversation's kernel down every turn."""
    import jax

    from axpo_jax.algo.axpo import resample_budget

    continuations = resample_budget(config.questions_per_step, config.num_samples, estimator.config)[0] \
        if estimator.k else 0
    rows = max(config.questions_per_step * config.num_samples, continuations) // jax.process_count()
    return min(900, max(64, rows, config.eval_batch_size * config.eval_samples))  # 900: the tool's uid range


def checked_settings(config):
    """The run's sampling and evaluation settings, advantage estimator and parameter dtype, each field checked
    (ModeError, one line, naming the fields) before anything loads; the demo calls it before its SFT stage."""
    import jax

    from axpo_jax.models.qwen3_vl import dtype_named
    from axpo_jax.modes import (ModeError, checked_attention, config_fields, require_ints_at_least, require_number,
                                require_optimizer_fields, require_positive_ints, require_workdir)

    with config_fields("steps, questions_per_step, num_samples, micro_batch_size"):
        require_positive_ints(config, "steps", "questions_per_step", "num_samples", "micro_batch_size")
    with config_fields("the rollout, checkpoint and evaluation sizes"):
        require_positive_ints(config, "capacity", "max_turns", "max_new_tokens_per_turn", "pipeline_groups",
                              "decode_segment_tokens", "logprob_chunk", "checkpoint_every", "keep_checkpoints",
                              "eval_batch_size")
        require_ints_at_least(config, 0, "seed", "eval_every", "max_image_pixels")
        require_number(config, "tool_timeout_s", above=0)
    with config_fields("learning_rate, warmup_fraction, weight_decay, max_grad_norm"):
        require_optimizer_fields(config)
    with config_fields("max_consecutive_skipped_updates"):
        require_positive_ints(config, "max_consecutive_skipped_updates")
    with config_fields("workdir"):
        require_workdir(config.workdir)
    with config_fields("temperature, top_p, top_k, presence_penalty"):
        sampling = sampling_params(config)
    with config_fields("the eval_* fields"):
        settings = eval_settings(config)
        eval_benchmark_names(config)
    with config_fields("algo, axpo, advantage"):
        estimator = make_estimator(config)
    with config_fields("eps_low, eps_high, kl_coef, kl_kind, loss_aggregation"):
        loss_config(config, sampling)
    with config_fields("dtype"):
        dtype = dtype_named(config.dtype)
    checked_attention(config, dtype)
    from axpo_jax.algo.rewards import KINDS

    rl_kinds = tuple(kind for kind in KINDS if kind != "judge")  # a judge model has no place in the RL step
    if config.reward_kind not in rl_kinds:
        raise ModeError(f"config.reward_kind must be one of {rl_kinds}, got {config.reward_kind!r}")
    if not isinstance(config.skip_zero_signal_steps, bool):
        raise ModeError(f"config.skip_zero_signal_steps must be True or False, got {config.skip_zero_signal_steps!r}")
    rows_per_process = config.questions_per_step // jax.process_count() * config.num_samples
    if not (isinstance(config.updates_per_step, int) and 1 <= config.updates_per_step <= rows_per_process):
        raise ModeError(f"config.updates_per_step must be an int from 1 to the step's rollouts on each process "
                        f"({rows_per_process}), got {config.updates_per_step!r}")
    return sampling, settings, estimator, dtype


def run(config) -> dict:
    from axpo_jax.train.checkpoints import StopRequest

    with StopRequest() as stop:  # the signal handlers it installs are put back however the run ends
        return _run(config, stop)


def _run(config, stop) -> dict:
    import jax
    from tqdm.auto import tqdm

    from axpo_jax.data.synthetic import task_dataset
    from axpo_jax.data.tasks import (check_same_records, next_batch_on_every_process, read_on_every_process,
                                     task_source)
    from axpo_jax.models import qwen3_vl
    from axpo_jax.parallel import distributed
    from axpo_jax.parallel.distributed import data_shard
    from axpo_jax.parallel.mesh import mesh_from_config
    from axpo_jax.rollout.agent_loop import AgentLoop
    from axpo_jax.eval.run import search_backend
    from axpo_jax.eval.runner import evaluate, make_agent
    from axpo_jax.modes import checked_attention, checked_processor, config_fields
    from axpo_jax.tools.executor import ToolExecutor
    from axpo_jax.tools.registry import build_registry
    from axpo_jax.train.checkpoints import Checkpointer, check_resume_settings, check_shared_workdir, export_folder
    from axpo_jax.train.compiles import CompileClock
    from axpo_jax.train.learner import Learner
    from axpo_jax.train.metrics import MetricsLog
    from axpo_jax.train.optimizer import NonFiniteUpdates, consecutive_skipped_updates
    from axpo_jax.train.plots import plot_rl_run
    from axpo_jax.train.rl import RLTrainer

    started = time.perf_counter()
    sampling, settings, estimator, dtype = checked_settings(config)
    # the tools and the tasks are made before anything loads too: a wrong file is one line, not a traceback
    with config_fields("tools, search_corpus, search_endpoint"):
        search, _ = search_backend(config)
        if "search" in config.tools and search is None:
            raise ValueError("the search tool needs a backend: search_corpus (a JSONL corpus for offline BM25) or "
                             "search_endpoint (a web search API, its key in search_api_key_env)")
        registry = build_registry(list(config.tools), search_backend=search,
                                  python_options={"max_sessions": python_sessions(config, estimator)})
    with config_fields("tasks"):
        source = read_on_every_process(f"tasks {config.tasks}", lambda: task_source(config.tasks, seed=config.seed + 1))
    with config_fields("mesh"):
        mesh = mesh_from_config(config.mesh.to_dict())
    processor = checked_processor(config)  # before the workdir and weights: a bad folder or limit is one line
    stop.install()
    workdir = os.path.abspath(config.workdir)
    os.makedirs(workdir, exist_ok=True)
    check_shared_workdir(workdir)  # before any process writes checkpoints there, or reads them to resume
    primary = distributed.is_primary()  # multi-host: the one process that logs, shows progress and writes files
    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), keep=config.keep_checkpoints)
    check_resume_settings(config, workdir, checkpointer, primary=primary)
    check_memory(config, mesh, int(processor.image_processor.size["longest_edge"]))
    attention = checked_attention(config, dtype)
    model = qwen3_vl.from_pretrained(config.checkpoint, dtype=dtype, mesh=mesh).use_fused_attention_(attention)
    reference = (qwen3_vl.from_pretrained(config.reference or config.checkpoint, dtype=dtype, mesh=mesh)
                 .use_fused_attention_(attention) if config.kl_coef else None)
    executor = ToolExecutor(registry, timeout_s=config.tool_timeout_s)
    agent = AgentLoop(model, processor, executor, max_turns=config.max_turns,
                      max_new_tokens_per_turn=config.max_new_tokens_per_turn, capacity=config.capacity,
                      pipeline_groups=config.pipeline_groups, decode_segment_tokens=config.decode_segment_tokens,
                      sticky_image_buckets=config.sticky_image_buckets, mesh=mesh, log=lambda m: None)
    learner = Learner(model, optimizer(config), loss_config(config, sampling), reference=reference, mesh=mesh)
    trainer = RLTrainer(learner, agent, estimator, num_samples=config.num_samples,
                        micro_batch_size=config.micro_batch_size, sampling=sampling,
                        reward_kind=config.reward_kind, layout_shards=config.layout_shards or None,
                        fixed_resample_batch=config.fixed_resample_batch, updates_per_step=config.updates_per_step,
                        skip_zero_signal_steps=config.skip_zero_signal_steps)
    shard = data_shard(mesh)
    if primary:
        _log(f"{len(source)} training tasks from {config.tasks}")
    dataset = iter(task_dataset(source, seed=config.seed, batch_size=config.questions_per_step))
    evaluations = (read_on_every_process("evaluation questions", lambda: eval_items(config), compare=False)
                   if config.eval_every else {})
    for name, items in evaluations.items():  # every process asks its share of the same questions
        check_same_records(f"evaluation questions of {name} "
                           f"({config.eval_tasks if name == 'heldout' else config.eval_data_dir})", items)
    # its own samplers (the evaluation's limits), the same policy object: it evaluates the weights being trained
    eval_agent = make_agent(model, processor, executor, settings, mesh=mesh) if evaluations else None

    rng, first_step = jax.random.key(config.seed), 0
    restored = checkpointer.restore(model, learner.optimizer)
    if restored is not None:
        first_step, rng, extra = restored
        dataset.set_state(extra["data"])
        # the sticky image floors of the rollouts and of the evaluations (checkpoints from before them have none)
        for name, loop in (("image_buckets", agent), ("eval_image_buckets", eval_agent)):
            if loop is not None and extra.get(name):
                loop.load_image_bucket_state(extra[name])
        if primary:
            _log(f"resumed from step {first_step}")
    metrics = MetricsLog(workdir, resume_step=first_step, name="rl_metrics", tensorboard=config.tensorboard,
                         primary=primary)
    progress = tqdm(range(first_step, config.steps), desc=f"RL ({config.algo})", file=sys.stderr, mininterval=1.0,
                    dynamic_ncols=True, initial=first_step, total=config.steps, disable=not primary)
    compile_clock = CompileClock()
    with checkpointer.landing_saves_on_failure():
        for step in progress:
            rng, key = jax.random.split(rng)
            compile_clock.take()  # the last step's evaluation and checkpoint are not this step's
            step_started = time.perf_counter()
            # every process reads the same batch and runs its own share of the questions
            questions = next_batch_on_every_process(dataset, "the step's questions")
            out = trainer.step(questions[shard.rows(len(questions))], key, step)
            record = {k: v for k, v in out.metrics.items() if np.isscalar(v)}
            record["step_s"] = time.perf_counter() - step_started
            record.update(compile_clock.take())
            if evaluations and ((step + 1) % config.eval_every == 0 or step + 1 == config.steps):
                record.update(evaluate(eval_agent, evaluations, jax.random.key(config.seed + 2), settings,
                                       batch_size=config.eval_batch_size))
            record = metrics.write(step + 1, record)
            progress.set_postfix(reward=f"{record['reward']:.2f}", loss=f"{record.get('loss', float('nan')):.4f}",
                                 resamples=f"{record['resamples_used']}/{record['resample_budget']}")
            # before this step's checkpoint; the same on every process (the optimizer state is the global batch's)
            streak = consecutive_skipped_updates(learner.optimizer.opt_state)
            if streak >= config.max_consecutive_skipped_updates:
                metrics.close()
                executor.close()
                raise NonFiniteUpdates(step + 1, streak, config.max_consecutive_skipped_updates)
            stopping = stop.agreed()  # every process stops after the same step, with the same checkpoint
            if (step + 1) % config.checkpoint_every == 0 or step + 1 == config.steps or stopping:
                checkpointer.save(step + 1, model, learner.optimizer, rng=rng, extra={
                    "data": dataset.get_state(), "image_buckets": agent.image_bucket_state(),
                    "eval_image_buckets": eval_agent.image_bucket_state() if eval_agent is not None else None})
            if stopping:
                checkpointer.close()
                metrics.close()
                executor.close()
                if primary:
                    _log(f"{stop.describe()}: checkpoint of step {step + 1} saved; stopping (rerun to resume)")
                return {"stopped_at_step": step + 1, "signal": stop.describe()}
    checkpointer.close()
    metrics.close()
    executor.close()
    output = os.path.join(workdir, "hf_checkpoint")
    export_folder(model, processor, output)
    plot = os.path.join(workdir, "learning_curves.png")
    records = metrics.records
    evals = [r for r in records if "eval/average/pass@1" in r]
    record = bench_record(config, records, model.config.text) if records else None
    if primary:
        plot_rl_run(plot, records)
        records_path = os.path.join(workdir, "bench_records.jsonl")
        # one record per run: a rerun of a finished run adds no second one, but a run stopped (or failed) after its
        # last checkpoint and before its record still gets it
        if record is not None and not (os.path.isfile(records_path) and os.path.getsize(records_path)):
            from axpo_jax.bench.record import append_jsonl

            append_jsonl(record, records_path)
    distributed.sync("rl outputs written")  # no process reports paths to files still being written
    return {
        "algo": config.algo,
        "steps": config.steps,
        "final_reward": records[-1]["reward"] if records else None,
        "mean_reward": float(np.mean([r["reward"] for r in records])) if records else None,
        "final_eval_pass@1": evals[-1]["eval/average/pass@1"] if evals else None,
        "sampled_tokens": int(sum(r["sampled_tokens"] for r in records)),
        "checkpoint": output,
        "metrics": metrics.path,
        "plot": plot,
        "bench_record": record.to_dict() if record is not None else None,
        "seconds": round(time.perf_counter() - started, 1),
    }
