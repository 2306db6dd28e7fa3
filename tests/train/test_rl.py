"""One AXPO step end to end on a tiny real checkpoint: a scripted first rollout (so the trigger is known), forked
continuations from the real sampler, two-stream advantages, and the update."""

import jax
import numpy as np
import pytest
from PIL import Image

from axpo_jax.algo import registry
from axpo_jax.algo.axpo import STREAM_CONTINUATION, STREAM_GRPO, STREAM_NONE, STREAM_PREFIX
from axpo_jax.models import qwen3_vl
from axpo_jax.rollout.agent_loop import Task
from axpo_jax.rollout.sampler import SamplingParams
from axpo_jax.train.learner import Learner, LossConfig
from axpo_jax.train.optimizer import make_optimizer
from axpo_jax.train.rl import RLTrainer
from tests.rollout.test_agent_loop import ZOOM, loop  # noqa: F401  (the module fixture)

SCRIPTS = [  # task 0: both rollouts zoom and answer wrongly -> triggered; task 1: solved with the tool only
    ["<think>\nzoom\n</think>\n" + ZOOM, "<answer>\\boxed{1}</answer>"],
    [ZOOM, "<answer>\\boxed{2}</answer>"],
    ["<answer>\\boxed{4}</answer>"],
    [ZOOM, "<answer>\\boxed{3}</answer>"],
]


def test_axpo_step(loop):  # noqa: F811
    scripted = loop._samplers[4]
    scripted.scripts = [[loop.tokenizer.encode(t, add_special_tokens=False) for t in s] for s in SCRIPTS]
    learner = Learner(loop.model, make_optimizer(learning_rate=1e-3, total_steps=10), LossConfig(kl_coef=0.0))
    estimator = registry.make("axpo", ratio=1.5, k=3)  # budget floor(1.5 * 2 * 2) = 6 continuations = 2 prefixes
    trainer = RLTrainer(learner, loop, estimator, num_samples=2, micro_batch_size=5)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    tasks = [Task("Which digit?", [image], "7"), Task("Which digit?", [image], "3")]
    before = [np.asarray(p).copy() for _, p in qwen3_vl.named_parameters(loop.model)]

    out = trainer.step(tasks, jax.random.key(0), step=0)

    np.testing.assert_array_equal(out.rewards_qn, [[0, 0], [0, 1]])
    assert [(s.question, s.rollout) for s in out.advantages.selections] in ([(0, 0), (0, 1)], [(0, 1), (0, 0)])
    assert len(out.resamples) == 6 and out.metrics["resamples_used"] <= out.metrics["resample_budget"] == 6
    assert {t.resampled_from for t in out.resamples} == {0, 1}
    for t in out.resamples:  # every continuation starts inside the source's first tool call
        source = out.trajectories[t.resampled_from]
        assert t.token_ids[: source.prefix_end] == source.token_ids[: source.prefix_end]
    # the sources' prefixes carry the prefix stream; their failed continuations are not trained
    adv = out.advantages
    assert (adv.prefix_stream_qn[0] == STREAM_PREFIX).all() and (adv.cont_stream_qn[0] == STREAM_NONE).all()
    assert (adv.resample_stream_sk == STREAM_CONTINUATION).all() or out.resample_rewards_sk.std() == 0
    assert out.metrics["axpo/triggered_frac"] == 0.5
    assert out.metrics["tool_use_rate"] == 0.75 and out.metrics["pass@1"] == 0.25
    assert out.metrics["signal_group_rate"] == 0.5  # task 1's rewards differ, task 0's do not
    assert out.metrics["bad_observation_rate"] == 0 and out.metrics["prompt_too_long_rate"] == 0
    # the update reads every position of its rows (its FLOPs), more than the trained ones
    rows = out.trajectories + out.resamples
    assert out.metrics["update_positions"] == sum(len(t.token_ids) for t in rows) > out.metrics["trained_tokens"]
    # the split of the step's time: the rollout's own and its wait for tools, both measured, neither negative
    assert out.metrics["time_rollout_s"] > 0 and out.metrics["time_tools_s"] >= 0
    np.testing.assert_allclose(adv.grpo_adv_qn[1], [-1, 1], atol=1e-5)  # the untriggered group is plain GRPO
    assert np.isfinite(out.metrics["loss"]) and out.metrics["skipped_updates"] == 0
    assert out.metrics["sampler_trainer_logprob_gap"] < 1e-3
    changed = [not np.array_equal(b, np.asarray(p)) for b, (_, p) in zip(before, qwen3_vl.named_parameters(loop.model))]
    assert any(changed)


