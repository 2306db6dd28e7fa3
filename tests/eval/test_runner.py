"""Evaluation through the real agent loop on the tiny checkpoint, with a scripted policy whose answers and tool
calls are known: Pass@k, tool use, failures per category and turns come out as hand-computed; records are written,
reused on a rerun (nothing is run again), a batch cut short while its records were written is rerun as it was
formed, and padded batches drop their padding; scoring by benchmark kind or by a judge; truncated record files."""

import json

import jax
import numpy as np
import pytest
from PIL import Image

from axpo_jax.data.processor import load_processor
from axpo_jax.eval.benchmarks.base import EvalItem, ImageSource
from axpo_jax.eval.records import RecordStore
from axpo_jax.eval.runner import benchmark_key, evaluate, items_from_tasks, make_agent, run_benchmark
from axpo_jax.eval.scoring import describe_scorer, is_correct
from axpo_jax.eval.settings import PAPER_EVAL_SETTINGS, EvalSettings
from axpo_jax.models import qwen3_vl
from axpo_jax.rollout.agent_loop import Task
from axpo_jax.tools.executor import ToolExecutor
from axpo_jax.tools.registry import build_registry
from tests.eval.scripted import BAD_JSON, ZOOM, ScriptedSampler, answer

SETTINGS = EvalSettings(num_samples=2, max_turns=3, max_total_tokens=1024, max_new_tokens_per_turn=64)
IMAGE = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))


def _items(count: int) -> list[EvalItem]:
    kinds = [("Which fruit?\nOptions:\n(A) apple\n(B) pear", ["A", "apple"], "choice"),
             ("How many apples?", ["7"], "math"),
             ("Name the colour.", ["red"], "exact")]
    return [EvalItem("toy", f"q{i}", q, [ImageSource(image=IMAGE)], refs, kind)
            for i, (q, refs, kind) in enumerate(kinds[:count])]


@pytest.fixture(scope="module")
def agent(tiny_checkpoint):
    processor = load_processor(tiny_checkpoint)
    model = qwen3_vl.from_pretrained(tiny_checkpoint)
    agent = make_agent(model, processor, ToolExecutor(build_registry(["image_zoom_in"]), timeout_s=5.0), SETTINGS)
    agent._samplers[4] = ScriptedSampler(model, batch_size=4, capacity=1024, pad_id=agent.pad_id)  # 2 questions x 2
    return agent


def _script(agent, rows):
    agent._samplers[4].set_scripts(agent.tokenizer, rows)


def test_paper_settings_are_the_default():
    s = PAPER_EVAL_SETTINGS
    assert (s.num_samples, s.temperature, s.top_p, s.top_k, s.presence_penalty, s.max_turns, s.max_total_tokens) == (
        4, 0.7, 0.8, 20, 1.5, 5, 32768)
    assert s.pass_k == (1, 4) and s.sampling.top_k == 20
    with pytest.raises(ValueError, match="temperature must be >= 0"):  # settings refuse what sampling would
        EvalSettings(temperature=-0.7)


def test_evaluate_known_answers(agent):
    # rows: q0 sample 0, q0 sample 1, q1 sample 0, q1 sample 1
    _script(agent, [
        ["<think>\nzoom\n</think>\n" + ZOOM, answer("A")],  # right, after a successful zoom: 2 turns
        [answer("B")],  # wrong
        [BAD_JSON, answer("14/2")],  # right (math equivalence), after a malformed call
        ["I do not know<|im_end|>"],  # no answer
    ])
    metrics = evaluate(agent, {"toy": _items(2)}, jax.random.key(0), SETTINGS, batch_size=2)
    assert metrics["eval/toy/pass@1"] == pytest.approx(0.5)  # (1/2 + 1/2) / 2
    assert metrics["eval/toy/pass@2"] == pytest.approx(1.0)  # each question has a right sample
    assert metrics["eval/average/pass@1"] == pytest.approx(0.5) and metrics["eval/average/pass@2"] == 1.0
    assert metrics["eval/toy/tool_use_rate"] == pytest.approx(0.5)
    assert metrics["eval/toy/tool_calls_per_trajectory"] == pytest.approx(0.5)
    assert metrics["eval/toy/tool_failures/bad_json"] == 1 and metrics["eval/toy/tool_failures/timeout"] == 0
    assert metrics["eval/toy/tool_failure_rate"] == pytest.approx(0.5)
    assert metrics["eval/toy/turns_mean"] == pytest.approx(1.5) and metrics["eval/toy/turns_max"] == 2
    assert metrics["eval/toy/answer_rate"] == pytest.approx(0.75)
    assert metrics["eval/toy/top_answer_share"] == pytest.approx(1 / 3)  # "A", "B", "14/2": each once
    assert metrics["eval/toy/finish_reasons/answer"] == 3 and metrics["eval/toy/finish_reasons/no_answer"] == 1
    assert all(isinstance(v, (int, float)) for v in metrics.values())


