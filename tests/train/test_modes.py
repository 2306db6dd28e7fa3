"""The sft and rl modes end to end on a tiny checkpoint folder: SFT JSONL with a bad record skipped and counted,
its transformers-format result loaded by RL, and an RL run stopped by a signal that resumes exactly (the resumed
steps' losses, rewards and tokens equal an uninterrupted run's); runs whose updates stay non-finite stop before
saving."""

import dataclasses
import json
import os
import signal

import jax
import numpy as np
import pytest
from flax import nnx

from axpo_jax.algo import registry
from axpo_jax.algo.grpo import GRPOConfig
from axpo_jax.algo.registry import GRPOEstimator
from axpo_jax.data.synthetic import make_task, sft_conversations, task_seed, write_sft_jsonl
from axpo_jax.demo import build_tiny_checkpoint
from axpo_jax.models import qwen3_vl
from axpo_jax.train import rl_run, sft_run
from axpo_jax.train.checkpoints import Checkpointer, StopRequest, restore_model_params
from axpo_jax.train.optimizer import NonFiniteUpdates
from tests.config_files import load_config


def _config(name: str):
    return load_config(name)


@pytest.fixture(scope="module")
def sft_inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("modes")
    base = str(root / "base")
    build_tiny_checkpoint(base, seed=0)
    data = root / "data" / "sft.jsonl"
    data.parent.mkdir()
    conversations = sft_conversations([make_task(task_seed(0, i)) for i in range(4)], tool_fraction=1.0)
    write_sft_jsonl(data, conversations)
    os.remove(data.parent / "sft_images" / "000003_1.png")  # record 3's crop is gone: skipped, counted
    return base, str(data)


def _sft_config(base: str, data: str, workdir: str, **overrides):
    config = _config("sft")
    config.update(dict(checkpoint=base, data=data, workdir=workdir, steps=2, batch_size=2, micro_batch_size=2,
                       length_bucket=1024, checkpoint_every=1, tensorboard=False))
    config.update(overrides)
    return config


def _handlers():
    return signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)


@pytest.fixture(scope="module")
def sft_result(sft_inputs, tmp_path_factory):
    handlers = _handlers()
    result = sft_run.run(_sft_config(*sft_inputs, str(tmp_path_factory.mktemp("modes") / "sft")))
    assert _handlers() == handlers  # Ctrl-C acts again after the run as before it
    return result


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
    handlers = _handlers()
    # the uninterrupted run also evaluates held-out tasks during training (every 2 steps and at the end)
    whole_config = _rl_config(checkpoint, str(tmp_path / "whole"), eval_every=2, eval_tasks="synthetic:2")
    whole = rl_run.run(whole_config)
    assert whole["steps"] == 3 and os.path.isfile(os.path.join(whole["checkpoint"], "model.safetensors"))
    record = whole["bench_record"]  # the run as a benchmark record: medians of steps 2-3
    assert record["device_count"] == jax.device_count() and record["step_s"] > record["update_s"] > 0
    assert record["rollout_tokens_per_s"] > 0 and record["update_flops_per_token"] > 0
    assert len(open(tmp_path / "whole" / "bench_records.jsonl").readlines()) == 1
    rl_run.run(whole_config)  # a rerun of the finished run trains nothing: no second record of the same steps
    assert len(open(tmp_path / "whole" / "bench_records.jsonl").readlines()) == 1
    assert _handlers() == handlers
    meta = json.load(open(tmp_path / "whole" / "checkpoints" / "3" / "meta" / "metadata"))
    assert meta["eval_image_buckets"]["prompt"][1] >= 64  # the evaluations' sticky floors are kept too

    workdir = str(tmp_path / "interrupted")
    with monkeypatch.context() as patch:  # a SIGTERM arrives during step 1
        patch.setattr(StopRequest, "__bool__", lambda self: True)
        stopped = rl_run.run(_rl_config(checkpoint, workdir))
    assert stopped["stopped_at_step"] == 1 and _handlers() == handlers
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


def _checkpoint_steps(workdir) -> list[int]:
    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"))
    steps = sorted(checkpointer.manager.all_steps())
    checkpointer.close()
    return steps