def test_the_loss_must_score_the_sampling_temperature(loop):  # noqa: F811
    learner = Learner(loop.model, make_optimizer(learning_rate=1e-3, total_steps=10), LossConfig(temperature=0.7))
    with pytest.raises(ValueError, match=r"LossConfig.temperature \(0.7\) differs .* temperature \(1.0\)"):
        RLTrainer(learner, loop, registry.make("grpo"), num_samples=2, micro_batch_size=4)
    RLTrainer(learner, loop, registry.make("grpo"), num_samples=2, micro_batch_size=4,
              sampling=SamplingParams(temperature=0.7))


def test_resample_from_scratch_ablation(loop):  # noqa: F811
    """`resample_from="scratch"`: K fresh responses to each selected question, no forked prefix; the sources keep
    plain GRPO (nothing of theirs is masked)."""
    scripted = loop._samplers[4]
    # each row's rollout turns, then its turn in the 4-row batch of fresh responses (2 selections x K=2)
    scripted.scripts = [[loop.tokenizer.encode(t, add_special_tokens=False) for t in s + ["<answer>\\boxed{7}</answer>"]]
                        for s in SCRIPTS]
    learner = Learner(loop.model, make_optimizer(learning_rate=1e-3, total_steps=10), LossConfig(kl_coef=0.0))
    estimator = registry.make("axpo", ratio=1.5, k=2, resample_from="scratch")
    trainer = RLTrainer(learner, loop, estimator, num_samples=2, micro_batch_size=4)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    out = trainer.step([Task("Which digit?", [image], "7"), Task("Which digit?", [image], "3")],
                       jax.random.key(0), step=0)

    assert len(out.resamples) == 4 and {t.resampled_from for t in out.resamples} == {0, 1}
    for t in out.resamples:
        source = out.trajectories[t.resampled_from]
        assert t.task_index == 0 and t.prompt_length == source.prompt_length
        assert t.token_ids[: t.prompt_length] == source.token_ids[: source.prompt_length]
        assert loop.tokenizer.decode(t.token_ids[t.prompt_length:]).startswith("<answer>")  # no source prefix
    np.testing.assert_array_equal(out.resample_rewards_sk, np.ones((2, 2)))
    assert out.metrics["recovery_rate"] == 1.0
    adv = out.advantages
    assert (adv.prefix_stream_qn[0] != STREAM_PREFIX).all()  # no prefix credit from scratch
    assert np.isfinite(out.metrics["loss"])


def test_resample_no_tool_rollouts_ablation(loop):  # noqa: F811
    """`candidates="no_tool"`: task 1's failed no-tool rollout has no tool call to fork at, so it is resampled from
    scratch, and like a from-scratch source it keeps its plain GRPO advantage over its whole response (no prefix
    credit over an empty prefix that would leave none of it trained)."""
    scripted = loop._samplers[4]
    # each row's rollout turns, then its turn in the 4-row batch of fresh responses (the budget's 2 prefixes x K=2)
    scripted.scripts = [[loop.tokenizer.encode(t, add_special_tokens=False) for t in s + ["<answer>\\boxed{3}</answer>"]]
                        for s in SCRIPTS]
    learner = Learner(loop.model, make_optimizer(learning_rate=1e-3, total_steps=10), LossConfig(kl_coef=0.0))
    estimator = registry.make("axpo", ratio=1.0, k=2, candidates="no_tool")  # budget 4 continuations = 2 prefixes
    trainer = RLTrainer(learner, loop, estimator, num_samples=2, micro_batch_size=4, fixed_resample_batch=True)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    out = trainer.step([Task("Which digit?", [image], "7"), Task("Which digit?", [image], "3")],
                       jax.random.key(0), step=0)

    adv = out.advantages
    assert [(s.question, s.rollout) for s in adv.selections] == [(1, 0)] and not out.trajectories[2].used_tool
    assert len(out.resamples) == 2 and {t.resampled_from for t in out.resamples} == {2}
    for t in out.resamples:  # fresh responses to task 1
        assert loop.tokenizer.decode(t.token_ids[t.prompt_length:]).startswith("<answer>")
    assert not adv.uses_prefix_credit
    assert adv.prefix_stream_qn[1, 0] == adv.cont_stream_qn[1, 0] == STREAM_GRPO
    np.testing.assert_allclose([adv.prefix_adv_qn[1, 0], adv.cont_adv_qn[1, 0]], [-1, -1], atol=1e-5)
    assert (adv.resample_stream_sk == STREAM_CONTINUATION).all() or out.resample_rewards_sk.std() == 0
    assert np.isfinite(out.metrics["loss"])


