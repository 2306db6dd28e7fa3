"""The sft and rl modes end to end on a tiny checkpoint folder: SFT JSONL with a bad record skipped and counted,
its transformers-format result loaded by RL, and an RL run stopped by a signal that resumes exactly (the resumed
steps' losses, rewards and tokens equal an uninterrupted run's)."""

import dataclasses
import json
import os

import jax
import numpy as np
import pytest

from axpo_jax.algo import registry
from axpo_jax.algo.grpo import GRPOConfig
from axpo_jax.algo.registry import GRPOEstimator
from axpo_jax.data.synthetic import make_task, sft_conversations, task_seed, write_sft_jsonl
from axpo_jax.demo import build_tiny_checkpoint
from axpo_jax.train import rl_run, sft_run
from axpo_jax.train.checkpoints import StopRequest
from tests.config_files import load_config


def _config(name: str):
    return load_config(name)


@pytest.fixture(scope="module")
def sft_result(tmp_path_factory):
    root = tmp_path_factory.mktemp("modes")
    base = str(root / "base")
    build_tiny_checkpoint(base, seed=0)
    data = root / "data" / "sft.jsonl"
    data.parent.mkdir()
    conversations = sft_conversations([make_task(task_seed(0, i)) for i in range(4)], tool_fraction=1.0)
    write_sft_jsonl(data, conversations)
    os.remove(data.parent / "sft_images" / "000003_1.png")  # record 3's crop is gone: skipped, counted
    config = _config("sft")
    config.update(dict(checkpoint=base, data=str(data), workdir=str(root / "sft"), steps=2, batch_size=2,
                       micro_batch_size=2, length_bucket=1024, checkpoint_every=1, tensorboard=False))
    return sft_run.run(config)


def test_sft_mode(sft_result):
    assert sft_result["skipped_records"] == 1 and sft_result["steps"] == 2
    assert np.isfinite(sft_result["final_loss"])
    lines = [json.loads(line) for line in open(sft_result["metrics"])]
    assert [r["step"] for r in lines] == [1, 2] and all(r["trained_tokens"] > 0 for r in lines)
    assert os.path.isfile(os.path.join(sft_result["checkpoint"], "model.safetensors"))
    assert os.path.isfile(os.path.join(sft_result["checkpoint"], "chat_template.jinja"))


@dataclasses.dataclass(frozen=True)
class FirstRolloutRight(GRPOEstimator):
    """GRPO that scores each group's first rollout as right: a learning signal from a random policy, so the resumed
    steps depend on the restored weights and optimizer state, not only on the data and the RNG."""

    def advantages(self, rewards_qn, selections=(), resample_rewards_sk=None, **kwargs):
        pretend = np.zeros_like(rewards_qn)
        pretend[:, 0] = 1
        return super().advantages(pretend, selections, resample_rewards_sk, **kwargs)


def _rl_config(checkpoint: str, workdir: str, **overrides):
    config = _config("rl")
    # temperature 0.8: the loss must score the tempered policy the rows were drawn from (checked by the log-prob gap)
    config.update(dict(checkpoint=checkpoint, workdir=workdir, steps=3, algo="grpo_first_right", questions_per_step=2,
                       num_samples=2, max_new_tokens_per_turn=16, capacity=1024, micro_batch_size=4, kl_coef=0.0,
                       eval_every=0, tensorboard=False, checkpoint_every=1, temperature=0.8))
    config.update(overrides)
    return config


