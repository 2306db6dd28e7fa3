"""Evaluating a policy on benchmark questions: batches of questions x samples through the agent loop, each
sample scored, one record per question.

Batches are fixed by position (question i is in batch i // batch_size) and each batch samples with its own key,
`fold_in(benchmark key, batch number)`; the last batch, when short, is padded with copies of its last question to
`batch_size` questions, whose trajectories are dropped. So every batch has the same shape (one compiled sampler
per run) and a question's samples depend only on the seed, its batch's questions and its row among them. A
resumed run skips every batch whose questions all have records and reruns a batch that has some (a crash cut its
append short) whole, as first formed, keeping only the records it lacked: it reproduces an uninterrupted run
exactly, wherever that stopped.

Multi-host (an agent on a mesh over several processes, e.g. evaluation during a multi-host RL run): each process
rolls out its share of every batch's questions and runs their tools, the way RL steps split their questions;
the records are then gathered, so every process returns (and scores) all of them. Only process 0 writes the
record store.

`evaluate` is the in-memory form for evaluation during RL: it returns flat metrics
({"eval/<benchmark>/pass@1": ..., "eval/average/pass@4": ...}) and writes nothing.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping, Sequence

import jax

from axpo_jax.eval.benchmarks.base import EvalItem, ImageSource
from axpo_jax.eval.metrics import benchmark_metrics, flat_metrics
from axpo_jax.eval.records import RecordStore, sample_record
from axpo_jax.eval.scoring import JudgeFn, describe_scorer, is_correct
from axpo_jax.eval.settings import PAPER_EVAL_SETTINGS, EvalSettings
from axpo_jax.parallel import distributed
from axpo_jax.rollout.agent_loop import AgentLoop, Task
from axpo_jax.tools.executor import ToolExecutor


def make_agent(model, processor, executor: ToolExecutor, settings: EvalSettings = PAPER_EVAL_SETTINGS, *,
               system_prompt: str | None = None, mesh=None, log=None) -> AgentLoop:
    """An agent loop with the evaluation's turn and token limits (its own samplers: build it once, reuse it)."""
    return AgentLoop(model, processor, executor, max_turns=settings.max_turns,
                     max_new_tokens_per_turn=min(settings.max_new_tokens_per_turn, settings.max_total_tokens),
                     capacity=settings.max_total_tokens, system_prompt=system_prompt, mesh=mesh,
                     log=log or (lambda message: None))


def benchmark_key(rng, name: str):
    """A key per benchmark that does not depend on which other benchmarks run, or in what order."""
    return jax.random.fold_in(rng, zlib.crc32(name.encode()) & 0x7FFFFFFF)


def items_from_tasks(benchmark: str, tasks: Sequence[Task], kind: str) -> list[EvalItem]:
    """Plain agent-loop tasks (e.g. held-out training tasks) as questions scored with reward kind `kind`."""
    return [EvalItem(benchmark, task.task_id or str(i), task.question, [ImageSource(image=im) for im in task.images],
                     [task.answer], kind) for i, task in enumerate(tasks)]


