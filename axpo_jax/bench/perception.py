"""bench_perception: what the demo's tiny model learns from pixels alone by SFT, in a demo's budget of steps.

The demo's policy writes one box and one digit for every task (README, Results). Each probe here isolates one
thing the demo asks of the model's vision, as a one-image question whose answer only the image gives, trained by
SFT (`sft_example` + `sft_micro_batches` + `Learner`, the sft mode's path) from the demo's random init and scored
on held-out images by the candidate answer the model gives the highest log-prob (chance: 1 / candidates):

- `colour`: is a noisy picture red or blue (the control: a global cue, tests/train/test_sft_run.py);
- `quadrant`: which cell of the demo's 2x2 grid holds the red box, on the demo's task images (what the tool
  call's bbox needs);
- `digit`: the digit in the crop that `image_zoom_in` returns for the expert box (what the answer needs, from
  the observation the policy gets);
- `mark`: the colour of the mark in the zoom crop of the named box, on "mark" tasks (`make_mark_task`, the
  demo's task: what their answer needs);
- `mark_full`: the same colour from the full image and the task's question, which names the box (what answering
  without the tool would need).

    python launch.py --config configs/bench.py:perception [--config.model.rope_theta=10000 ...]

Writes `<workdir>/perception.png` (held-out accuracy by step, per probe) and ends with one JSON record.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from typing import Any

import numpy as np
from PIL import Image

PROBES = ("colour", "quadrant", "digit", "mark", "mark_full")
COLOURS = {"red": (200, 30, 30), "blue": (30, 30, 200)}
QUADRANTS = ("top left", "top right", "bottom left", "bottom right")


def _log(message: str) -> None:
    print(f"[bench_perception] {message}", file=sys.stderr, flush=True)


def colour_picture(colour: str, rng) -> Image.Image:
    """A noisy 64x64 picture of one colour, its shade drawn anew each time."""
    shade = np.array(COLOURS[colour], float) + rng.normal(0, 25, 3)
    return Image.fromarray(np.clip(shade + rng.normal(0, 10, (64, 64, 3)), 0, 255).astype(np.uint8))


def answer_conversation(picture: Image.Image, question: str, answer: str) -> list[dict]:
    """One user turn (the picture, then the question) and a short thinking-format answer."""
    return [{"role": "user", "content": [{"type": "image", "image": picture}, {"type": "text", "text": question}]},
            {"role": "assistant", "content": f"<think>\nI look at it.\n</think>\n<answer>\\boxed{{{answer}}}</answer>"}]


def _probe_task(kind: str, index: int, task_options: dict):
    """Task `index` of `kind`, with the configured task options when they are for that kind, else with only their
    grid (the quadrant and digit probes on the demo's "mark" variant look at the 2x2 "digit" task)."""
    from axpo_jax.data.synthetic import make_synthetic_task

    if task_options.get("kind", "digit") == kind:
        return make_synthetic_task(index, **task_options)
    return make_synthetic_task(index, kind=kind, grid=int(task_options.get("grid", 2)))


def probe_example(probe: str, index: int, task_options: dict) -> tuple[Image.Image, str, str]:
    """(picture, question, answer) number `index` of a probe, a pure function of both."""
    from axpo_jax.tools.base import ToolContext
    from axpo_jax.tools.image_zoom_in import ImageZoomIn

    if probe == "colour":
        rng = np.random.default_rng([index, 7])
        colour = list(COLOURS)[int(rng.integers(0, len(COLOURS)))]
        return colour_picture(colour, rng), "What colour is the picture?", colour
    if probe not in PROBES:
        raise ValueError(f"unknown probe {probe!r}; known: {PROBES}")
    task = _probe_task("mark" if probe.startswith("mark") else "digit", index, task_options)
    if probe == "mark_full":
        return task.images[0], task.question, task.answer
    if probe == "quadrant":
        if task.grid != 2:
            raise ValueError(f"the quadrant probe needs the 2x2 grid (task.grid=2), got grid={task.grid}")
        row, col = task.cell
        return task.images[0], "Where is the red box?", QUADRANTS[2 * row + col]
    arguments = {"bbox_2d": task.bbox_2d, "label": "the red box"}
    crop, = ImageZoomIn()(arguments, ToolContext(list(task.images), "probe")).images
    question = "Which digit is in the picture?" if probe == "digit" else "What colour is the mark?"
    return crop, question, task.answer


def candidates(probe: str, task_options: dict) -> tuple[str, ...]:
    if probe.startswith("mark"):
        from axpo_jax.data.synthetic import MARK_COLOURS

        mark_options = task_options if task_options.get("kind", "digit") == "mark" else {}
        return tuple(mark_options.get("colours", MARK_COLOURS))
    return {"colour": tuple(COLOURS), "quadrant": QUADRANTS, "digit": tuple(str(d) for d in range(10))}[probe]


def picked_answers(logprobs_bt, loss_mask_bt, choices: int) -> np.ndarray:
    """Index of the highest-scoring candidate per question, from rows laid out question-major (each question's
    `choices` candidate answers in turn); a row's score is the summed log-prob of its trained tokens (the shared
    thinking text adds the same to every candidate)."""
    score_qc = (np.asarray(logprobs_bt) * np.asarray(loss_mask_bt)).sum(axis=1).reshape(-1, choices)
    return score_qc.argmax(axis=1)


def run_probe(probe: str, model, processor, config) -> dict[str, Any]:
    """Trains `model` (in place) on one probe; held-out accuracy every `eval_every` steps."""
    import jax
    import jax.numpy as jnp

    from axpo_jax.data.synthetic import sft_example
    from axpo_jax.train.learner import Learner, LossConfig
    from axpo_jax.train.optimizer import make_optimizer
    from axpo_jax.train.sft_run import sft_micro_batches

    task_options = config.task.to_dict()
    pad_id = processor.tokenizer.pad_token_id or 0
    steps, batch = int(config.steps), int(config.batch_size)

    train = [sft_example(answer_conversation(*probe_example(probe, i, task_options)), processor, None)
             for i in range(int(config.train_examples))]
    # held-out images (indices no training image has), each scored with every candidate answer
    held = [probe_example(probe, i, task_options) for i in range(10**6, 10**6 + int(config.eval_examples))]
    truth, choices = [answer for _, _, answer in held], candidates(probe, task_options)
    scored = [sft_example(answer_conversation(picture, question, answer), processor, None)
              for picture, question, _ in held for answer in choices]
    scored_batch, = sft_micro_batches(scored, model.config, pad_id, len(scored))
    scored_batch = jax.tree.map(jnp.asarray, scored_batch)
    optimizer = make_optimizer(learning_rate=float(config.learning_rate), total_steps=steps, final_lr_ratio=1.0)
    learner = Learner(model, optimizer, LossConfig(kind="sft"))

    top_share = []  # the most picked answer's share at each evaluation: 1.0 = one answer for every image

    def accuracy() -> float:
        picked = picked_answers(learner.logprobs(scored_batch), scored_batch.loss_mask_bt, len(choices))
        top_share.append(float(np.bincount(picked).max() / len(picked)))
        return float(np.mean([choices[p] == t for p, t in zip(picked, truth)]))

    rng = np.random.default_rng(int(config.seed))
    curve, losses = [(0, accuracy())], []
    started = time.perf_counter()
    for step in range(1, steps + 1):
        rows = rng.choice(len(train), size=min(batch, len(train)), replace=False)
        losses.append(float(learner.step(sft_micro_batches([train[r] for r in rows], model.config, pad_id,
                                                           batch))["loss"]))
        if step % int(config.eval_every) == 0 or step == steps:
            curve.append((step, accuracy()))
            _log(f"{probe}: step {step}, loss {losses[-1]:.4f}, held-out accuracy {curve[-1][1]:.3f} "
                 f"({time.perf_counter() - started:.0f}s)")
    return {"chance": round(1 / len(choices), 4), "final_accuracy": curve[-1][1],
            "best_accuracy": max(a for _, a in curve), "accuracy_by_step": curve, "top_pick_share_by_step": top_share,
            "first_loss": round(losses[0], 4), "final_loss": round(losses[-1], 4),
            "seconds": round(time.perf_counter() - started, 1)}


def plot(path: str, results: dict[str, dict]) -> str:
    from axpo_jax.train.plots import _pyplot

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for color, (probe, result) in zip(plt.rcParams["axes.prop_cycle"].by_key()["color"], results.items()):
        ax.plot(*zip(*result["accuracy_by_step"]), marker="o", color=color, label=probe)
        ax.axhline(result["chance"], color=color, linestyle=":", linewidth=1)
    ax.set(title="held-out accuracy after SFT on the image alone (dotted: chance)", xlabel="SFT step",
           ylim=(-0.05, 1.05))
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run(config) -> dict[str, Any]:
    from axpo_jax.data.processor import load_processor
    from axpo_jax.demo import build_tiny_checkpoint
    from axpo_jax.models import qwen3_vl

    unknown = [p for p in config.probes if p not in PROBES]
    if unknown:
        raise ValueError(f"unknown probes {unknown}; known: {PROBES}")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="axpo_perception_") as folder:
        build_tiny_checkpoint(folder, seed=int(config.seed), **config.model.to_dict())
        processor = load_processor(folder)
        # each probe trains its own copy of the same random init, read from the folder
        results = {probe: run_probe(probe, qwen3_vl.from_pretrained(folder), processor, config)
                   for probe in config.probes}
    os.makedirs(config.workdir, exist_ok=True)
    plot_path = plot(os.path.join(config.workdir, "perception.png"), results)
    return {"mode": "bench_perception", "model": config.model.to_dict(), "task": config.task.to_dict(),
            "steps": int(config.steps), "batch_size": int(config.batch_size),
            "train_examples": int(config.train_examples), "learning_rate": float(config.learning_rate),
            **{f"{probe}/{k}": v for probe, result in results.items() for k, v in result.items()},
            "plot": plot_path, "seconds": round(time.perf_counter() - started, 1)}