def test_rl_mode_stops_on_a_streak_of_non_finite_updates(sft_result, tmp_path, monkeypatch):
    """Step 1 trains, steps 2 and on have non-finite gradients: step 2's update is skipped and its checkpoint holds
    step 1's weights; step 3's makes the streak max_consecutive_skipped_updates=2, and the run stops before saving
    it, its last checkpoint that of the last finite weights."""
    advantage_calls = []

    class NonFiniteFromStep2(FirstRolloutRight):
        def advantages(self, *args, **kwargs):
            advantage_calls.append(None)
            adv = super().advantages(*args, **kwargs)
            if len(advantage_calls) == 1:
                return adv
            return dataclasses.replace(adv, prefix_adv_qn=adv.prefix_adv_qn * np.nan,
                                       cont_adv_qn=adv.cont_adv_qn * np.nan)

    monkeypatch.setitem(registry._ESTIMATORS, "grpo_nan_from_step_2", (NonFiniteFromStep2, GRPOConfig))
    workdir = str(tmp_path / "nan")
    handlers = _handlers()
    with pytest.raises(NonFiniteUpdates, match=r"^step 3: the last 2 optimizer updates had non-finite gradients and "
                                               r"were skipped \(max_consecutive_skipped_updates=2\)"):
        rl_run.run(_rl_config(sft_result["checkpoint"], workdir, algo="grpo_nan_from_step_2", steps=4,
                              keep_checkpoints=3, max_consecutive_skipped_updates=2))
    assert _handlers() == handlers
    lines = [json.loads(line) for line in open(os.path.join(workdir, "rl_metrics.jsonl"))]
    assert [r["skipped_updates"] for r in lines] == [0, 1, 2]
    assert _checkpoint_steps(workdir) == [1, 2]
    target = nnx.to_pure_dict(nnx.state(qwen3_vl.from_pretrained(sft_result["checkpoint"]), nnx.Param))
    first, last = (jax.tree.leaves(restore_model_params(os.path.join(workdir, "checkpoints"), target, step)[1])
                   for step in (1, 2))
    for a, b in zip(first, last):
        assert np.isfinite(np.asarray(b)).all()
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_sft_mode_stops_on_non_finite_updates(sft_inputs, tmp_path, monkeypatch):
    real = sft_run.agreed_micro_batches
    calls = []

    def poisoned(*args, **kwargs):  # the second step's batches give NaN gradients
        batches = real(*args, **kwargs)
        calls.append(None)
        return batches if len(calls) == 1 else [b.replace(loss_mask_bt=b.loss_mask_bt * np.nan) for b in batches]

    monkeypatch.setattr(sft_run, "agreed_micro_batches", poisoned)
    workdir = str(tmp_path / "sft")
    handlers = _handlers()
    with pytest.raises(NonFiniteUpdates, match=r"^step 2: the last 1 optimizer updates had non-finite gradients"):
        sft_run.run(_sft_config(*sft_inputs, workdir, steps=3, max_consecutive_skipped_updates=1))
    assert _handlers() == handlers
    assert _checkpoint_steps(workdir) == [1]


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
                                ("max_consecutive_skipped_updates", 0,
                                 r"\(max_consecutive_skipped_updates\): max_consecutive_skipped_updates must be an "
                                 r"int >= 1, got 0"),
                                ("warmup_fraction", 1.5, r"warmup_fraction must be <= 1"),
                                ("checkpoint_every", 0, r"checkpoint_every must be an int >= 1"),
                                ("keep_checkpoints", 0, r"keep_checkpoints must be an int >= 1"),
                                ("seed", -1, r"seed must be an int >= 0"),
                                ("capacity", 0, r"capacity must be an int >= 1"),
                                ("max_image_pixels", -1, r"max_image_pixels must be an int >= 0, got -1"),
                                ("workdir", str(tmp_path / "a_file"), r"\(workdir\): .*a_file' exists and is not a folder"),
                                ("algo", "grpoo", r"\(algo, axpo, advantage\): unknown advantage estimator 'grpoo'"),
                                ("advantage", dict(std_normalize=True, eps=1e-6, ddof=0, truncation="drop"),
                                 r"\(algo, axpo, advantage\): GRPOConfig.truncation=.drop.; expected"),
                                ("loss_aggregation", "seq-mean",
                                 r"\(eps_low, .*loss_aggregation\): LossConfig.aggregation must be one of"),
                                ("kl_kind", "k4", r"\(eps_low, .*\): LossConfig.kl_kind must be one of"),
                                ("dtype", "float33", r"\(dtype\): dtype 'float33': expected float32 or bfloat16"),
                                ("attention", "flash", r"\(attention\): attention must be one of \('auto', "),
                                ("attention", "cudnn", r"\(attention\): attention='cudnn' needs an NVIDIA GPU"),
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
                                ("attention", "cudnn", r"\(attention\): attention='cudnn' needs an NVIDIA GPU"),
                                ("tools", ("image_zoom_in", "zoom"), r"\(tools\): unknown tool\(s\) \['zoom'\]"),
                                ("data", str(tmp_path / "nope.jsonl"), r"\(data\): conversation file .* does not exist"),
                                ("data", str(bad_lines), r"\(data\): .* has no usable conversation \(2 lines skipped"),
                                ("learning_rate", -1.0, r"learning_rate must be > 0"),
                                ("logprob_chunk", 0, r"logprob_chunk must be an int >= 1"),
                                ("seed", -1, r"seed must be an int >= 0"),
                                ("max_image_pixels", -5, r"max_image_pixels must be an int >= 0, got -5"),
                                ("keep_checkpoints", 0, r"keep_checkpoints must be an int >= 1"),
                                ("max_consecutive_skipped_updates", -1,
                                 r"max_consecutive_skipped_updates must be an int >= 1")):
        with pytest.raises(ModeError, match=match):
            config = _config("sft")
            config.update(dict(checkpoint=str(tmp_path / "no_checkpoint"), data=str(bad_lines),
                               workdir=str(tmp_path / "run")))
            config.update({field: value})
            sft_run.run(config)
    assert not os.path.exists(tmp_path / "run")


