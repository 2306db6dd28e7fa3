"""The `eval` mode end to end on the tiny checkpoint and two tiny benchmarks (V* and HR-Bench 4K as published):
through launch.py (JSON line, results.json, the paper-style markdown table), resumed after a partial run (the
finished questions are not run again and every record equals the uninterrupted run's), refusing to mix settings
in one output directory (or to guess them from a damaged run_config.json), and evaluating an orbax checkpoint's
parameters."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from axpo_jax.eval.benchmarks import BENCHMARKS
from axpo_jax.eval.policy import load_policy
from axpo_jax.eval.run import benchmark_tools, load_judge, run, search_backend
from axpo_jax.modes import ModeError
from axpo_jax.models import qwen3_vl
from axpo_jax.train.checkpoints import Checkpointer
from axpo_jax.train.optimizer import make_optimizer
from tests.config_files import load_config
from tests.eval import published_files as pf

ROOT = Path(__file__).resolve().parents[2]
# tiny and fast: 2 samples, 2 turns, 16 new tokens a turn, 2 questions a batch (3 questions: one padded batch)
SMALL = {"benchmarks": "vstar,hrbench4k", "num_samples": 2, "max_turns": 2, "max_total_tokens": 1024,
         "max_new_tokens_per_turn": 16, "batch_size": 2, "tools": "image_zoom_in", "dtype": "float32",
         "tool_timeout_s": 5.0}


def _config(**fields):
    config = load_config("eval")
    for key, value in {**SMALL, **fields}.items():
        config[key] = value
    return config


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("eval_data"))
    pf.write_vstar(root)  # at the default paths: vstar_bench/, HR-Bench/hr_bench_4k.tsv
    pf.write_hrbench(root, "4k")
    return root


def _records(output_dir):
    return {name: sorted((json.loads(line) for line in open(os.path.join(output_dir, "records", f"{name}.jsonl"))),
                         key=lambda r: r["index"]) for name in ("vstar", "hrbench4k")}


@pytest.fixture(scope="module")
def launched(tiny_checkpoint, data_dir, tmp_path_factory):
    """One uninterrupted evaluation through launch.py, as a user runs it."""
    output_dir = str(tmp_path_factory.mktemp("eval_out") / "full")
    args = [f"--config.{key}={value}" for key, value in SMALL.items()]
    args += [f"--config.checkpoint={tiny_checkpoint}", f"--config.data_dir={data_dir}",
             f"--config.output_dir={output_dir}"]
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    proc = subprocess.run([sys.executable, "launch.py", "--config", "configs/eval.py", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return output_dir, json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


def test_launch_writes_results_and_table(launched, tiny_checkpoint):
    output_dir, result, stderr = launched
    assert result["questions_run"] == 6 and result["questions_resumed"] == 0
    for name in ("vstar", "hrbench4k"):
        for key in ("pass@1", "pass@2", "tool_use_rate", "tool_calls_per_trajectory", "turns_mean",
                    "tool_failures/bad_json", "answer_rate"):
            assert f"eval/{name}/{key}" in result
        assert 0.0 <= result[f"eval/{name}/pass@1"] <= result[f"eval/{name}/pass@2"] <= 1.0
    assert {"eval/average/pass@1", "eval/average/pass@2"} <= set(result)
    assert "V*" in stderr and "question" in stderr  # the progress bars, on stderr

    results = json.load(open(result["results"]))
    assert results["source"] == {"checkpoint": tiny_checkpoint}
    assert results["settings"]["temperature"] == 0.7 and results["settings"]["num_samples"] == 2
    vstar = results["benchmarks"]["vstar"]
    assert vstar["tools"] == ["image_zoom_in"] and vstar["scorers"] == ["choice"]
    assert vstar["metrics"]["questions"] == 3 and vstar["metrics"]["samples_per_question"] == 2
    records = _records(output_dir)
    assert [r["task_id"] for r in records["vstar"]] == ["vstar/0", "vstar/1", "vstar/2"]
    assert all(len(r["samples"]) == 2 and "response" in r["samples"][0] for r in records["hrbench4k"])
    correct = np.array([[s["correct"] for s in r["samples"]] for r in records["vstar"]])
    assert vstar["metrics"]["pass@1"] == pytest.approx(correct.mean())
    assert vstar["metrics"]["pass@2"] == pytest.approx(correct.any(axis=1).mean())

    table = open(result["report"]).read().splitlines()
    header = table.index("| Model | V* | HR-4K | Avg. |")
    row = table[header + 2]
    name = os.path.basename(tiny_checkpoint)
    v, h = (f"{100 * results['benchmarks'][b]['metrics'][k]:.1f}" for b in ("vstar", "hrbench4k") for k in ("pass@1",))
    assert row.startswith(f"| {name} | {v} / ") and f" | {h} / " in row
    assert "Cells: Pass@1 / Pass@2 (%)." in table
    assert any(line.startswith("| V* | 3 | ") for line in table)  # the tool-use table


def test_resume_skips_finished_questions_and_matches(launched, tiny_checkpoint, data_dir, tmp_path):
    """What a run killed while appending records leaves behind: V* stopped partway through its first batch's
    records (question 0's written, question 1's cut mid-line), HR-Bench 4K after its first batch with the last
    record whole but without its newline. Rerunning into the same directory runs only the rest (V*'s first batch
    again as first formed: the same rows and key), and ends with the uninterrupted run's records and figures."""
    full_dir, full_result, _ = launched
    output_dir = tmp_path / "resumed"
    (output_dir / "records").mkdir(parents=True)
    for name in ("vstar", "hrbench4k"):
        lines = open(os.path.join(full_dir, "records", f"{name}.jsonl")).read().splitlines(keepends=True)
        cut = lines[0] + lines[1][:40] if name == "vstar" else lines[0] + lines[1].rstrip("\n")
        (output_dir / "records" / f"{name}.jsonl").write_text(cut)
    config = _config(checkpoint=tiny_checkpoint, data_dir=data_dir, output_dir=str(output_dir))
    result = run(config)
    assert result["questions_run"] == 3 and result["questions_resumed"] == 3
    assert _records(str(output_dir)) == _records(full_dir)  # same samples, answers, scores and texts
    for key, value in full_result.items():
        if key.startswith("eval/"):
            assert result[key] == pytest.approx(value), key

    config.num_samples = 3
    with pytest.raises(ModeError, match=r"other settings \(settings: .*'num_samples': 2.*'num_samples': 3"):
        run(config)