def test_fixed_resample_batch_pads_to_the_budget(loop):  # noqa: F811
    """With `fixed_resample_batch` the 2 selected prefixes x K=2 run in a batch of the budget's 3 prefixes (6 rows:
    2 of them padding that start finished and are dropped), the shape every step gets whatever it selects (here
    the 6-row sampler test_axpo_step compiled). Its update is two (`updates_per_step=2`): rows 0, 2, .. then 1, 3, ..,
    each a 5-row micro-batch, the shape test_axpo_step's single update trained."""
    scripted = loop._samplers[4]
    scripted.scripts = [[loop.tokenizer.encode(t, add_special_tokens=False) for t in s] for s in SCRIPTS]
    learner = Learner(loop.model, make_optimizer(learning_rate=1e-3, total_steps=10), LossConfig(kl_coef=0.0))
    estimator = registry.make("axpo", ratio=1.5, k=2)  # budget floor(1.5 * 2 * 2) = 6 continuations = 3 prefixes
    trainer = RLTrainer(learner, loop, estimator, num_samples=2, micro_batch_size=5, fixed_resample_batch=True,
                        updates_per_step=2)
    updates_before = int(learner.optimizer.step[...])
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    rows_before = set(loop._samplers)

    out = trainer.step([Task("Which digit?", [image], "7"), Task("Which digit?", [image], "3")],
                       jax.random.key(0), step=0)

    assert len(out.advantages.selections) == 2  # only task 0's two failed tool rollouts are candidates
    assert len(out.resamples) == 4 and {t.resampled_from for t in out.resamples} == {0, 1}
    assert out.resample_rewards_sk.shape == (2, 2) and out.metrics["resample_budget"] == 6
    assert set(loop._samplers) - rows_before <= {6} and 6 in loop._samplers  # not the 4-row one: a 6-row batch
    for t in out.resamples:
        source = out.trajectories[t.resampled_from]
        assert t.token_ids[: source.prefix_end] == source.token_ids[: source.prefix_end]
    assert np.isfinite(out.metrics["loss"]) and out.metrics["updates"] == 2
    assert int(learner.optimizer.step[...]) == updates_before + 2
    assert out.metrics["trained_tokens"] > 0


def test_a_question_too_long_for_the_cache_is_skipped_not_fatal(loop):  # noqa: F811
    """A question whose prompt does not fit the KV cache ends its rows at once (reward 0, nothing trained); the
    step trains the other question's rollouts and reports the skipped share."""
    scripted = loop._samplers[4]
    scripted.scripts = [[loop.tokenizer.encode(t, add_special_tokens=False) for t in s]
                        for s in (SCRIPTS[0], SCRIPTS[3], [], [])]
    learner = Learner(loop.model, make_optimizer(learning_rate=1e-3, total_steps=10), LossConfig(kl_coef=0.0))
    trainer = RLTrainer(learner, loop, registry.make("grpo"), num_samples=2, micro_batch_size=4)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    tasks = [Task("Which digit?", [image], "3"), Task("Which digit? " + "Look again. " * 80, [image], "3")]

    out = trainer.step(tasks, jax.random.key(0), step=0)

    assert [t.finish_reason for t in out.trajectories] == ["answer", "answer", "prompt_too_long", "prompt_too_long"]
    np.testing.assert_array_equal(out.rewards_qn, [[0, 1], [0, 0]])
    assert out.metrics["prompt_too_long_rate"] == 0.5 and out.metrics["tool_use_rate"] == 0.5
    assert np.isfinite(out.metrics["loss"]) and out.metrics["skipped_updates"] == 0 and out.metrics["trained_tokens"] > 0