def test_an_image_limit_below_the_processors_minimum_is_refused_before_the_workdir_and_weights(sft_inputs,
                                                                                                tmp_path):
    """The folder holds a processor only (smallest image area 32 x 32): the limit is checked against it before the
    run makes its workdir or reads any weights."""
    from axpo_jax.data.tiny_processor import build_tiny_processor
    from axpo_jax.modes import ModeError

    folder = str(tmp_path / "processor_only")
    build_tiny_processor(folder, patch_size=8, min_pixels=32 * 32, max_pixels=96 * 96)
    sft = _sft_config(folder, sft_inputs[1], str(tmp_path / "sft_run"), max_image_pixels=100)
    rl = _rl_config(folder, str(tmp_path / "rl_run"), algo="grpo", max_image_pixels=100)
    for run, config in ((sft_run.run, sft), (rl_run.run, rl)):
        with pytest.raises(ModeError, match=r"^config \(max_image_pixels\): max_image_pixels must be an int >= "
                                            r"the processor's smallest image area \(1024 pixels\), got 100$"):
            run(config)
    assert not os.path.exists(tmp_path / "sft_run") and not os.path.exists(tmp_path / "rl_run")


def test_the_memory_check_counts_the_largest_image_the_processor_makes(sft_inputs, tmp_path):
    """A 2048 x 2048 image limit gives the tiny policy's vision tower 65,536 patches of 8 px, whose einsum scores
    alone (2 heads x 65,536^2 x 8 bytes in fp32) are 64 GiB: refused on an 8 GiB device, naming the remedy; the
    folder's own limit (96 x 96 pixels, which max_image_pixels=0 keeps) fits the same device."""
    from axpo_jax.data.processor import load_processor
    from axpo_jax.modes import ModeError

    base = sft_inputs[0]
    config = _rl_config(base, str(tmp_path / "run"), algo="grpo", device_memory_gib=8.0,
                        max_image_pixels=2048 * 2048)
    with pytest.raises(ModeError, match=r"does not fit: its update phase needs .*activations [0-9.]+ GiB.*smaller "
                                        r"images \(max_image_pixels\)$"):
        rl_run.run(config)
    folder_limit = int(load_processor(base).image_processor.size["longest_edge"])
    assert folder_limit == 96 * 96
    rl_run.check_memory(_rl_config(base, str(tmp_path / "run"), device_memory_gib=8.0), None, folder_limit)


def test_the_demo_checks_its_rl_fields_before_its_sft_stage(tmp_path):
    from axpo_jax import demo
    from axpo_jax.modes import ModeError

    config = _config("demo")
    config.workdir = str(tmp_path / "demo")
    config.rl.algo = "grpoo"
    with pytest.raises(ModeError, match=r"\(algo, axpo, advantage\): unknown advantage estimator 'grpoo'"):
        demo.run(config)
    assert not os.path.exists(tmp_path / "demo" / "tiny_checkpoint")  # nothing was built or trained
