"""The sft, rl and eval modes end to end through launch.py as 2 CPU processes on 127.0.0.1 (1 device each, the configs'
mesh: fsdp over both), against one process holding both devices and the whole global batch:

SFT on a JSONL -> its transformers folder (gathered from both processes, written by process 0) -> RL (AXPO, real
tools, held-out evaluation at the last step) stopped after step 1 by a stop request that only process 0 sees
(both processes must stop after the same step and share one orbax checkpoint) -> resumed to step 2. Every step's
loss, gradient norm, rewards and token counts equal the single-process run's.

At this scale no group meets AXPO's trigger, so no prefix is forked here; tests/parallel/test_multihost.py checks
forks across processes (through its worker, not the modes).

The processes run tests/parallel/launch_modes.py: launch.py plus an AXPO variant with non-zero advantages and the
one-process stop request (see that file). Equality: fp32, the same sums reduced in a different order across
processes (rtol 1e-5; on this box they come out bit-identical); sampled tokens, rewards and tool calls are
exact.
"""

import json
import os

import numpy as np
import pytest

from tests.parallel.test_multihost import ROOT, Run

LAUNCHER = os.path.join(ROOT, "tests", "parallel", "launch_modes.py")
RTOL = 1e-5
SFT = dict(steps=10, batch_size=4, learning_rate=3e-2, length_bucket=1024, checkpoint_every=5, tensorboard=False)
# micro_batch_size is rows per micro-batch on each process: the reference's micro-batches hold both processes' rows
SFT_MICRO = 2
RL = dict(steps=2, algo="axpo_first_right", questions_per_step=4, num_samples=2, max_turns=2,
          max_new_tokens_per_turn=48, capacity=768, kl_coef=0.0, learning_rate=1e-3, checkpoint_every=1,
          tensorboard=False, eval_every=2, eval_tasks="synthetic:2", eval_batch_size=2, eval_capacity=768,
          eval_max_new_tokens_per_turn=48, eval_max_turns=2)
RL_MICRO = 4


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """The tiny checkpoint (one layer: compile time, not model size, is what these runs spend), an SFT JSONL of
    expert zoom trajectories, and the compilation cache every run shares (the resumed run compiles nothing)."""
    from axpo_jax.data.synthetic import make_task, sft_conversations, task_seed, write_sft_jsonl
    from axpo_jax.demo import build_tiny_checkpoint

    folder = tmp_path_factory.mktemp("multihost_modes")
    checkpoint = str(folder / "checkpoint")
    build_tiny_checkpoint(checkpoint, seed=0, num_hidden_layers=1, vision_depth=1, deepstack_visual_indexes=(0,))
    data = folder / "data" / "sft.jsonl"
    data.parent.mkdir()
    write_sft_jsonl(data, sft_conversations([make_task(task_seed(0, i)) for i in range(8)], tool_fraction=1.0))
    return {"checkpoint": checkpoint, "data": str(data), "cache": str(folder / "jax_cache"), "folder": folder}


def _flags(config: str, **fields) -> list[str]:
    return [LAUNCHER, "--config", os.path.join("configs", config)] + [
        f"--config.{key}={value}" for key, value in fields.items()]


def _mode(shared, name, config, *, processes, env=None, **fields) -> Run:
    """A mode through launch.py: 2 processes x 1 device, or the reference (1 process x 2 devices)."""
    return Run(shared, str(shared["folder"]), name, processes=processes, devices_per_process=2 // processes,
               command=_flags(config, **fields), env=env, timeout=300)


def _metrics(workdir: str, name: str) -> list[dict]:
    with open(os.path.join(workdir, f"{name}.jsonl")) as f:
        return [json.loads(line) for line in f]


def _assert_steps_equal(got, want, exact, close):
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for g, w in zip(got, want):
        for key in exact:
            assert g[key] == w[key], (g["step"], key, g[key], w[key])
        for key in close:
            assert g[key] == pytest.approx(w[key], rel=RTOL, abs=1e-7), (g["step"], key)


