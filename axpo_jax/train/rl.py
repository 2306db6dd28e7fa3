"""One RL step, as data (DESIGN.md): rollouts -> rewards -> AXPO selection -> forked continuations -> rewards ->
two-stream advantages -> training batch -> update; plus the metrics the paper's analysis needs.

The estimator decides the algorithm: GRPO selects nothing; AXPO selects low-confidence failed tool-using prefixes,
which the agent loop forks K ways from the rollout's own KV cache and runs through the same tool loop.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import jax
import numpy as np

from axpo_jax.algo.axpo import Advantages, axpo_token_advantages, resample_budget
from axpo_jax.algo.rewards import score_answer
from axpo_jax.parallel import distributed
from axpo_jax.rollout.agent_loop import AgentLoop, Task, Trajectory
from axpo_jax.rollout.sampler import SamplingParams
from axpo_jax.models.qwen3_vl.inputs import bucket
from axpo_jax.train.batch import trajectory_batch
from axpo_jax.train.learner import Learner


def reward(trajectory: Trajectory, task: Task, kind: str) -> float:
    """AXPO.md §1: binary answer correctness; no format or tool reward."""
    return float(trajectory.answer is not None and score_answer(trajectory.answer, task.answer, kind))


@dataclasses.dataclass
class RLStep:
    """The step's trajectories and what was computed from them (kept for tests and analysis).

    Multi-host: `trajectories` and `resamples` are this process's (its questions' rollouts and its forks; their
    `task_index` / `resampled_from` index this process's lists); `rewards_qn`, `resample_rewards_sk`, `advantages`
    and `metrics` are the whole step's, the same on every process.
    """

    trajectories: list[Trajectory]
    resamples: list[Trajectory]
    rewards_qn: np.ndarray
    resample_rewards_sk: np.ndarray
    advantages: object
    metrics: dict


class RLTrainer:
    """One RL step over the agent and learner.

    Multi-host (the agent and learner on one mesh over several processes): each process passes its own questions
    (the same number everywhere; process i's are rows [i*Q, (i+1)*Q) of the step's), rolls them out and runs
    their tools; rewards, tool use and confidences are gathered so every process selects the same AXPO prefixes;
    each process forks the selected sources it owns, padded to one count so the forked batch has the same shape
    everywhere; the update trains on every process's rows as one global batch.

    `micro_batch_size` is rows per micro-batch on each process; `updates_per_step` is how many optimizer updates
    a step's rows are split into (verl's train batch / PPO mini-batch; the later ones are off-policy, so there the
    clip can bind). `skip_zero_signal_steps`: a step in which every trained token's advantage is 0 (every group's
    rewards equal, no AXPO continuation with a signal) makes no update; otherwise its update is the KL term's
    gradient alone, which Adam rescales to a learning-rate-sized step. `layout_shards` is how many blocks the step's
    questions are laid out in for forking, each block's forks padded to one count: by default the mesh's data
    shards over processes (1 on one process). A single process given a multi-process run's count builds exactly
    that run's global batches, with the same rows in the same places (how the multi-host tests compare the two).
    """

    def __init__(self, learner: Learner, agent: AgentLoop, estimator, *, num_samples: int, micro_batch_size: int,
                 sampling: SamplingParams = SamplingParams(), reward_kind: str = "exact",
                 reward_fn: Callable[[Trajectory, Task], float] | None = None, layout_shards: int | None = None,
                 fixed_resample_batch: bool = False, updates_per_step: int = 1, skip_zero_signal_steps: bool = False):
        self.learner = learner
        self.agent = agent
        self.estimator = estimator
        self.num_samples = num_samples
        self.micro_batch_size = micro_batch_size
        self.sampling = sampling
        self.reward_kind = reward_kind
        # how a finished trajectory is scored: by default AXPO.md's binary answer correctness
        self.reward_fn = reward_fn or (lambda trajectory, task: reward(trajectory, task, reward_kind))
        self.mesh = agent.mesh
        self.shard = distributed.data_shard(self.mesh)
        self.layout_shards = layout_shards or self.shard.count
        # True: every step's continuations run as one batch of the budget's most prefixes (the rest padding rows that
        # start finished), so each step reuses the fork sampler's compiled programs; False: as many rows as
        # selected, a sampler (and its compiles) per distinct count
        self.fixed_resample_batch = fixed_resample_batch
        if not (isinstance(updates_per_step, int) and updates_per_step >= 1):
            raise ValueError(f"updates_per_step must be an int >= 1, got {updates_per_step!r}")
        self.updates_per_step = updates_per_step
        self.skip_zero_signal_steps = skip_zero_signal_steps
        if self.layout_shards % self.shard.count:
            raise ValueError(f"layout_shards={self.layout_shards} is not a multiple of the {self.shard.count} data "
                             f"shards over processes")
        # the loss must score the policy the rows are drawn from, whose log-probs the sampler reports
        if learner.loss.kind == "rl" and learner.loss.temperature != sampling.logprob_temperature:
            raise ValueError(f"the learner's LossConfig.temperature ({learner.loss.temperature}) differs from the "
                             f"rollouts' sampling temperature ({sampling.temperature}): the loss would train a "
                             f"policy other than the one that sampled the rows")

    def step(self, tasks: list[Task], rng, step: int) -> RLStep:
        n = self.num_samples
        started = time.perf_counter()
        self.agent.executor.reset_stats()
        self.agent.tool_wait_s = 0.0
        rng_rollout, rng_resample = jax.random.split(rng)
        rollout = self.agent.run(tasks, n, rng_rollout, self.sampling)
        trajectories = rollout.trajectories
        q_here = len(tasks)
        first_question = self.shard.index * q_here  # this process's first question in the step's numbering

        def everywhere(values_here):  # this process's [Q_here, N] -> the step's [Q, N]
            return distributed.concat_shards(np.asarray(values_here).reshape(q_here, n), self.mesh)

        rewards_qn = everywhere([self.reward_fn(t, tasks[t.task_index]) for t in trajectories])
        used_qn = everywhere([t.used_tool for t in trajectories])
        confidence_qn = everywhere([t.tool_call_confidence for t in trajectories])
        answered_qn = everywhere([t.answer is not None for t in trajectories])
        truncated_qn = everywhere([t.truncated for t in trajectories])
        # truncation "exclude": rollouts cut off by a limit are in no statistics, trigger nothing and are not
        # trained ("keep", the default: they count as failures with reward 0)
        include_qn = ~truncated_qn if self._excludes_truncated() else None

        # the paper's ablations "resample from scratch" and "resample no-tool rollouts" (which have no tool call to
        # branch at) draw K fresh responses to the question instead of forking a prefix; otherwise only a rollout
        # whose first call opens with the <tool_call> token can be forked (`AgentLoop._branch_point`), and only
        # where its continuations have room to write (a turn cut by its budget right at the tag leaves none)
        from_scratch = self._resamples_from_scratch()
        branchable_qn = None if from_scratch else everywhere([self.agent.can_continue(t) for t in trajectories])
        selections = self.estimator.select(rewards_qn, used_qn, confidence_qn, seed=step, include_qn=include_qn,
                                           branchable_qn=branchable_qn)
        k = self.estimator.k
        mine, resamples = self._resample(tasks, rollout, selections, first_question, rng_resample, from_scratch)
        resample_rewards_sk = np.zeros((len(selections), k))
        resample_include_sk = None
        if selections:
            rewards_here = [self.reward_fn(t, tasks[t.task_index]) for t in resamples]
            resample_rewards_sk = self._gather_resample_values(mine, rewards_here, len(selections), k)
            if include_qn is not None:
                resample_include_sk = self._gather_resample_values(
                    mine, [not t.truncated for t in resamples], len(selections), k) > 0
        rollout_seconds = time.perf_counter() - started
        del rollout  # its KV cache is no longer needed

        advantages = self.estimator.advantages(rewards_qn, selections, resample_rewards_sk, used_tool_qn=used_qn,
                                               include_qn=include_qn, resample_include_sk=resample_include_sk)
        everything = trajectories + resamples
        length = bucket(max(len(t.token_ids) for t in everything), 64)
        policy = np.zeros((len(everything), length), np.float32)
        for b, t in enumerate(everything):
            policy[b, : len(t.policy_mask)] = t.policy_mask
        prefix_end_qn = np.array([t.prefix_end or 0 for t in trajectories]).reshape(q_here, n)
        tokens = axpo_token_advantages(
            _rows_of(advantages, first_question, q_here, mine), prefix_end_qn=prefix_end_qn,
            loss_mask_qnt=policy[: q_here * n].reshape(q_here, n, length),
            resample_loss_mask_skt=policy[q_here * n:].reshape(len(mine), k, length) if mine else None,
            resample_from="scratch" if from_scratch else None,
        )
        adv_rows, mask_rows, _ = tokens.rows()

        update_started = time.perf_counter()
        if self.skip_zero_signal_steps and not distributed.any_process(  # every process updates, or none does
                any(np.any((adv != 0) & (mask > 0)) for adv, mask in zip(adv_rows, mask_rows))):
            metrics = {"trained_tokens": 0.0, "update_skipped": 1}  # the policy and the optimizer's state stay
        else:
            metrics = {**self._update(everything, adv_rows, mask_rows, length), "update_skipped": 0}
        update_seconds = time.perf_counter() - update_started

        tool_stats = self.agent.executor.stats()
        num_tokens = sum(int(np.sum(t.policy_mask)) for t in everything)
        # what the sampler produced this step: a forked continuation's copy of its source's prefix was not sampled
        copied = 0 if from_scratch else sum(int(np.sum(t.policy_mask[: t.prefix_end])) for t in resamples)
        # counts of every process's rows (each process holds its own: parallel/distributed.py data_shards)
        positions = sum(len(t.token_ids) for t in everything)  # every position the update reads, prompts included
        calls, failures, num_tokens, copied, positions, rows = distributed.concat_shards(np.array([[
            tool_stats["calls"], sum(tool_stats["failures_per_status"].values()), num_tokens, copied, positions,
            len(everything)]]), self.mesh).sum(axis=0).tolist()
        tool_subgroup = used_qn.any(axis=1)
        all_wrong_tool = tool_subgroup & ~((rewards_qn >= 1) & used_qn).any(axis=1)
        budget, _ = resample_budget(len(rewards_qn), n, self.estimator.config) if k else (0, 0)
        metrics.update({
            "reward": float(rewards_qn.mean()),
            "pass@1": float(rewards_qn.mean()),
            "tool_use_rate": float(used_qn.mean()),
            "all_wrong_tool_subgroup_rate": float(all_wrong_tool.mean()),
            # questions whose rollouts' rewards differ, the only ones plain GRPO learns from: a step at 0 trains on
            # AXPO's resamples and the KL term alone (`skip_zero_signal_steps` drops a step left with no signal)
            "signal_group_rate": float((rewards_qn.max(axis=1) > rewards_qn.min(axis=1)).mean()),
            "answer_rate": float(answered_qn.mean()),
            # rows whose prompt did not fit the KV cache (skipped by the agent loop, reward 0)
            "prompt_too_long_rate": float(everywhere([t.finish_reason == "prompt_too_long"
                                                      for t in trajectories]).mean()),
            # rows ended by a tool observation the processor refused (AgentLoop._observation_chunk; reward 0)
            "bad_observation_rate": float(everywhere([t.finish_reason == "bad_observation"
                                                      for t in trajectories]).mean()),
            # rollouts cut off by the turn, token or cache limit (excluded from training with truncation "exclude")
            "truncated_rate": float(truncated_qn.mean()),
            "resamples_used": int(resample_rewards_sk.size),
            "resample_budget": int(budget),
            "recovery_rate": float((resample_rewards_sk.max(axis=1) >= 1).mean()) if selections else 0.0,
            "tool_calls": calls,
            "tool_failures": failures,
            "policy_tokens": num_tokens,
            # what the update's FLOPs are counted over (benchmark records): every position of its rows, padded to
            # rows of `update_seq_len`; and how long the rows grew (the context a decode step attends to, at most)
            "update_positions": 0 if metrics.get("update_skipped") else positions,
            "update_seq_len": length,
            "mean_trajectory_tokens": positions / max(rows, 1),
            "sampled_tokens": num_tokens - copied,
            "tokens_per_s": num_tokens / max(time.perf_counter() - started, 1e-9),
            # this process's: the rollout's time less what it spent waiting for tools (tools run concurrently
            # and, pipelined, beside the device, so the calls' summed seconds, `tool_call_s`, can exceed both)
            "time_rollout_s": rollout_seconds - self.agent.tool_wait_s,
            "time_tools_s": self.agent.tool_wait_s,
            "tool_call_s": tool_stats["tool_seconds"],
            "time_update_s": update_seconds,
            **advantages.metrics(),
        })
        return RLStep(trajectories, resamples, rewards_qn, resample_rewards_sk, advantages, metrics)

    def _resample(self, tasks, rollout, selections, first_question: int, rng, from_scratch: bool):
        """Forks (or, from scratch, re-rolls) the selections whose question this process owns.

        Returns (mine, resamples): the selection indices handled here, block by block, and their K resamples
        each in that order. Every block's selections are padded to the most any block of any process has (and to
        a row count the mesh splits evenly), so every process runs the same device programs on one global batch.
        """
        n, k = self.num_samples, self.estimator.k
        if not selections:  # the same decision on every process: the selections are computed from global arrays
            return [], []
        blocks_here = self.layout_shards // self.shard.count
        per_block = len(tasks) // blocks_here
        if per_block * blocks_here != len(tasks):
            raise ValueError(f"{len(tasks)} questions do not split into {blocks_here} layout blocks")
        blocks = [[i for i, s in enumerate(selections)
                   if first_question + b * per_block <= s.question < first_question + (b + 1) * per_block]
                  for b in range(blocks_here)]
        width = max(len(block) for block in blocks)
        if self.fixed_resample_batch:  # the most prefixes one block can get: the budget's, or all its rollouts
            width = max(width, min(resample_budget(len(tasks) * self.shard.count, n, self.estimator.config)[1],
                                   per_block * n))
        width = int(distributed.max_across_processes(np.int64(width)))
        while (width * k) % self.shard.positions:  # each process's forked rows split evenly over its devices
            width += 1
        mine = [i for block in blocks for i in block]
        if from_scratch:
            # padding re-rolls this process's first question and is dropped
            chosen = [[tasks[selections[i].question - first_question] for i in block]
                      + [tasks[0]] * (width - len(block)) for block in blocks]
            rolled = self.agent.run([t for block in chosen for t in block], k, rng, self.sampling).trajectories
            keep = [b * width + j for b, block in enumerate(blocks) for j in range(len(block))]
            resamples = [rolled[entry * k + r] for entry in keep for r in range(k)]
            for t, i in zip(resamples, np.repeat(mine, k)):
                selection = selections[i]
                t.task_index = selection.question - first_question
                t.resampled_from = t.task_index * n + selection.rollout
            return mine, resamples
        sources = [source for block in blocks for source in
                   [(selections[i].question - first_question) * n + selections[i].rollout for i in block]
                   + [None] * (width - len(block))]
        return mine, self.agent.resample(rollout, sources, k, rng, self.sampling)

    def _gather_resample_values(self, mine: list[int], values_here: list[float], num_selections: int, k: int):
        """[S, K] values (rewards, included flags) of every selection's resamples, from the processes that ran
        them."""
        values_sk = np.full((num_selections, k), np.nan)
        values_sk[mine] = np.asarray(values_here, np.float64).reshape(len(mine), k)
        if self.shard.count > 1:
            for part in distributed.allgather_json({"selections": mine, "values": values_sk[mine].tolist()}):
                if part["selections"]:
                    values_sk[part["selections"]] = np.asarray(part["values"], np.float64)
        if np.isnan(values_sk).any():
            raise RuntimeError(f"no process resampled selections {np.nonzero(np.isnan(values_sk).any(1))[0].tolist()}")
        return values_sk

    def _excludes_truncated(self) -> bool:
        return getattr(self.estimator.config, "truncation", "keep") == "exclude"

    def _resamples_from_scratch(self) -> bool:
        # the estimator's own predicate: its advantages give prefix credit exactly when this is False
        return bool(getattr(self.estimator.config, "resamples_from_scratch", False))

    def _update(self, rows: list[Trajectory], adv_rows, mask_rows, length: int) -> dict:
        """`updates_per_step` optimizer updates; row i goes to update i mod M, so every update holds rows of every
        question and its share of the AXPO continuations (which come last). Each update's rows make micro-batches of
        one shape, its last filled with untrained copies so no new shape compiles (and, multi-host, whole untrained
        micro-batches make every process's count the same)."""
        if len(rows) < self.updates_per_step:  # an update of padding only would still move Adam's weights
            raise ValueError(f"{len(rows)} rows cannot make {self.updates_per_step} updates (updates_per_step)")
        mb = self.shard.round_rows(self.micro_batch_size)
        parts = [list(range(u, len(rows), self.updates_per_step)) for u in range(self.updates_per_step)]
        per_update = max(-(-len(part) // mb) for part in parts)
        if self.shard.count > 1:
            per_update = int(distributed.max_across_processes(np.int64(per_update)))
        micro = []
        for part in parts:
            order = part + [None] * (per_update * mb - len(part))
            for start in range(0, len(order), mb):
                window = order[start: start + mb]
                chunk = [0 if i is None else i for i in window]  # padding: untrained copies of row 0
                real = [i is not None for i in window]
                trained = [mask_rows[i][: len(rows[i].token_ids)] * r for i, r in zip(chunk, real)]
                advantages = [adv_rows[i][: len(rows[i].token_ids)] for i in chunk]
                images = sum(len(rows[i].images) for i in chunk)
                micro.append(trajectory_batch(
                    self.learner.model.config, self.agent.processor, [rows[i] for i in chunk], trained, advantages,
                    length=length, num_image_rows=bucket(images, 4),
                ))
        return self.learner.step(micro, updates=self.updates_per_step)


def _rows_of(advantages: Advantages, first_question: int, num_questions: int, selections: list[int]) -> Advantages:
    """The part of a step's advantages that this process's rows carry: its questions (renumbered from 0) and the
    selections it resampled, in the order of its resample rows."""
    questions = slice(first_question, first_question + num_questions)
    picked = np.asarray(selections, np.int64)
    return dataclasses.replace(
        advantages,
        prefix_adv_qn=advantages.prefix_adv_qn[questions], cont_adv_qn=advantages.cont_adv_qn[questions],
        prefix_stream_qn=advantages.prefix_stream_qn[questions], cont_stream_qn=advantages.cont_stream_qn[questions],
        grpo_adv_qn=advantages.grpo_adv_qn[questions], triggered_q=advantages.triggered_q[questions],
        resample_adv_sk=advantages.resample_adv_sk[picked], resample_stream_sk=advantages.resample_stream_sk[picked],
        r_prefix_s=advantages.r_prefix_s[picked], resample_rewards_sk=advantages.resample_rewards_sk[picked],
        selections=tuple(dataclasses.replace(advantages.selections[i], question=advantages.selections[i].question
                                             - first_question) for i in selections),
    )
