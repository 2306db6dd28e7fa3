"""One RL step, as data (DESIGN.md): rollouts -> rewards -> AXPO selection -> forked continuations -> rewards ->
two-stream advantages -> training batch -> update; plus the metrics the paper's analysis needs.

The estimator decides the algorithm: GRPO selects nothing; AXPO selects low-confidence failed tool-using prefixes,
which the agent loop forks K ways from the rollout's own KV cache and runs through the same tool loop.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import numpy as np

from axpo_jax.algo.axpo import axpo_token_advantages, resample_budget
from axpo_jax.algo.rewards import score_answer
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
    """The step's trajectories and what was computed from them (kept for tests and analysis)."""

    trajectories: list[Trajectory]
    resamples: list[Trajectory]
    rewards_qn: np.ndarray
    resample_rewards_sk: np.ndarray
    advantages: object
    metrics: dict


class RLTrainer:
    def __init__(self, learner: Learner, agent: AgentLoop, estimator, *, num_samples: int, micro_batch_size: int,
                 sampling: SamplingParams = SamplingParams(), reward_kind: str = "exact"):
        self.learner = learner
        self.agent = agent
        self.estimator = estimator
        self.num_samples = num_samples
        self.micro_batch_size = micro_batch_size
        self.sampling = sampling
        self.reward_kind = reward_kind

    def step(self, tasks: list[Task], rng, step: int) -> RLStep:
        n = self.num_samples
        started = time.perf_counter()
        self.agent.executor.reset_stats()
        rng_rollout, rng_resample = jax.random.split(rng)
        rollout = self.agent.run(tasks, n, rng_rollout, self.sampling)
        trajectories = rollout.trajectories
        rewards_qn = np.array([reward(t, tasks[t.task_index], self.reward_kind) for t in trajectories]).reshape(-1, n)
        used_qn = np.array([t.used_tool for t in trajectories]).reshape(-1, n)
        confidence_qn = np.array([t.tool_call_confidence for t in trajectories]).reshape(-1, n)

        selections = self.estimator.select(rewards_qn, used_qn, confidence_qn, seed=step)
        k = self.estimator.k
        resamples: list[Trajectory] = []
        resample_rewards_sk = np.zeros((len(selections), k))
        # the paper's ablations "resample from scratch" and "resample no-tool rollouts" (which have no tool call to
        # branch at) draw K fresh responses to the question instead of forking a prefix
        from_scratch = self._resamples_from_scratch()
        if selections and from_scratch:
            resamples = self.agent.run([tasks[s.question] for s in selections], k, rng_resample,
                                       self.sampling).trajectories
            for t in resamples:
                selection = selections[t.task_index]
                t.task_index, t.resampled_from = selection.question, selection.question * n + selection.rollout
        elif selections:
            sources = [s.question * n + s.rollout for s in selections]
            resamples = self.agent.resample(rollout, sources, k, rng_resample, self.sampling)
        if selections:
            resample_rewards_sk = np.array(
                [reward(t, tasks[t.task_index], self.reward_kind) for t in resamples]).reshape(-1, k)
        rollout_seconds = time.perf_counter() - started
        del rollout  # its KV cache is no longer needed

        advantages = self.estimator.advantages(rewards_qn, selections, resample_rewards_sk, used_tool_qn=used_qn)
        everything = trajectories + resamples
        length = bucket(max(len(t.token_ids) for t in everything), 64)
        policy = np.zeros((len(everything), length), np.float32)
        for b, t in enumerate(everything):
            policy[b, : len(t.policy_mask)] = t.policy_mask
        q = len(tasks)
        prefix_end_qn = np.array([t.prefix_end or 0 for t in trajectories]).reshape(q, n)
        tokens = axpo_token_advantages(
            advantages, prefix_end_qn=prefix_end_qn, loss_mask_qnt=policy[: q * n].reshape(q, n, length),
            resample_loss_mask_skt=policy[q * n:].reshape(len(selections), k, length) if selections else None,
            resample_from="scratch" if from_scratch else None,
        )
        adv_rows, mask_rows, _ = tokens.rows()

        update_started = time.perf_counter()
        metrics = self._update(everything, adv_rows, mask_rows, length)
        update_seconds = time.perf_counter() - update_started

        tool_stats = self.agent.executor.stats()
        num_tokens = sum(int(np.sum(t.policy_mask)) for t in everything)
        tool_subgroup = used_qn.any(axis=1)
        all_wrong_tool = tool_subgroup & ~((rewards_qn >= 1) & used_qn).any(axis=1)
        budget, _ = resample_budget(q, n, self.estimator.config) if k else (0, 0)
        metrics.update({
            "reward": float(rewards_qn.mean()),
            "pass@1": float(rewards_qn.mean()),
            "tool_use_rate": float(used_qn.mean()),
            "all_wrong_tool_subgroup_rate": float(all_wrong_tool.mean()),
            "answer_rate": float(np.mean([t.answer is not None for t in trajectories])),
            "resamples_used": len(resamples),
            "resample_budget": int(budget),
            "recovery_rate": float((resample_rewards_sk.max(axis=1) >= 1).mean()) if selections else 0.0,
            "tool_calls": tool_stats["calls"],
            "tool_failures": int(sum(tool_stats["failures_per_status"].values())),
            "policy_tokens": num_tokens,
            "tokens_per_s": num_tokens / max(time.perf_counter() - started, 1e-9),
            "time_rollout_s": rollout_seconds - tool_stats["tool_seconds"],
            "time_tools_s": tool_stats["tool_seconds"],
            "time_update_s": update_seconds,
            **advantages.metrics(),
        })
        return RLStep(trajectories, resamples, rewards_qn, resample_rewards_sk, advantages, metrics)

    def _resamples_from_scratch(self) -> bool:
        config = self.estimator.config
        return getattr(config, "resample_from", "") == "scratch" or getattr(config, "candidates", "") == "no_tool"

    def _update(self, rows: list[Trajectory], adv_rows, mask_rows, length: int) -> dict:
        """Micro-batches of equal shape; the last one is filled with untrained copies so no new shape compiles."""
        mb = self.micro_batch_size
        order = list(range(len(rows)))
        order += [0] * (-len(order) % mb)
        micro = []
        for start in range(0, len(order), mb):
            chunk = order[start : start + mb]
            real = [start + i < len(rows) for i in range(len(chunk))]
            trained = [mask_rows[i][: len(rows[i].token_ids)] * r for i, r in zip(chunk, real)]
            advantages = [adv_rows[i][: len(rows[i].token_ids)] for i in chunk]
            images = sum(len(rows[i].images) for i in chunk)
            micro.append(trajectory_batch(
                self.learner.model.config, self.agent.processor, [rows[i] for i in chunk], trained, advantages,
                length=length, num_image_rows=bucket(images, 4),
            ))
        return self.learner.step(micro)