def test_sft_then_rl_modes_on_two_processes_stop_resume_and_match_one_process(shared):
    folder = shared["folder"]
    sft = {k: folder / f"sft{p}" for k, p in (("two", 2), ("one", 1))}
    runs = {k: _mode(shared, f"sft{2 if k == 'two' else 1}", "sft.py", processes=2 if k == "two" else 1,
                     checkpoint=shared["checkpoint"], data=shared["data"], workdir=sft[k],
                     micro_batch_size=SFT_MICRO * (1 if k == "two" else 2), **SFT) for k in sft}
    two, one = runs["two"].records(), runs["one"].records()
    # the global batch's numbers on both processes
    assert [dict(r, seconds=0) for r in two] == [dict(two[0], seconds=0)] * 2 and two[0]["steps"] == SFT["steps"]
    _assert_steps_equal(_metrics(sft["two"], "sft_metrics"), _metrics(sft["one"], "sft_metrics"),
                        exact=("trained_tokens", "skipped_examples"), close=("loss", "grad_norm", "entropy"))
    # the exported folder: written once, complete, and the weights the single process trained
    exported = two[0]["checkpoint"]
    assert sorted(os.listdir(exported)) == sorted(os.listdir(one[0]["checkpoint"]))
    from safetensors.numpy import load_file

    weights = load_file(os.path.join(exported, "model.safetensors"))
    reference_weights = load_file(os.path.join(one[0]["checkpoint"], "model.safetensors"))
    assert weights.keys() == reference_weights.keys()
    for name, value in weights.items():
        np.testing.assert_allclose(value, reference_weights[name], rtol=1e-4, atol=1e-6, err_msg=name)

    # RL from the 2-process SFT folder: interrupted (process 0 alone is asked to stop) and resumed, beside one
    # uninterrupted process laying the step's forks out as the 2-process run does
    rl_two, rl_one = str(folder / "rl2"), str(folder / "rl1")
    reference = _mode(shared, "rl1", "rl.py", processes=1, checkpoint=exported, workdir=rl_one,
                      micro_batch_size=2 * RL_MICRO, layout_shards=2, **RL)
    stopped = _mode(shared, "rl2-stopped", "rl.py", processes=2, checkpoint=exported, workdir=rl_two,
                    micro_batch_size=RL_MICRO, env=lambda i: {"AXPO_TEST_STOP_AFTER_STEP": "1"} if i == 0 else {},
                    **RL).records()
    assert [r["stopped_at_step"] for r in stopped] == [1, 1]
    assert sorted(os.listdir(os.path.join(rl_two, "checkpoints"))) == ["1"]
    resumed = _mode(shared, "rl2-resumed", "rl.py", processes=2, checkpoint=exported, workdir=rl_two,
                    micro_batch_size=RL_MICRO, **RL).records()
    want = reference.records()[0]
    assert [r["steps"] for r in resumed] == [RL["steps"]] * 2
    assert [r["final_eval_pass@1"] for r in resumed] == [want["final_eval_pass@1"]] * 2
    got, expected = _metrics(rl_two, "rl_metrics"), _metrics(rl_one, "rl_metrics")
    assert all(r["grad_norm"] > 0 for r in expected)  # the weights move every step
    assert sum(r["tool_calls"] for r in expected) > 0  # tools ran (each on the process that owns the question)
    _assert_steps_equal(got, expected,
                        exact=("reward", "sampled_tokens", "policy_tokens", "tool_calls", "resamples_used",
                               "trained_tokens"),
                        close=("loss", "grad_norm", "pg_loss", "entropy"))
    assert "eval/heldout/pass@1" in got[-1]
    for key in ("eval/heldout/pass@1", "eval/heldout/tool_use_rate", "eval/heldout/questions"):
        assert got[-1][key] == expected[-1][key], key
    assert os.path.isfile(os.path.join(rl_two, "learning_curves.png"))
    assert os.path.isfile(os.path.join(resumed[0]["checkpoint"], "model.safetensors"))


def test_eval_mode_on_two_processes_matches_one_process(shared):
    """The `eval` mode as 2 processes (each runs its share of every batch, process 0 writes records and results)
    equals one process holding both devices: the same records line for line, the same results. Greedy, so the
    samples do not depend on which process drew them."""
    from tests.eval import published_files

    folder = shared["folder"]
    data_dir = str(folder / "eval_data")
    published_files.write_vstar(data_dir)
    fields = dict(checkpoint=shared["checkpoint"], data_dir=data_dir, benchmarks="vstar", num_samples=2,
                  temperature=0.0, max_turns=2, max_total_tokens=768, max_new_tokens_per_turn=16, batch_size=2,
                  tools="image_zoom_in", dtype="float32", save_responses=True)
    runs = {p: _mode(shared, f"eval{p}", "eval.py", processes=p, output_dir=folder / f"eval{p}", **fields)
            for p in (2, 1)}
    two, one = runs[2].records(), runs[1].records()
    def same(record):  # the paths name each run's own output folder
        return dict(record, seconds=0, results=os.path.basename(record["results"]),
                    report=os.path.basename(record["report"]))

    assert [same(r) for r in two] == [same(one[0])] * 2  # every process returns the results
    assert one[0]["questions_run"] == 3

    def read(processes, *parts):
        with open(os.path.join(folder / f"eval{processes}", *parts)) as f:
            return f.read()

    records = [json.loads(line) for line in read(2, "records", "vstar.jsonl").splitlines()]
    assert sorted(r["index"] for r in records) == [0, 1, 2]  # each question once: written by process 0 alone
    assert read(2, "records", "vstar.jsonl") == read(1, "records", "vstar.jsonl")
    assert json.loads(read(2, "results.json"))["benchmarks"] == json.loads(read(1, "results.json"))["benchmarks"]