def test_run_config_written_whole_and_a_damaged_one_named(tmp_path):
    from axpo_jax.modes import check_run_settings

    def check(path, settings):  # as the eval mode calls it
        check_run_settings(path, settings, write=True, holds="results", option="output_dir")

    path = str(tmp_path / "out" / "run_config.json")
    settings = {"checkpoint": "/ck", "seed": 0}
    check(path, settings)
    assert json.load(open(path)) == settings and os.listdir(tmp_path / "out") == ["run_config.json"]
    check(path, settings)  # the same settings: resumes
    open(path, "w").write(json.dumps(settings)[:12])  # cut short, e.g. by a full disk
    with pytest.raises(ModeError, match=re.escape(path) + r" is unreadable \(.*\); it records the settings"):
        check(path, settings)


def test_unknown_benchmark_and_missing_data(tiny_checkpoint, tmp_path):
    with pytest.raises(ModeError, match="unknown \\['vstr'\\]; the benchmarks are mathvision,"):
        run(_config(benchmarks="vstr", checkpoint=tiny_checkpoint))
    with pytest.raises(ModeError, match=f"V\\* Bench: {tmp_path}/nowhere/vstar_bench does not exist"):
        run(_config(benchmarks="vstar", checkpoint=tiny_checkpoint, data_dir=str(tmp_path / "nowhere")))
    with pytest.raises(ModeError, match="batch_size must be an int >= 1, got 0"):  # before the data or the model
        run(_config(benchmarks="vstar", checkpoint=tiny_checkpoint, batch_size=0))
    with pytest.raises(ModeError, match="max_image_pixels must be an int >= 0, got -1"):
        run(_config(benchmarks="vstar", checkpoint=tiny_checkpoint, max_image_pixels=-1))


def judge_for_tests(question, reference, prediction):
    return float(prediction == reference)


