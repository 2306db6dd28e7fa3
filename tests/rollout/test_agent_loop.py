"""The agent loop on a tiny real checkpoint with a scripted policy: tool turns, failures, limits, and a check that
the extended KV cache saw exactly what a full forward of the finished trajectory sees."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from axpo_jax.bench.sampler import with_scripts
from axpo_jax.data.processor import load_processor
from axpo_jax.demo import build_tiny_checkpoint
from axpo_jax.models import qwen3_vl
from axpo_jax.rollout.agent_loop import AgentLoop, Task, encode_trajectories
from axpo_jax.rollout.sampler import DecodeResult, Sampler, SamplingParams
from axpo_jax.tools.base import Observation
from axpo_jax.tools.executor import ToolExecutor
from axpo_jax.tools.registry import build_registry

ZOOM = '<tool_call>\n{"name": "image_zoom_in", "arguments": {"bbox_2d": [0, 0, 500, 500], "label": "corner"}}\n</tool_call>'
SCRIPTS = [
    ["<think>\nlook closer\n</think>\n" + ZOOM, "<think>\nseven\n</think>\n<answer>\\boxed{7}</answer>"],
    ["<answer>\\boxed{3}</answer>"],
    ["<tool_call>\n{bad json}\n</tool_call>", '<tool_call>\n{"name": "nope", "arguments": {}}\n</tool_call>', ZOOM],
    ["I don't know<|im_end|>"],
]


class ScriptedSampler(Sampler):
    """Writes scripted turns instead of sampling, through the real cache, scoring each token with the model."""

    scripts: list[list[list[int]]]

    def decode(self, logits_bv, cache, rng, params, max_new_tokens, active_b=None, max_new_b=None):
        limits = [max_new_tokens if max_new_b is None else int(max_new_b[b]) for b in range(self.batch_size)]
        written = [script.pop(0) if active_b[b] and script else [] for b, script in enumerate(self.scripts)]
        turns = [turn[:limit] for turn, limit in zip(written, limits)]  # a turn past its row's budget is cut
        width = max(len(t) for t in turns)
        tokens = np.full((self.batch_size, max_new_tokens), self.pad_id, np.int32)
        logprobs = np.zeros((self.batch_size, max_new_tokens), np.float32)
        for step in range(width):
            running = np.array([step < len(t) for t in turns])
            token = np.array([t[step] if step < len(t) else self.pad_id for t in turns], np.int32)
            logp = np.asarray(jax.nn.log_softmax(logits_bv, axis=-1))[np.arange(self.batch_size), token]
            tokens[running, step], logprobs[running, step] = token[running], logp[running]
            logits_bv, cache = _step(self.model, jnp.asarray(token), cache, jnp.asarray(running))
        lengths = np.array([len(t) for t in turns], np.int32)
        stopped = np.array([0 < len(t) == len(w) for t, w in zip(turns, written)])  # whole: it ends in a stop
        return DecodeResult(tokens, logprobs, lengths, stopped), logits_bv, cache


@nnx.jit
def _step(model, token, cache, running):
    return model.decode_step(token, cache, running)


@pytest.fixture(scope="module")
def loop(tmp_path_factory):
    folder = tmp_path_factory.mktemp("agent_ckpt")
    build_tiny_checkpoint(str(folder), seed=0)
    processor = load_processor(folder)
    model = qwen3_vl.from_pretrained(folder)
    executor = ToolExecutor(build_registry(["image_zoom_in"]), timeout_s=5.0)
    agent = AgentLoop(model, processor, executor, max_turns=3, max_new_tokens_per_turn=64, capacity=1024,
                      log=lambda m: None)
    scripted = ScriptedSampler(model, batch_size=4, capacity=1024, pad_id=agent.pad_id)
    scripted.scripts = [[processor.tokenizer.encode(t, add_special_tokens=False) for t in s] for s in SCRIPTS]
    agent._samplers[4] = scripted
    return agent


def test_scripted_rollout(loop):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    tasks = [Task("Which digit?", [image], "7"), Task("Which digit?", [image], "3")]
    rollout = loop.run(tasks, num_samples=2, rng=jax.random.key(0), params=SamplingParams())
    trajectories = rollout.trajectories
    zoomed, plain, failing, silent = trajectories

    assert [t.finish_reason for t in trajectories] == ["answer", "answer", "turn_limit", "no_answer"]
    assert (zoomed.answer, plain.answer) == ("7", "3")
    assert [turn.statuses for turn in zoomed.turns] == [["ok"], []]
    assert [turn.statuses for turn in failing.turns] == [["bad_json"], ["unknown_tool"], []]
    assert zoomed.used_tool and failing.used_tool and not plain.used_tool and not silent.used_tool
    assert len(zoomed.images) == 2 and zoomed.images[1].size[0] >= 28  # the crop joined the conversation
    # the AXPO prefix ends just past the first <tool_call> token, which the policy wrote
    tool_call_id = loop.tool_call_open_id
    assert zoomed.token_ids[zoomed.prefix_end - 1] == tool_call_id and zoomed.policy_mask[zoomed.prefix_end - 1]
    assert plain.prefix_end is None and np.isnan(plain.tool_call_confidence)
    assert 0 < zoomed.tool_call_confidence < 1
    # policy tokens are exactly the scripted turns; the observation sits between them, unmasked for training
    tokenizer = loop.tokenizer
    policy_text = tokenizer.decode([t for t, m in zip(zoomed.token_ids, zoomed.policy_mask) if m])
    assert policy_text == "".join(SCRIPTS[0])
    observation = tokenizer.decode([t for t, m in zip(zoomed.token_ids[zoomed.prompt_length:],
                                                        zoomed.policy_mask[zoomed.prompt_length:]) if not m])
    assert observation.startswith("<|im_end|>\n<|im_start|>user\n<tool_response>\n<|vision_start|>")
    assert observation.endswith("</tool_response><|im_end|>\n<|im_start|>assistant\n<think>\n")

    # what the cache saw = what a full forward of the finished trajectories sees: the sampler's log-probs of the
    # policy tokens equal the re-scored ones (positions, observation images and masks all line up)
    rescored = _rescored_logprobs(loop, trajectories)
    for b, trajectory in enumerate(trajectories):
        mask = np.asarray(trajectory.policy_mask, bool)
        sampled = np.asarray(trajectory.logprobs)[mask]
        # the log-prob of token t+1 sits at position t of the re-scored array
        again = rescored[b, : len(mask) - 1][mask[1:]]
        np.testing.assert_allclose(again, sampled, atol=1e-4)


def _rescored_logprobs(loop, trajectories):
    model = loop.model
    batch = encode_trajectories(trajectories, loop.processor, pad_id=loop.pad_id)
    inputs = jax.tree.map(jnp.asarray, qwen3_vl.prepare_inputs(model.config, **batch))
    targets = jnp.asarray(np.roll(batch["input_ids"], -1, axis=1), jnp.int32)
    return np.asarray(_token_logprobs(model, inputs, targets))


@jax.jit  # one program per batch shape; run eagerly, every op of the forward would compile on its own
def _token_logprobs(model, inputs, targets):
    return model.token_logprobs(inputs, targets)


def test_resample_forks_the_prefix_from_the_cache(loop):
    """AXPO continuations: forked from the source's cache at its first <tool_call>, no prefix recompute; what
    they sample is exactly what a full forward of prefix + continuation predicts."""
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    for b, script in enumerate(SCRIPTS):
        loop._samplers[4].scripts[b] = [loop.tokenizer.encode(t, add_special_tokens=False) for t in script]
    rollout = loop.run([Task("Which digit?", [image], "7")] * 2, num_samples=2, rng=jax.random.key(0),
                       params=SamplingParams())
    source = rollout.trajectories[0]
    # 6 rows: a real sampler (the scripted one serves the 4-row rollout batch only)
    continuations = loop.resample(rollout, [0, 2], k=3, rng=jax.random.key(5), params=SamplingParams())
    assert [c.resampled_from for c in continuations] == [0, 0, 0, 2, 2, 2]
    # every sampler of the loop pads observation images to the loop's one sticky floor (prompts have their own)
    assert loop.sampler(6).observation_images is loop.observation_images is loop.sampler(2).observation_images
    assert loop.sampler(6).prompt_images is loop.prompt_images is not loop.observation_images
    for c in continuations[:3]:
        assert c.token_ids[: source.prefix_end] == source.token_ids[: source.prefix_end]
        assert c.prefix_end == source.prefix_end and c.images[0] is source.images[0] and len(c.turns) >= 1
        assert c.turns[0].text.startswith("<think>\nlook closer\n</think>\n<tool_call>")
    # the first turn's budget counts the prefix it already holds, as a fresh rollout's turn would
    assert all(c.turns[0].num_tokens <= loop.max_new_tokens_per_turn for c in continuations)
    assert continuations[0].token_ids != continuations[1].token_ids  # two independent samples
    rescored = _rescored_logprobs(loop, continuations)
    for b, trajectory in enumerate(continuations):
        mask = np.asarray(trajectory.policy_mask, bool)
        mask[: trajectory.prefix_end] = False  # the continuation alone was sampled here
        sampled = np.asarray(trajectory.logprobs)[mask]
        assert sampled.size > 0
        np.testing.assert_allclose(rescored[b, : len(mask) - 1][mask[1:]], sampled, atol=1e-4)


def test_an_observation_that_does_not_fit_ends_the_row_without_its_images(loop):
    """A zoom whose observation would overflow the cache ends its row ("length"); the crop, which no token of the
    trajectory shows, is not among its images, so re-scoring pairs every image with its tokens (an RL step of
    the demo once failed here: the orphan crop shifted every later row's images)."""
    image = Image.fromarray(np.random.default_rng(2).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    tasks = [Task("Which digit?", [image], "7")]
    scripts = [SCRIPTS[0], SCRIPTS[1]]

    def rollout(capacity: int):
        small = AgentLoop(loop.model, loop.processor, loop.executor, max_turns=3, max_new_tokens_per_turn=64,
                          capacity=capacity, log=lambda m: None)
        small._samplers[2] = ScriptedSampler(loop.model, batch_size=2, capacity=capacity, pad_id=loop.pad_id)
        small._samplers[2].scripts = [[loop.tokenizer.encode(t, add_special_tokens=False) for t in s]
                                      for s in scripts]
        return small.run(tasks, num_samples=2, rng=jax.random.key(0), params=SamplingParams()).trajectories

    roomy = rollout(1024)[0]
    assert roomy.finish_reason == "answer" and len(roomy.images) == 2
    # room for the prompt and the first turn, not for the observation after it
    first_turn_end = roomy.prompt_length + len(loop.tokenizer.encode(SCRIPTS[0][0], add_special_tokens=False))
    trajectories = rollout(first_turn_end + 4)
    zoomed, plain = trajectories
    assert zoomed.finish_reason == "length" and [t.statuses for t in zoomed.turns] == [["ok"]]
    assert len(zoomed.token_ids) == first_turn_end and len(zoomed.images) == 1  # the prompt's image only
    assert plain.finish_reason == "answer"
    rescored = _rescored_logprobs(loop, trajectories)  # raised InputError when the crop stayed in the images
    for b, trajectory in enumerate(trajectories):
        mask = np.asarray(trajectory.policy_mask, bool)
        np.testing.assert_allclose(rescored[b, : len(mask) - 1][mask[1:]], np.asarray(trajectory.logprobs)[mask],
                                   atol=1e-4)


def _scripted_loop(loop, scripts: list[list[list[int]]], executor=None, capacity: int = 1024) -> AgentLoop:
    """An agent of 2 rows over the module's model that writes the given turns (token ids)."""
    agent = AgentLoop(loop.model, loop.processor, executor or loop.executor, max_turns=3, max_new_tokens_per_turn=128,
                      capacity=capacity, log=lambda m: None)
    agent._samplers[2] = ScriptedSampler(loop.model, batch_size=2, capacity=capacity, pad_id=loop.pad_id)
    agent._samplers[2].scripts = scripts
    return agent


def test_special_tokens_spelled_in_pieces(loop):
    """A policy can write `<tool_call>` or `<|image_pad|>` as ordinary pieces that decode to the same text. The
    tools run the call (as vLLM's or qwen-agent's parsers would), its label comes back in the observation as plain
    text (taken as it was, `<|image_pad|>` made the processor count one image too many and failed the step), and a
    first call opened by pieces gives no AXPO prefix: there is no tag token to branch at (selecting it failed the
    step too)."""
    encode = lambda text: loop.tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    pieces = lambda token: encode(token[0]) + encode(token[1:])  # noqa: E731
    assert loop.tool_call_open_id not in pieces("<tool_call>")
    call = lambda open_ids: (encode("<think>\nzoom\n</think>\n") + open_ids  # noqa: E731
                             + encode('\n{"name": "image_zoom_in", "arguments": '
                                      '{"bbox_2d": [0, 0, 500, 500], "label": "')
                             + pieces("<|image_pad|>") + pieces("<|im_end|>") + encode('"}}\n')
                             + [loop.tool_call_close_id])
    answer = encode("<answer>\\boxed{7}</answer>")
    agent = _scripted_loop(loop, [[call(pieces("<tool_call>")), answer], [call([loop.tool_call_open_id]), answer]])
    image = Image.fromarray(np.random.default_rng(3).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    trajectories = agent.run([Task("Which digit?", [image], "7")], num_samples=2, rng=jax.random.key(0),
                             params=SamplingParams()).trajectories
    for trajectory in trajectories:
        assert trajectory.finish_reason == "answer" and [t.statuses for t in trajectory.turns] == [["ok"], []]
        assert len(trajectory.images) == 2
        observation = loop.tokenizer.decode([t for t, m in zip(trajectory.token_ids[trajectory.prompt_length:],
                                                               trajectory.policy_mask[trajectory.prompt_length:])
                                             if not m])
        assert "Zoomed in on <\u200b|image_pad|><\u200b|im_end|>" in observation
    pieced, tagged = trajectories
    assert pieced.used_tool and pieced.prefix_end is None
    assert tagged.token_ids[tagged.prefix_end - 1] == loop.tool_call_open_id
    rescored = _rescored_logprobs(loop, trajectories)  # every image token pairs with an image
    for b, trajectory in enumerate(trajectories):
        mask = np.asarray(trajectory.policy_mask, bool)
        np.testing.assert_allclose(rescored[b, : len(mask) - 1][mask[1:]], np.asarray(trajectory.logprobs)[mask],
                                   atol=1e-4)


def test_each_row_decodes_to_its_own_cache_room(loop):
    """A row near the end of its cache stops there ("length"); a row with room writes its whole turn. (The turn's
    budget was the fullest row's room for every row: an answer with room to spare was cut, scored 0.)"""
    encode = lambda text: loop.tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    answer = encode("<answer>\\boxed{7}</answer>")
    scripts = lambda: [[encode("<think>\n" + "look " * 12 + "</think>\n" + ZOOM), answer],  # noqa: E731
                       [encode(ZOOM), answer]]
    image = Image.fromarray(np.random.default_rng(5).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    tasks = [Task("Which digit?", [image], "7")]
    roomy = _scripted_loop(loop, scripts()).run(tasks, num_samples=2, rng=jax.random.key(0),
                                                params=SamplingParams()).trajectories
    assert [t.finish_reason for t in roomy] == ["answer", "answer"]
    before_answer = [len(t.token_ids) - len(answer) for t in roomy]
    assert before_answer[0] > before_answer[1] + len(answer)
    capacity = before_answer[0] + len(answer) // 2  # row 0 has room for half its answer, row 1 for all of it
    long_row, short_row = _scripted_loop(loop, scripts(), capacity=capacity).run(
        tasks, num_samples=2, rng=jax.random.key(0), params=SamplingParams()).trajectories
    assert long_row.finish_reason == "length" and len(long_row.token_ids) == capacity
    assert short_row.finish_reason == "answer" and short_row.token_ids == roomy[1].token_ids


class _FixedObservations:
    """An executor whose every call returns one observation: an image the processor refuses (an aspect ratio
    over 200) for a turn that names a "sliver", else a small image."""

    registry = build_registry([])

    def submit(self, requests):
        from concurrent.futures import Future

        thin, fine = Image.new("RGB", (2000, 5)), Image.new("RGB", (64, 64))
        future = Future()
        future.set_result([[Observation("here", [thin if "sliver" in r.turn_text else fine])] for r in requests])
        return future


def test_an_observation_the_processor_refuses_ends_only_its_row(loop):
    encode = lambda text: loop.tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    turns = [ZOOM.replace("corner", "sliver"), "<answer>\\boxed{7}</answer>"], SCRIPTS[0]
    agent = _scripted_loop(loop, [[encode(t) for t in s] for s in turns], executor=_FixedObservations())
    image = Image.fromarray(np.random.default_rng(4).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    refused, fine = agent.run([Task("Which digit?", [image], "7")], num_samples=2, rng=jax.random.key(0),
                              params=SamplingParams()).trajectories
    assert refused.finish_reason == "bad_observation" and len(refused.images) == 1
    assert refused.token_ids[-1] == loop.tool_call_close_id  # nothing after the turn that called the tool
    assert fine.finish_reason == "answer" and len(fine.images) == 2


def test_a_prompt_that_does_not_fit_skips_its_rows_and_the_others_roll_out(loop):
    """A question too long for the KV cache does not stop the batch: its rows end at once ("prompt_too_long", a
    one-token stub with nothing to train and no images) and the other rows roll out as with room to spare."""
    image = Image.fromarray(np.random.default_rng(3).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    # ~480 prompt tokens with the tool schemas; the long question adds ~740 more
    tasks = [Task("Which digit? " + "Look again. " * 80, [image], "7"), Task("Which digit?", [image], "3")]
    small = AgentLoop(loop.model, loop.processor, loop.executor, max_turns=3, max_new_tokens_per_turn=64,
                      capacity=1024, log=lambda m: None)
    small._samplers[2] = ScriptedSampler(loop.model, batch_size=2, capacity=1024, pad_id=loop.pad_id)
    small._samplers[2].scripts = [[loop.tokenizer.encode(t, add_special_tokens=False) for t in s]
                                  for s in (SCRIPTS[0], SCRIPTS[1])]
    skipped, answered = small.run(tasks, num_samples=1, rng=jax.random.key(0), params=SamplingParams()).trajectories
    assert skipped.finish_reason == "prompt_too_long" and skipped.answer is None and not skipped.used_tool
    assert skipped.token_ids == [loop.pad_id] and skipped.policy_mask == [0] and skipped.images == []
    assert answered.finish_reason == "answer" and answered.answer == "3" and len(answered.images) == 1
    assert small._samplers[2].scripts[0] == [loop.tokenizer.encode(t, add_special_tokens=False) for t in SCRIPTS[0]]
    rescored = _rescored_logprobs(loop, [answered, skipped])
    mask = np.asarray(answered.policy_mask, bool)
    np.testing.assert_allclose(rescored[0, : len(mask) - 1][mask[1:]], np.asarray(answered.logprobs)[mask],
                               atol=1e-4)


class GroupScriptedLoop(AgentLoop):
    """Each row group's turn loop gets the next scripts of `group_scripts` on the scripted sampler of its size."""

    group_scripts: list

    def _turn_loop(self, sampler, trajectories, *args):
        return with_scripts(super()._turn_loop(sampler, trajectories, *args), sampler, self.group_scripts.pop(0))


def test_pipelined_groups_give_the_synchronous_trajectories(loop):
    """Two row groups taking turns on the device (one decodes while the other's tools run) produce exactly the
    synchronous loop's trajectories, and AXPO forks prefixes from rows of either group's cache."""
    encode = lambda s: [loop.tokenizer.encode(t, add_special_tokens=False) for t in s]  # noqa: E731
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    tasks = [Task("Which digit?", [image], "7"), Task("Which digit?", [image], "3")]
    loop._samplers[4].scripts = [encode(s) for s in SCRIPTS]
    synchronous = loop.run(tasks, num_samples=2, rng=jax.random.key(0), params=SamplingParams()).trajectories

    pipelined_loop = GroupScriptedLoop(loop.model, loop.processor, loop.executor, max_turns=3,
                                       max_new_tokens_per_turn=64, capacity=1024, pipeline_groups=2,
                                       log=lambda m: None)
    pipelined_loop._samplers[2] = ScriptedSampler(loop.model, batch_size=2, capacity=1024, pad_id=loop.pad_id)
    pipelined_loop.group_scripts = [[encode(s) for s in SCRIPTS[:2]], [encode(s) for s in SCRIPTS[2:]]]
    rollout = pipelined_loop.run(tasks, num_samples=2, rng=jax.random.key(0), params=SamplingParams())
    assert len(rollout.caches) == 2
    for a, b in zip(synchronous, rollout.trajectories):
        assert (a.task_index, a.sample_index, a.finish_reason, a.answer) == (b.task_index, b.sample_index,
                                                                              b.finish_reason, b.answer)
        assert a.token_ids == b.token_ids and a.policy_mask == b.policy_mask and a.prefix_end == b.prefix_end
        assert [t.statuses for t in a.turns] == [t.statuses for t in b.turns]
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)

    # rows 0 and 2 live in different groups' caches; each continuation re-scores as prefix + continuation
    continuation = "\n{\"name\": \"image_zoom_in\", \"arguments\": {\"bbox_2d\": [0, 0, 9, 9]}}\n</tool_call>"
    pipelined_loop.group_scripts = [[encode([continuation, f"<answer>\\boxed{{{digit}}}</answer>"]) for _ in range(2)]
                                    for digit in (7, 1)]
    continuations = pipelined_loop.resample(rollout, [0, 2], k=2, rng=jax.random.key(5), params=SamplingParams())
    assert [c.resampled_from for c in continuations] == [0, 0, 2, 2]
    assert [c.answer for c in continuations] == ["7", "7", "1", "1"]
    rescored = _rescored_logprobs(loop, continuations)
    for b, trajectory in enumerate(continuations):
        source = rollout.trajectories[trajectory.resampled_from]
        assert trajectory.token_ids[: source.prefix_end] == source.token_ids[: source.prefix_end]
        mask = np.asarray(trajectory.policy_mask, bool)
        mask[: trajectory.prefix_end] = False
        np.testing.assert_allclose(rescored[b, : len(mask) - 1][mask[1:]], np.asarray(trajectory.logprobs)[mask],
                                   atol=1e-4)


def test_image_bucket_state_round_trips_into_every_sampler(loop):
    """What a checkpoint keeps of the sticky image floors, loaded back, is what every sampler of the loop pads to."""
    saved = loop.image_bucket_state()
    try:
        loop.load_image_bucket_state(json.loads(json.dumps({"prompt": [4, 256], "observation": [2, 128]})))
        assert loop.image_bucket_state() == {"prompt": [4, 256], "observation": [2, 128]}
        sampler = loop.sampler(6)
        assert (sampler.prompt_images.num_image_rows, sampler.prompt_images.patches_per_image) == (4, 256)
        assert (sampler.observation_images.num_image_rows, sampler.observation_images.patches_per_image) == (2, 128)
    finally:
        loop.load_image_bucket_state(saved)


class _MergingTokenizer:
    """Greedy longest-match over a few pieces, one of which ("}</") merges the boxed answer's brace with the tag,
    as a byte-level BPE may."""

    pieces = ["}</", "</", "answer", ">", "}", " ", "\n", "a", "b", "."]

    def encode(self, text, add_special_tokens=False):
        ids = []
        while text:
            piece = max((p for p in self.pieces if text.startswith(p)), key=len)
            ids.append(self.pieces.index(piece))
            text = text[len(piece):]
        return ids

    def decode(self, ids):
        return "".join(self.pieces[i] for i in ids)


def test_answer_close_stops_also_after_a_merged_brace():
    from axpo_jax.rollout.agent_loop import stop_sequences_for

    tokenizer = _MergingTokenizer()
    sequences = stop_sequences_for(tokenizer, "</answer>", after=("", "}", " ", "a"))
    merged, alone = tokenizer.encode("}</answer>"), tokenizer.encode("</answer>")
    assert merged == [0, 2, 3] and alone == [1, 2, 3]  # after the brace the tag is not its own tokens
    assert sorted(sequences) == sorted([alone, merged])  # " " and "a" end the same way as the tag alone


def test_a_prefix_that_used_its_turn_budget_is_no_fork_source():
    """A first turn cut by its budget right at the <tool_call> tag: a fork of it could write nothing (a forked
    row's first turn counts the prefix), so AXPO must not spend continuations on it."""
    from types import SimpleNamespace

    agent = SimpleNamespace(max_new_tokens_per_turn=12, capacity=600)
    def row(prefix_end, prompt_length=482):
        return SimpleNamespace(prefix_end=prefix_end, prompt_length=prompt_length)

    assert AgentLoop.can_continue(agent, row(493))  # 11 of 12 tokens used: one left
    assert not AgentLoop.can_continue(agent, row(494))  # the whole budget used at the tag
    assert not AgentLoop.can_continue(agent, row(None))  # no tool call to branch at
    assert not AgentLoop.can_continue(agent, row(600, prompt_length=590))  # the cache is full
