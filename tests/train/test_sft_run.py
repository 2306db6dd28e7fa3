"""SFT's data path carries the images into the loss: a tiny random model, trained through `sft_example` and
`sft_micro_batches` (what the sft mode batches) on answers that only the image determines, gets them right on
images it never saw. A batch that dropped the pixels, or gave a row another row's image, could not. An example the
loop cannot train is skipped with its reason, and a run that trained nothing is an error, not an exported model."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from axpo_jax.bench.perception import COLOURS, answer_conversation, colour_picture, picked_answers
from axpo_jax.data.processor import load_processor
from axpo_jax.data.synthetic import sft_example, write_sft_jsonl
from axpo_jax.data.tasks import DataFileError
from axpo_jax.demo import build_tiny_checkpoint
from axpo_jax.models import qwen3_vl
from axpo_jax.train import sft_run
from axpo_jax.train.learner import Learner, LossConfig
from axpo_jax.train.optimizer import make_optimizer
from axpo_jax.train.sft_run import sft_micro_batches, trainable_example
from tests.config_files import load_config

STEPS = 100  # it picks up the colours between steps 30 and 70 (seeds 0-2); the rest is margin


def _conversation(picture, answer: str) -> list[dict]:
    return answer_conversation(picture, "What colour is the picture?", answer)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("colours") / "checkpoint")
    build_tiny_checkpoint(folder, seed=0)
    return folder


@pytest.fixture(scope="module")
def tiny(tiny_folder):
    return qwen3_vl.from_pretrained(tiny_folder), load_processor(tiny_folder)


def test_sft_learns_an_answer_only_the_image_gives(tiny):
    model, processor = tiny
    pad_id = processor.tokenizer.pad_token_id or 0
    rng = np.random.default_rng(0)

    def batches(pairs, micro_batch_size):
        examples = [sft_example(_conversation(picture, answer), processor, None) for picture, answer in pairs]
        return sft_micro_batches(examples, model.config, pad_id, micro_batch_size)

    train = batches([(colour_picture(c, rng), c) for c in list(COLOURS) * 8], micro_batch_size=8)
    # held-out pictures, each scored with both answers: the model picks the one it gives the higher log-prob
    held_out = [(colour_picture(c, rng), c) for c in list(COLOURS) * 4]
    candidates = [(picture, answer) for picture, _ in held_out for answer in COLOURS]
    scored, = batches(candidates, micro_batch_size=len(candidates))
    learner = Learner(model, make_optimizer(learning_rate=3e-3, total_steps=STEPS, final_lr_ratio=1.0),
                      LossConfig(kind="sft"))

    def accuracy() -> float:
        logprobs_bt = learner.logprobs(jax.tree.map(jnp.asarray, scored))
        picked = [list(COLOURS)[i] for i in picked_answers(logprobs_bt, scored.loss_mask_bt, len(COLOURS))]
        return float(np.mean([p == truth for p, (_, truth) in zip(picked, held_out)]))

    before = accuracy()
    losses = [learner.step(train)["loss"] for _ in range(STEPS)]
    assert losses[-1] < 0.1 * losses[0], losses
    assert before <= 0.75 and accuracy() == 1.0, before  # a random model picks one colour for every picture


def test_an_example_the_loop_cannot_train_is_skipped_with_its_reason(tiny):
    _, processor = tiny
    question = {"role": "user", "content": "What colour?"}
    answer = {"role": "assistant", "content": "<think>\nRed.\n</think>\n<answer>\\boxed{red}</answer>"}
    example, reason = trainable_example({"messages": [question, answer]}, processor, None, max_length=4096)
    assert reason is None and example["loss_mask"].sum() > 0
    # whatever the source's shape check lets through, of any exception type, skips the one example
    broken = {"messages": [question, {**answer, "tool_calls": "zoom"}]}
    example, reason = trainable_example(broken, processor, None, max_length=4096)
    assert example is None and reason.startswith("UndefinedError: ")  # jinja2's, not a ValueError
    example, reason = trainable_example({"messages": [question, answer]}, processor, None, max_length=8)
    assert example is None and reason.endswith("tokens, longer than max_length 8")
    example, reason = trainable_example({"messages": [question]}, processor, None, max_length=4096)
    assert example is None and reason.startswith("no token to train")


def test_a_run_that_trains_nothing_is_an_error_and_exports_nothing(tiny_folder, tmp_path):
    """Every conversation is longer than max_length: no step trains, so no model may be handed to RL as trained."""
    data = tmp_path / "sft.jsonl"
    write_sft_jsonl(data, [_conversation(colour_picture("red", np.random.default_rng(0)), "red")])
    config = load_config("sft")
    config.update(dict(checkpoint=tiny_folder, data=str(data), workdir=str(tmp_path / "run"), steps=1, batch_size=1,
                       micro_batch_size=1, max_length=8, tensorboard=False))
    with pytest.raises(DataFileError, match=r"^no step trained a token: every conversation of .*sft.jsonl was "
                                            r"skipped \(1 at batching.*longer than max_length 8"):
        sft_run.run(config)
    assert not os.path.exists(tmp_path / "run" / "hf_checkpoint")


def test_micro_batches_round_to_the_rows_each_process_splits(tiny):
    """micro_batch_size counts a process's rows, rounded up to its batch devices as the RL update does: with 2
    processes x 2 devices, 1 row per micro-batch could not be split and the first step failed (DistributedError)."""
    from axpo_jax.parallel.distributed import DataShard
    from axpo_jax.train.sft_run import agreed_micro_batches

    model, processor = tiny
    example = sft_example(_conversation(colour_picture("red", np.random.default_rng(0)), "red"), processor, None)
    batches = agreed_micro_batches([example] * 3, model.config, 0, 1, shard=DataShard(0, 2, positions=2))
    assert [b.loss_mask_bt.shape[0] for b in batches] == [2, 2]
    trained = [bool(row.any()) for b in batches for row in b.loss_mask_bt]
    assert trained == [True, True, True, False]  # the rounding adds untrained copies only