def test_truncation_exclude_leaves_cut_off_rollouts_out(loop):  # noqa: F811
    """`truncation="exclude"` (a config field: the paper is silent): a rollout cut off by the turn limit is in no
    group statistics, is no AXPO candidate and trains no token; with "keep" (the default) it is a failure like any
    other. Row 1 of task 0 calls the tool three times and hits the turn limit."""
    scripts = [["<think>\nzoom\n</think>\n" + ZOOM, "<answer>\\boxed{1}</answer>"], [ZOOM, ZOOM, ZOOM],
               ["<answer>\\boxed{3}</answer>"], ["<answer>\\boxed{4}</answer>"]]
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    tasks = [Task("Which digit?", [image], "7"), Task("Which digit?", [image], "3")]
    out = {}
    for truncation in ("keep", "exclude"):
        loop._samplers[4].scripts = [[loop.tokenizer.encode(t, add_special_tokens=False) for t in s] for s in scripts]
        learner = Learner(loop.model, make_optimizer(learning_rate=1e-3, total_steps=10), LossConfig(kl_coef=0.0))
        # budget floor(1.5 * 2 * 2) = 6 continuations = 2 prefixes x K=3: test_axpo_step's 6-row fork batch
        estimator = registry.make("axpo", ratio=1.5, k=3, truncation=truncation)
        trainer = RLTrainer(learner, loop, estimator, num_samples=2, micro_batch_size=5, fixed_resample_batch=True)
        out[truncation] = trainer.step(tasks, jax.random.key(0), step=0)

    keep, exclude = out["keep"], out["exclude"]
    assert [t.finish_reason for t in exclude.trajectories] == ["answer", "turn_limit", "answer", "answer"]
    assert [t.truncated for t in exclude.trajectories] == [False, True, False, False]
    assert keep.metrics["truncated_rate"] == exclude.metrics["truncated_rate"] == 0.25
    np.testing.assert_array_equal(exclude.rewards_qn, [[0, 0], [1, 0]])
    # keep: both failed tool rollouts of task 0 are candidates; exclude: the cut-off one is not
    assert sorted(s.rollout for s in keep.advantages.selections if s.question == 0) == [0, 1]
    assert [(s.question, s.rollout) for s in exclude.advantages.selections] == [(0, 0)]
    adv = exclude.advantages
    assert adv.prefix_stream_qn[0, 1] == adv.cont_stream_qn[0, 1] == STREAM_NONE  # not trained at all
    assert keep.advantages.prefix_stream_qn[0, 1] == STREAM_PREFIX
    # task 1 is plain GRPO over its two included rollouts either way
    np.testing.assert_allclose(adv.grpo_adv_qn[1], [1, -1], atol=1e-5)
    for s, sel in enumerate(adv.selections):  # a cut-off continuation is not trained either
        for k, t in enumerate(t for t in exclude.resamples if t.resampled_from == sel.question * 2 + sel.rollout):
            assert (adv.resample_stream_sk[s, k] == STREAM_NONE) == t.truncated
    assert np.isfinite(exclude.metrics["loss"]) and exclude.metrics["trained_tokens"] > 0


def test_skip_zero_signal_steps_leaves_the_policy_and_optimizer(loop):  # noqa: F811
    """Every rollout answers wrongly without a tool: every group's rewards are equal and no AXPO prefix is a
    candidate, so no trained token has an advantage. By default the step still makes an optimizer update (in a run
    with a reference its gradient is the KL term's alone; here, without, zero); `skip_zero_signal_steps=True` makes
    none and says so."""
    wrong = ["<answer>\\boxed{4}</answer>"]
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    tasks = [Task("Which digit?", [image], "7"), Task("Which digit?", [image], "3")]
    for skip in (False, True):
        loop._samplers[4].scripts = [[loop.tokenizer.encode(t, add_special_tokens=False) for t in wrong]] * 4
        learner = Learner(loop.model, make_optimizer(learning_rate=1e-3, total_steps=10), LossConfig(kl_coef=0.0))
        trainer = RLTrainer(learner, loop, registry.make("axpo", ratio=1.5, k=3), num_samples=2,
                            micro_batch_size=4, skip_zero_signal_steps=skip)
        before = [np.asarray(p).copy() for _, p in qwen3_vl.named_parameters(loop.model)]
        updates_before = int(learner.optimizer.step[...])

        out = trainer.step(tasks, jax.random.key(0), step=0)

        np.testing.assert_array_equal(out.rewards_qn, np.zeros((2, 2)))
        assert out.metrics["signal_group_rate"] == 0.0 and out.metrics["resamples_used"] == 0
        assert out.metrics["update_skipped"] == int(skip)
        assert int(learner.optimizer.step[...]) == updates_before + (0 if skip else 1)
        if skip:
            assert "loss" not in out.metrics and out.metrics["trained_tokens"] == 0
            after = [np.asarray(p) for _, p in qwen3_vl.named_parameters(loop.model)]
            assert all(np.array_equal(b, a) for b, a in zip(before, after))
        else:
            assert np.isfinite(out.metrics["loss"]) and out.metrics["trained_tokens"] > 0