def process_share(tasks: list, num_samples: int, shard: distributed.DataShard) -> tuple[list, slice]:
    """A batch's tasks padded (copies of the last) so that every data shard over processes gets as many, each a
    row count its devices split evenly; returns (the padded tasks, this process's slice of them)."""
    per = -(-len(tasks) // shard.count)
    while (per * num_samples) % shard.positions:
        per += 1
    tasks = tasks + [tasks[-1]] * (per * shard.count - len(tasks))
    return tasks, slice(shard.index * per, (shard.index + 1) * per)


def run_benchmark(agent: AgentLoop, items: Sequence[EvalItem], rng, settings: EvalSettings, *,
                  judge: JudgeFn | None = None, batch_size: int = 8, store: RecordStore | None = None,
                  prompt_suffix: str = "", save_responses: bool = False, progress=None) -> tuple[list[dict], int]:
    """Runs every question that has no record in `store`; returns (every question's record in order, the number
    of questions recorded now: a batch rerun after a crash reruns its recorded ones too, uncounted). `rng` is the
    benchmark's key (`benchmark_key`); `progress` (a tqdm bar or None) counts finished questions, those with
    records included."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    done = store.load() if store is not None else {}
    if jax.process_count() > 1:  # process 0's view: another process may read the file after process 0 appended
        done = {int(index): record for index, record in distributed.allgather_json(done)[0].items()}
    for index, record in done.items():
        if index < len(items) and record.get("task_id") != items[index].task_id:
            raise ValueError(f"{store.path}: the record of question {index} is for {record.get('task_id')!r} but the "
                             f"data has {items[index].task_id!r} there: the records were made from other data; use "
                             f"a new output directory")
    if progress is not None:
        progress.update(sum(1 for index in done if index < len(items)))
    ran = 0
    shard = distributed.data_shard(agent.mesh)
    for batch in range(math.ceil(len(items) / batch_size)):
        indices = list(range(batch * batch_size, min((batch + 1) * batch_size, len(items))))
        missing = [i for i in indices if i not in done]
        if not missing:
            continue
        # every question of the batch, recorded or not: rows and the key decide the samples (module docstring)
        tasks = [items[i].task(prompt_suffix) for i in indices]
        tasks += [tasks[-1]] * (batch_size - len(tasks))  # same shape every batch; padding rows are dropped
        tasks, mine = process_share(tasks, settings.num_samples, shard)  # one process: all of them
        rollout = agent.run(tasks[mine], settings.num_samples, jax.random.fold_in(rng, batch), settings.sampling)
        by_task: dict[int, list] = {}
        for trajectory in rollout.trajectories:
            by_task.setdefault(mine.start + trajectory.task_index, []).append(trajectory)
        del rollout  # frees the batch's KV cache before scoring (a judge may take a while)
        records = []
        for position, index in enumerate(indices):
            if index in done or position not in by_task:  # kept from before, or another process's question
                continue
            item = items[index]
            trajectories = sorted(by_task[position], key=lambda t: t.sample_index)
            samples = [sample_record(t, is_correct(item, t.answer, judge), save_response=save_responses)
                       for t in trajectories]
            records.append({"index": index, "task_id": item.task_id, "scorer": describe_scorer(item, judge),
                            "references": item.references, "samples": samples})
        if shard.count > 1:  # every process's records (one data shard per process: meshes that share rows are refused)
            gathered = {r["index"]: r for part in distributed.allgather_json(records) for r in part}
            records = [gathered[index] for index in missing]
        if store is not None and distributed.is_primary():
            store.append(records)
        done.update({record["index"]: record for record in records})
        ran += len(missing)
        if progress is not None:
            progress.update(len(missing))
    return [done[i] for i in range(len(items))], ran


def evaluate(agent: AgentLoop, items_by_benchmark: Mapping[str, Sequence[EvalItem]], rng,
             settings: EvalSettings = PAPER_EVAL_SETTINGS, *, judge: JudgeFn | None = None, batch_size: int = 8,
             prefix: str = "eval") -> dict:
    """Pass@k, tool use and turns of `agent`'s policy on each benchmark's questions, as flat metrics
    ("eval/<benchmark>/pass@1", ..., "eval/average/pass@<num_samples>"); for evaluation during RL.

    The agent's own turn and token limits apply: build it with `make_agent(..., settings)` for the paper's.
    """
    metrics = {}
    for name, items in items_by_benchmark.items():
        records, _ = run_benchmark(agent, list(items), benchmark_key(rng, name), settings, judge=judge,
                                   batch_size=batch_size)
        metrics[name] = benchmark_metrics(records, settings.pass_k)
    return flat_metrics(metrics, settings.pass_k, prefix)