def test_rl_mode_resumes_exactly(sft_result, tmp_path, monkeypatch):
    monkeypatch.setitem(registry._ESTIMATORS, "grpo_first_right", (FirstRolloutRight, GRPOConfig))
    checkpoint = sft_result["checkpoint"]
    # the uninterrupted run also evaluates held-out tasks during training (every 2 steps and at the end)
    whole = rl_run.run(_rl_config(checkpoint, str(tmp_path / "whole"), eval_every=2, eval_tasks="synthetic:2"))
    assert whole["steps"] == 3 and os.path.isfile(os.path.join(whole["checkpoint"], "model.safetensors"))
    record = whole["bench_record"]  # the run as a benchmark record: medians of steps 2-3
    assert record["device_count"] == jax.device_count() and record["step_s"] > record["update_s"] > 0
    assert record["rollout_tokens_per_s"] > 0 and record["update_flops_per_token"] > 0
    assert os.path.isfile(tmp_path / "whole" / "bench_records.jsonl")
    meta = json.load(open(tmp_path / "whole" / "checkpoints" / "3" / "meta" / "metadata"))
    assert meta["eval_image_buckets"]["prompt"][1] >= 64  # the evaluations' sticky floors are kept too

    workdir = str(tmp_path / "interrupted")
    with monkeypatch.context() as patch:  # a SIGTERM arrives during step 1
        patch.setattr(StopRequest, "__bool__", lambda self: True)
        stopped = rl_run.run(_rl_config(checkpoint, workdir))
    assert stopped["stopped_at_step"] == 1
    meta = json.load(open(os.path.join(workdir, "checkpoints", "1", "meta", "metadata")))
    assert meta["image_buckets"]["observation"][1] >= 64  # the sticky image floors resume too
    assert meta["eval_image_buckets"] is None  # (this run evaluates nothing during training)
    from axpo_jax.modes import ModeError

    # its checkpoints go on only with their own settings (checked before the model loads); where and how it runs
    # may change
    with pytest.raises(ModeError, match=r"holds checkpoints of a run with other settings \(learning_rate: "):
        rl_run.run(_rl_config(checkpoint, workdir, learning_rate=1e-3, micro_batch_size=2))
    rl_run.run(_rl_config(checkpoint, workdir, micro_batch_size=2))

    def records(path):
        return [json.loads(line) for line in open(os.path.join(path, "rl_metrics.jsonl"))]

    expected, resumed = records(str(tmp_path / "whole")), records(workdir)
    # each step counts its compilations; the first compiles the rollout and the update
    assert expected[0]["compiles"] > 0 and expected[0]["compile_s"] > 0
    assert all(isinstance(r["compiles"], int) and r["compiles"] >= 0 for r in expected)
    assert record["notes"].startswith(("medians of", "no step ran without compiling"))
    assert ["eval/heldout/pass@1" in r for r in expected] == [False, True, True]
    assert expected[-1]["eval/heldout/questions"] == 2 and 0 <= expected[-1]["eval/average/pass@1"] <= 1
    assert whole["final_eval_pass@1"] == expected[-1]["eval/average/pass@1"]
    assert [r["step"] for r in resumed] == [1, 2, 3]
    assert all(r["grad_norm"] > 0 for r in expected)  # the weights move every step
    # the sampler's log-probs (at temperature 0.8) are the trainer's (run without the loss temperature, the rl
    # mode stops on RLTrainer's refusal)
    assert all(r["sampler_trainer_logprob_gap"] < 1e-3 for r in expected + resumed)
    for a, b in zip(expected, resumed):
        assert a["sampled_tokens"] == b["sampled_tokens"] and a["reward"] == b["reward"]
        np.testing.assert_allclose(b["loss"], a["loss"], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(b["grad_norm"], a["grad_norm"], rtol=1e-5)


def test_rl_mode_refuses_bad_sampling_and_update_fields_before_loading(tmp_path):
    from axpo_jax.modes import ModeError

    missing = str(tmp_path / "no_checkpoint")  # never read: the fields are checked first
    (tmp_path / "a_file").write_text("")
    for field, value, match in (("temperature", -1.0, r"\(temperature, top_p.*temperature must be >= 0"),
                                ("top_k", -2, r"top_k must be an integer"),
                                ("eval_top_p", 0.0, r"\(the eval_\* fields\): top_p must be in"),
                                ("eval_benchmarks", ("vstar,hrbench5k",),  # as the command line gives it
                                 r"\(the eval_\* fields\): eval_benchmarks: unknown \['hrbench5k'\]; the benchmarks"),
                                ("updates_per_step", 0, r"updates_per_step must be an int from 1"),
                                ("updates_per_step", 1000, r"updates_per_step must be .* \(\d+\), got 1000"),
                                ("questions_per_step", 0, r"questions_per_step must be an int >= 1, got 0"),
                                ("skip_zero_signal_steps", None, r"skip_zero_signal_steps must be True or False"),
                                ("reward_kind", "judge", r"reward_kind must be one of \('exact', .*got 'judge'"),
                                ("reward_kind", "exct", r"reward_kind must be one of"),
                                ("learning_rate", -1e-4, r"\(learning_rate, .*\): learning_rate must be > 0"),
                                ("learning_rate", float("nan"), r"learning_rate must be a finite number"),
                                ("max_grad_norm", 0.0, r"max_grad_norm must be > 0"),
                                ("warmup_fraction", 1.5, r"warmup_fraction must be <= 1"),
                                ("checkpoint_every", 0, r"checkpoint_every must be an int >= 1"),
                                ("keep_checkpoints", 0, r"keep_checkpoints must be an int >= 1"),
                                ("seed", -1, r"seed must be an int >= 0"),
                                ("capacity", 0, r"capacity must be an int >= 1"),
                                ("workdir", str(tmp_path / "a_file"), r"\(workdir\): .*a_file' exists and is not a folder"),
                                ("algo", "grpoo", r"\(algo, axpo, advantage\): unknown advantage estimator 'grpoo'"),
                                ("advantage", dict(std_normalize=True, eps=1e-6, ddof=0, truncation="drop"),
                                 r"\(algo, axpo, advantage\): GRPOConfig.truncation=.drop.; expected"),
                                ("loss_aggregation", "seq-mean",
                                 r"\(eps_low, .*loss_aggregation\): LossConfig.aggregation must be one of"),
                                ("kl_kind", "k4", r"\(eps_low, .*\): LossConfig.kl_kind must be one of"),
                                ("dtype", "float33", r"\(dtype\): dtype 'float33': expected float32 or bfloat16"),
                                ("tools", ("image_zoom_in", "zoom"), r"\(tools, search_.*\): unknown tool\(s\) \['zoom'\]"),
                                ("tools", ("image_zoom_in", "search"), r"the search tool needs a backend: search_corpus"),
                                ("tasks", "synthetic:many", r"\(tasks\): task spec 'synthetic:many': expected synthetic:N"),
                                ("tasks", str(tmp_path / "nope.jsonl"), r"\(tasks\): task file .*nope.jsonl.* does not exist")):
        with pytest.raises(ModeError, match=match):
            config = _rl_config(missing, str(tmp_path / "run"), algo="grpo")
            config[field] = value
            rl_run.run(config)
    assert not os.path.exists(tmp_path / "run")


def test_sft_mode_refuses_bad_fields_and_data_before_loading(tmp_path):
    from axpo_jax.modes import ModeError

    bad_lines = tmp_path / "bad.jsonl"
    bad_lines.write_text('{not json\n{"task_id": "no messages"}\n')
    for field, value, match in (("dtype", "fp32", r"\(dtype\): dtype 'fp32'"),
                                ("tools", ("image_zoom_in", "zoom"), r"\(tools\): unknown tool\(s\) \['zoom'\]"),
                                ("data", str(tmp_path / "nope.jsonl"), r"\(data\): conversation file .* does not exist"),
                                ("data", str(bad_lines), r"\(data\): .* has no usable conversation \(2 lines skipped"),
                                ("learning_rate", -1.0, r"learning_rate must be > 0"),
                                ("logprob_chunk", 0, r"logprob_chunk must be an int >= 1"),
                                ("seed", -1, r"seed must be an int >= 0"),
                                ("keep_checkpoints", 0, r"keep_checkpoints must be an int >= 1")):
        with pytest.raises(ModeError, match=match):
            config = _config("sft")
            config.update(dict(checkpoint=str(tmp_path / "no_checkpoint"), data=str(bad_lines),
                               workdir=str(tmp_path / "run")))
            config.update({field: value})
            sft_run.run(config)
    assert not os.path.exists(tmp_path / "run")


def test_the_demo_checks_its_rl_fields_before_its_sft_stage(tmp_path):
    from axpo_jax import demo
    from axpo_jax.modes import ModeError

    config = _config("demo")
    config.workdir = str(tmp_path / "demo")
    config.rl.algo = "grpoo"
    with pytest.raises(ModeError, match=r"\(algo, axpo, advantage\): unknown advantage estimator 'grpoo'"):
        demo.run(config)
    assert not os.path.exists(tmp_path / "demo" / "tiny_checkpoint")  # nothing was built or trained
