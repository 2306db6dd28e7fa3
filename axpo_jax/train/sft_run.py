"""The SFT mode: multi-turn tool-use trajectories (JSONL + image files) -> the policy RL starts from.

    python launch.py --config configs/sft.py --config.checkpoint=<transformers folder> --config.data=<sft.jsonl>

Each JSONL line is a conversation (`{"messages": [...]}`, images as paths relative to the file, see
`axpo_jax/data/synthetic.py:write_sft_jsonl`). Tokens the policy writes (assistant turns) are trained; prompts and
tool observations are masked. Records whose line or image is bad are skipped and counted by the source; a
conversation the chat template cannot mask, or longer than `max_length`, is skipped at batching and counted; a run
in which every conversation was skipped (no step trained a token) ends with an error, not an exported folder.
Checkpoints (orbax, with the data iterator) make an interrupted run resume exactly; the end result is saved as a
transformers folder (`<workdir>/hf_checkpoint`) that `rl` and `eval` load like any checkpoint.

Multi-host (launch.py joins jax.distributed): every process reads the same batches and trains on its share of the
rows (`data_shard`); the loss and metrics are the global batch's, process 0 alone logs and writes the metrics and
the exported folder, and a stop request seen by any process stops all of them after the same step.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import time

import numpy as np


def _log(message: str) -> None:
    print(f"[sft] {message}", file=sys.stderr, flush=True)


def sft_micro_batches(examples: list[dict], model_config, pad_id: int, micro_batch_size: int,
                      length_bucket: int = 64):
    """Same-shaped micro-batches of SFT examples (`sft_example` dicts); rows beyond the examples are untrained
    copies, so every step of a run reuses a few compiled shapes."""
    from axpo_jax.models.qwen3_vl.inputs import bucket
    from axpo_jax.train.batch import make_batch

    rows = examples + [dict(examples[0], loss_mask=np.zeros_like(examples[0]["loss_mask"]))
                       for _ in range(-len(examples) % micro_batch_size)]
    chunks = [rows[i: i + micro_batch_size] for i in range(0, len(rows), micro_batch_size)]
    length = bucket(max(len(e["input_ids"]) for e in rows), length_bucket)
    image_rows = bucket(max(sum(len(e.get("image_grid_thw", ())) for e in c) for c in chunks), 4)
    batches = []
    for chunk in chunks:
        with_images = [e for e in chunk if "pixel_values" in e]
        batches.append(make_batch(
            model_config, [e["input_ids"].tolist() for e in chunk], [e["loss_mask"] for e in chunk],
            pixel_values=np.concatenate([e["pixel_values"] for e in with_images]) if with_images else None,
            image_grid_thw=np.concatenate([e["image_grid_thw"] for e in with_images]) if with_images else None,
            length=length, num_image_rows=image_rows, pad_id=pad_id,
        ))
    return batches


def agreed_micro_batches(examples: list[dict], model_config, pad_id: int, micro_batch_size: int,
                         length_bucket: int = 64, shard=None):
    """This process's micro-batches, as many as any process has (None on every process when no process has an
    example left): every process must run the same number of micro-batch updates, and conversations skipped at
    batching (too long, unmaskable) can leave processes with different counts. The extra micro-batches are
    untrained copies (of a one-token placeholder when this process has no example at all), which change neither
    the loss nor the gradients: both are normalized by the global batch's trained tokens.

    `micro_batch_size` counts this process's rows; it is rounded up to a multiple of `shard`'s batch positions
    (`data_shard(mesh)`), as the RL update does: fewer rows than this process's devices on the batch axes cannot
    be split over them (1 row on 2 processes x 2 devices fails at the first step)."""
    from axpo_jax.parallel import distributed
    from axpo_jax.train.batch import make_batch

    if shard is not None:
        micro_batch_size = shard.round_rows(micro_batch_size)
    count = int(distributed.max_across_processes(np.int64(-(-len(examples) // micro_batch_size))))
    if count == 0:
        return None
    if examples:
        batches = sft_micro_batches(examples, model_config, pad_id, micro_batch_size, length_bucket)
    else:
        batches = [make_batch(model_config, [[pad_id, pad_id]] * micro_batch_size,
                              [np.zeros(2, np.float32)] * micro_batch_size, pad_id=pad_id)]
    untrained = batches[-1].replace(loss_mask_bt=np.zeros_like(batches[-1].loss_mask_bt))
    return batches[:count] + [untrained] * (count - len(batches[:count]))


def trainable_example(record: dict, processor, schemas, max_length: int) -> tuple[dict | None, str | None]:
    """(the `sft_example` arrays of a record, None), or (None, why it is skipped): the template cannot render or
    mask it, it is longer than `max_length` tokens, or it has no token to train. Any exception of the rendering
    skips the one record: the source checked the conversation's shape, and whatever still slips through must not
    stop a run (a resumed run reads the same batches and would stop at the same record again)."""
    from axpo_jax.data.synthetic import sft_example

    try:
        example = sft_example(record["messages"], processor, schemas)
    except Exception as error:  # noqa: BLE001
        return None, f"{type(error).__name__}: {' '.join(str(error).split())[:300]}"
    if len(example["input_ids"]) > max_length:
        return None, f"{len(example['input_ids'])} tokens, longer than max_length {max_length}"
    if not example["loss_mask"].any():
        return None, "no token to train (no assistant turn the template renders)"
    return example, None


def prepared_examples(records: list, *, shard, processor, schemas, max_length: int) -> tuple[list, list, list]:
    """(a step's records, this process's share of them as `trainable_example`s, why the others were skipped):
    process-local, so it runs ahead of the trainer in `prepared_ahead`'s thread."""
    examples, skip_reasons = [], []
    for record in records[shard.rows(len(records))]:
        example, reason = trainable_example(record, processor, schemas, max_length)
        if example is None:
            skip_reasons.append(reason)
        else:
            examples.append(example)
    return records, examples, skip_reasons