def test_records_resume_and_padding(agent, tmp_path):
    items = _items(3)  # batch 0: q0, q1; batch 1: q2 and a padding copy of it
    _script(agent, [
        [answer("A"), answer("C")], [answer("(A)"), answer("red")],  # batch 0 then batch 1, per row
        [answer("7"), answer("C")], [answer("8"), answer("C")],
    ])
    store = RecordStore(str(tmp_path / "records" / "toy.jsonl"))
    records, ran = run_benchmark(agent, items, benchmark_key(jax.random.key(1), "toy"), SETTINGS, batch_size=2,
                                 store=store, save_responses=True)
    assert ran == 3 and [r["index"] for r in records] == [0, 1, 2]  # the padding question left no record
    assert [[s["correct"] for s in r["samples"]] for r in records] == [[True, True], [True, False], [False, True]]
    assert records[2]["samples"][1]["response"] == answer("red")
    assert records[0]["scorer"] == "choice" and records[1]["references"] == ["7"]
    assert len(open(store.path).read().splitlines()) == 3

    _script(agent, [[answer("B")]] * 4)  # a rerun must not decode anything
    again, ran = run_benchmark(agent, items, benchmark_key(jax.random.key(1), "toy"), SETTINGS, batch_size=2,
                               store=store, save_responses=True)
    assert ran == 0 and again == records and agent._samplers[4].decode_calls == 0

    # killed while appending batch 0: q0's record written, q1's cut mid-line. q1 must get rows 2 and 3 again (the
    # script gives rows 0 and 1 other answers), so batch 0 runs whole and only q1's record is added
    lines = open(store.path).read().splitlines(keepends=True)
    open(store.path, "w").write(lines[0] + lines[1][:30])
    _script(agent, [
        [answer("A"), answer("C")], [answer("(A)"), answer("red")],
        [answer("7"), answer("C")], [answer("8"), answer("C")],
    ])
    resumed, ran = run_benchmark(agent, items, benchmark_key(jax.random.key(1), "toy"), SETTINGS, batch_size=2,
                                 store=store, save_responses=True)
    assert ran == 2 and resumed == records
    assert sorted(store.load().values(), key=lambda r: r["index"]) == records

    wrong = [EvalItem("other", "x", "q", [], ["1"], "exact")] + items[1:]
    with pytest.raises(ValueError, match="made from other data"):
        run_benchmark(agent, wrong, jax.random.key(0), SETTINGS, batch_size=2, store=store)


def test_record_store_drops_a_truncated_last_line(tmp_path):
    store = RecordStore(str(tmp_path / "r.jsonl"))
    store.append([{"index": 0, "task_id": "a"}, {"index": 1, "task_id": "b"}])
    with open(store.path, "ab") as file:
        file.write('{"index": 2, "task_id": "c", "answer": "2π'.encode()[:-1])  # a crash mid-write, inside the π
    assert sorted(store.load()) == [0, 1]
    store.append([{"index": 2, "task_id": "c"}])
    assert sorted(store.load()) == [0, 1, 2]
    assert [json.loads(line)["index"] for line in open(store.path)] == [0, 1, 2]
    with open(store.path, "a") as file:
        file.write("not json\n")  # complete but malformed: an error, not silently dropped
    with pytest.raises(ValueError, match=r"r.jsonl:4: not a valid record"):
        store.load()


def test_record_store_keeps_a_whole_last_record_without_its_newline(tmp_path):
    store = RecordStore(str(tmp_path / "r.jsonl"))
    store.append([{"index": 0, "task_id": "a"}])
    with open(store.path, "a", encoding="utf-8") as file:
        file.write(json.dumps({"index": 1, "task_id": "b", "answer": "2π"}, ensure_ascii=False))  # crash before "\n"
    assert sorted(store.load()) == [0, 1]  # counted as finished, so it must stay on disk
    store.append([{"index": 2, "task_id": "c"}])
    assert [json.loads(line)["index"] for line in open(store.path, encoding="utf-8")] == [0, 1, 2]
    assert store.load()[1]["answer"] == "2π"


def test_scoring_by_kind_and_judge():
    math_item = EvalItem("mathvr", "1", "Area?", [], ["\\frac{1}{2}"], "math", prefers_judge=True)
    assert is_correct(math_item, "0.5") and not is_correct(math_item, "2") and not is_correct(math_item, None)
    assert describe_scorer(math_item, None) == "math (judge preferred, none configured)"
    calls = []

    def judge(question, reference, prediction):
        calls.append((question, reference, prediction))
        return 1.0 if prediction == "one half" else 0.0

    assert is_correct(math_item, "one half", judge) and not is_correct(math_item, "0.5", judge)
    assert calls[0] == ("Area?", "\\frac{1}{2}", "one half") and describe_scorer(math_item, judge) == "judge"
    choice_item = EvalItem("vstar", "2", "Q", [], ["B", "white"], "choice")  # not judge-graded: judge unused
    assert is_correct(choice_item, "(B)", judge) and is_correct(choice_item, "white") and len(calls) == 2
    f1_item = EvalItem("mmsearch", "3", "Q", [], ["Spain", "La Roja"], "f1")
    assert is_correct(f1_item, "la roja") and is_correct(f1_item, "the Spain national team")  # F1 1.0 and 0.5
    assert not is_correct(f1_item, "Spain national football team")  # F1 0.4 < 0.5
    assert not is_correct(f1_item, "Portugal")


def test_items_from_tasks():
    (item,) = items_from_tasks("heldout", [Task("Which digit?", [IMAGE], "7", "t1")], "exact")
    assert item.task_id == "heldout/t1" and item.references == ["7"]
    task = item.task()
    assert task.images[0] is not IMAGE and np.array_equal(np.asarray(task.images[0]), np.asarray(IMAGE))