def test_tools_search_and_judge(tmp_path):
    base = ["image_zoom_in", "python"]
    assert benchmark_tools(BENCHMARKS["vstar"], base, None) == (base, None)
    tools, note = benchmark_tools(BENCHMARKS["mmsearch"], base, None)
    assert tools == base and note.startswith("MMSearch was run WITHOUT the search tool: no search backend")
    corpus = tmp_path / "corpus.jsonl"
    document = {"title": "Euro 2024", "url": "https://x.org/e", "text": "Spain won the final."}
    corpus.write_text(json.dumps(document) + "\n")
    backend, text = search_backend(_config(search_corpus=str(corpus)))
    assert text == f"BM25 over {corpus}" and backend.search("who won the final", 3)[0]["title"] == "Euro 2024"
    assert benchmark_tools(BENCHMARKS["hrmmsearch"], base, backend) == ([*base, "search"], None)
    assert search_backend(_config()) == (None, "none")

    assert load_judge("") is None
    assert load_judge("tests.eval.test_eval_mode:judge_for_tests") is judge_for_tests
    with pytest.raises(ModeError, match="config.judge='tests.eval.nothing:x': cannot import it"):
        load_judge("tests.eval.nothing:x")


def test_orbax_checkpoint(tiny_checkpoint, data_dir, tmp_path):
    model = qwen3_vl.from_pretrained(tiny_checkpoint)
    rng = np.random.default_rng(3)  # numpy noise: a jax.random call per parameter shape would compile each
    nnx.update(model, jax.tree.map(lambda x: x + 0.01 * rng.standard_normal(x.shape, np.float32),
                                   nnx.state(model, nnx.Param)))
    checkpointer = Checkpointer(str(tmp_path / "orbax"), async_save=False)
    optimizer = nnx.Optimizer(model, make_optimizer(learning_rate=1e-3, total_steps=10), wrt=nnx.Param)
    checkpointer.save(7, model, optimizer)
    checkpointer.close()

    loaded, _, source = load_policy(tiny_checkpoint, orbax_dir=str(tmp_path / "orbax"), dtype=np.float32)
    assert source["orbax_step"] == 7
    trained = dict(qwen3_vl.named_parameters(model))
    for name, value in qwen3_vl.named_parameters(loaded):
        np.testing.assert_array_equal(np.asarray(value), np.asarray(trained[name]), err_msg=name)
    with pytest.raises(FileNotFoundError, match="has no step 9; its steps are \\[7\\]"):
        load_policy(tiny_checkpoint, orbax_dir=str(tmp_path / "orbax"), orbax_step=9)

    result = run(_config(benchmarks="vstar", max_questions=2, checkpoint=tiny_checkpoint, data_dir=data_dir,
                         orbax_dir=str(tmp_path / "orbax"), output_dir=str(tmp_path / "out")))
    results = json.load(open(result["results"]))
    assert results["source"]["orbax_step"] == 7 and results["model"].endswith("(orbax step 7)")
    assert results["benchmarks"]["vstar"]["metrics"]["questions"] == 2


def test_prompts_longer_than_the_cache_are_reported(tiny_checkpoint, data_dir, tmp_path):
    """Samples the run itself cut short (here every prompt is longer than a 64-token cache) are named in the log and
    the report's notes, since they are scored wrong without the policy having answered."""
    from axpo_jax.eval.run import cut_short_note

    result = run(_config(benchmarks="vstar", checkpoint=tiny_checkpoint, data_dir=data_dir, max_total_tokens=64,
                         output_dir=str(tmp_path / "short")))
    results = json.load(open(result["results"]))
    assert results["benchmarks"]["vstar"]["metrics"]["finish_reasons"] == {"prompt_too_long": 6}
    assert "V*: of 6 samples, 6 did not fit the 64-token cache (config.max_total_tokens) (scored wrong)" \
        in results["notes"]
    assert "did not fit the 64-token cache" in open(result["report"]).read()
    assert cut_short_note("X", {"answer": 3, "bad_observation": 1}, 1024) == (
        "X: of 4 samples, 1 ended on a tool observation the processor refused (scored wrong)")
    assert cut_short_note("X", {"answer": 3, "turn_limit": 2, "length": 1}, 1024) is None  # the policy's own doing