def checked_settings(config):
    """The parameter dtype and the tool schemas of the run, each field checked (ModeError, one line, naming the
    fields) before anything loads; the demo calls it before it starts."""
    from axpo_jax.models.qwen3_vl import dtype_named
    from axpo_jax.modes import (checked_attention, config_fields, require_ints_at_least, require_optimizer_fields,
                                require_positive_ints, require_workdir)
    from axpo_jax.tools.registry import standard_schemas

    with config_fields("steps, batch_size, micro_batch_size, checkpoint_every"):
        require_positive_ints(config, "steps", "batch_size", "micro_batch_size", "checkpoint_every")
    with config_fields("seed, keep_checkpoints, max_length, length_bucket, logprob_chunk"):
        require_positive_ints(config, "keep_checkpoints", "max_length", "length_bucket", "logprob_chunk")
        require_ints_at_least(config, 0, "seed", "max_image_pixels")
    with config_fields("learning_rate, warmup_fraction, weight_decay, max_grad_norm"):
        require_optimizer_fields(config)
    with config_fields("max_consecutive_skipped_updates"):
        require_positive_ints(config, "max_consecutive_skipped_updates")
    with config_fields("workdir"):
        require_workdir(config.workdir)
    with config_fields("dtype"):
        dtype = dtype_named(config.dtype)
    checked_attention(config, dtype)
    with config_fields("tools"):
        # the tool schemas the conversations were written against: they are part of the rendered system prompt
        schemas = standard_schemas(list(config.tools)) if config.tools else None
    return dtype, schemas


def run(config) -> dict:
    from axpo_jax.train.checkpoints import StopRequest

    with StopRequest() as stop:  # the signal handlers it installs are put back however the run ends
        return _run(config, stop)


def _run(config, stop) -> dict:
    from tqdm.auto import tqdm

    from axpo_jax.data.synthetic import SFTSource, prepared_ahead, task_dataset
    from axpo_jax.data.tasks import DataFileError, next_batch_on_every_process, read_on_every_process
    from axpo_jax.models import qwen3_vl
    from axpo_jax.modes import checked_attention, checked_processor, config_fields
    from axpo_jax.parallel import distributed
    from axpo_jax.parallel.distributed import data_shard
    from axpo_jax.parallel.mesh import mesh_from_config
    from axpo_jax.train.checkpoints import Checkpointer, check_resume_settings, check_shared_workdir, export_folder
    from axpo_jax.train.compiles import CompileClock
    from axpo_jax.train.learner import Learner, LossConfig
    from axpo_jax.train.metrics import MetricsLog
    from axpo_jax.train.optimizer import NonFiniteUpdates, consecutive_skipped_updates, make_optimizer

    started = time.perf_counter()
    dtype, schemas = checked_settings(config)
    with config_fields("data"):  # read before anything loads: a file with no usable line is one line, not a traceback
        source = read_on_every_process(f"data file {config.data}", lambda: SFTSource(config.data))
    with config_fields("mesh"):
        mesh = mesh_from_config(config.mesh.to_dict())
    # before the weights and the workdir: a folder without tokenizer, image settings or chat template, or a limit
    # below its smallest image, is one line
    processor = checked_processor(config)
    stop.install()
    primary = distributed.is_primary()  # multi-host: the one process that logs, shows progress and writes files
    workdir = os.path.abspath(config.workdir)
    os.makedirs(workdir, exist_ok=True)
    check_shared_workdir(workdir)  # before any process writes checkpoints there, or reads them to resume
    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), keep=config.keep_checkpoints)
    check_resume_settings(config, workdir, checkpointer, primary=primary)
    model = qwen3_vl.from_pretrained(config.checkpoint, mesh=mesh, dtype=dtype).use_fused_attention_(
        checked_attention(config, dtype))
    pad_id = processor.tokenizer.pad_token_id or 0
    if primary:
        _log(f"{len(source)} conversations in {config.data} ({source.skipped} skipped: {source.skip_reasons[:3]})")
    shard = data_shard(mesh)
    # the next step's conversations are rendered and encoded while this one trains
    dataset = iter(prepared_ahead(
        task_dataset(source, seed=config.seed, batch_size=config.batch_size),
        functools.partial(prepared_examples, shard=shard, processor=processor, schemas=schemas,
                          max_length=config.max_length)))
    learner = Learner(model, make_optimizer(learning_rate=config.learning_rate, total_steps=config.steps,
                                            warmup_steps=int(config.warmup_fraction * config.steps),
                                            weight_decay=config.weight_decay, max_grad_norm=config.max_grad_norm),
                      LossConfig(kind="sft", logprob_chunk=config.logprob_chunk, remat=config.remat), mesh=mesh)
    first_step, skipped_examples = 0, 0
    restored = checkpointer.restore(model, learner.optimizer)
    if restored is not None:
        first_step, _, extra = restored
        dataset.set_state(extra["data"])
        skipped_examples = extra.get("skipped_examples", 0)
        if primary:
            _log(f"resumed from step {first_step}")
    metrics = MetricsLog(workdir, resume_step=first_step, name="sft_metrics", tensorboard=config.tensorboard,
                         primary=primary)
    progress = tqdm(range(first_step, config.steps), desc="SFT", file=sys.stderr, mininterval=2.0,
                    dynamic_ncols=True, initial=first_step, total=config.steps, disable=not primary)
    compile_clock = CompileClock()
    skip_reasons = []  # this process's first few, for the error of a run that trains nothing
    # closing the data iterator stops its preparing thread, however the loop ends
    with checkpointer.landing_saves_on_failure(), contextlib.closing(dataset):
        for step in progress:
            # every process reads the same batch and trains on its own share of the rows
            _, examples, reasons = next_batch_on_every_process(dataset, "the step's conversations",
                                                               records_of=lambda prepared: prepared[0])
            for reason in reasons:
                _log(f"skipped a conversation: {reason}")
            skip_reasons += reasons[:3 - len(skip_reasons)]
            skipped_here = len(reasons)
            # the global batch's count (each process its own rows), so the metric and the checkpointed counter are the
            # same on every process
            skipped_examples += int(distributed.concat_shards(np.array([skipped_here]), mesh).sum())
            compile_clock.take()
            step_started = time.perf_counter()
            micro_batches = agreed_micro_batches(examples, model.config, pad_id, config.micro_batch_size,
                                                 config.length_bucket, shard=shard)
            if micro_batches is None:  # the same decision on every process; the step still checkpoints below
                if primary:
                    _log(f"step {step + 1}: every conversation of the batch was skipped")
            else:
                out = learner.step(micro_batches)
                out.update(skipped_examples=skipped_examples, step_s=time.perf_counter() - step_started,
                           tokens_per_s=out["trained_tokens"] / max(time.perf_counter() - step_started, 1e-9),
                           **compile_clock.take())
                metrics.write(step + 1, out)
                progress.set_postfix(loss=f"{out['loss']:.3f}")
            # before this step's checkpoint; the same on every process (the optimizer state is the global batch's)
            streak = consecutive_skipped_updates(learner.optimizer.opt_state)
            if streak >= config.max_consecutive_skipped_updates:
                metrics.close()
                raise NonFiniteUpdates(step + 1, streak, config.max_consecutive_skipped_updates)
            last = step + 1 == config.steps
            stopping = stop.agreed()  # every process stops after the same step, with the same checkpoint
            if (step + 1) % config.checkpoint_every == 0 or last or stopping:
                checkpointer.save(step + 1, model, learner.optimizer,
                                  extra={"data": dataset.get_state(), "skipped_examples": skipped_examples})
            if stopping:
                checkpointer.close()
                metrics.close()
                if primary:
                    _log(f"{stop.describe()}: checkpoint of step {step + 1} saved; stopping (rerun to resume)")
                return {"stopped_at_step": step + 1, "signal": stop.describe()}
    checkpointer.close()
    metrics.close()
    # a run that trained nothing must not end like one that did, with an exported (untrained) model; the metrics
    # hold the steps of earlier sessions of a resumed run too, and any process's view decides for all
    if not distributed.any_process(sum(r.get("trained_tokens", 0) for r in metrics.records) > 0):
        reasons = skip_reasons or "none since the run resumed"
        raise DataFileError(
            f"no step trained a token: every conversation of {config.data} was skipped ({skipped_examples} at "
            f"batching, {source.skipped} lines when the file was read; first reasons: {reasons}); no hf_checkpoint "
            "was written: fix the data or settings and start again in a new workdir")
    output = os.path.join(workdir, "hf_checkpoint")
    export_folder(model, processor, output)
    losses = [r["loss"] for r in metrics.records]
    return {
        "steps": config.steps,
        "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None,
        "skipped_records": source.skipped,
        "skipped_examples": skipped_examples,
        "checkpoint": output,
        "metrics": metrics.path,
        "seconds": round(time.perf_counter() - started, 1),
    }
