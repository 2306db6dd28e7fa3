"""The multi-turn agent loop: think, call tools, read their observations, answer (AXPO.md §1).

For a batch of tasks x N samples, one KV-cache row per trajectory: prefill the chat-templated prompts, decode
until every row stops (`</tool_call>`, `<|im_end|>`, `</answer>` or the per-turn token limit), parse and execute
the rows' tool calls on the host, append each row's observation (text and new images, rendered by the chat
template) to its cache with `extend`, and decode again, up to `max_turns` policy turns. The output per trajectory
is everything training needs: tokens, a policy mask (1 on tokens the policy wrote), the sampler's log-probs, the
conversation's images, per-turn records, the extracted answer, and for AXPO the end of the first `<tool_call>`
tag and the policy's confidence on its tool-call tokens.
"""

from __future__ import annotations

import dataclasses
import string
import sys
import time
import uuid

import jax
import numpy as np
from PIL import Image

from axpo_jax.models.qwen3_vl.model import KVCache
from axpo_jax.parallel import distributed
from axpo_jax.rollout.sampler import ImageBuckets, Sampler, SamplingParams, gather_cache_rows
from axpo_jax.tools.base import Observation, ToolContext
from axpo_jax.tools.executor import ToolExecutor, ToolRequest
from axpo_jax.tools.protocol import extract_answer, observation_messages, parse_tool_calls, plain_text

TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"
END_OF_TURN = "<|im_end|>"
ANSWER_CLOSE = "</answer>"
# What an answer's closing tag may follow: nothing, a space, a line break, any ASCII punctuation (a byte-level BPE's
# pre-tokenizer keeps a run of punctuation together, "}</" or "%</", and merges may join it), a boxed brace twice
ANSWER_CLOSE_AFTER = ("", " ", "\n", *string.punctuation, "}}")


def stop_sequences_for(tokenizer, text: str, after=ANSWER_CLOSE_AFTER) -> list[list[int]]:
    """Every token sequence that ends `text` as the tokenizer writes it after each string in `after`.

    A byte-level BPE may merge the tag's first characters with what precedes them ("}</" as one token after
    `\boxed{...}`), so `text` encoded alone is not how a policy writes it there and a stop on that alone would
    never fire: the row would run on to the end of its turn. Each sequence is the fewest last tokens whose
    text ends with `text`, so it may start with a piece of the preceding string."""
    sequences = []
    for prefix in after:
        ids = tokenizer.encode(prefix + text, add_special_tokens=False)
        for count in range(1, len(ids) + 1):
            if tokenizer.decode(ids[-count:]).endswith(text):
                if ids[-count:] not in sequences:
                    sequences.append(ids[-count:])
                break
    return sequences


@dataclasses.dataclass
class Task:
    question: str
    images: list[Image.Image]
    answer: str = ""
    task_id: str = ""


TRUNCATED_FINISH_REASONS = ("turn_limit", "length", "prompt_too_long")


@dataclasses.dataclass
class TurnRecord:
    text: str  # what the policy wrote this turn
    num_tokens: int
    calls: int = 0
    statuses: list[str] = dataclasses.field(default_factory=list)  # one per call: "ok" or a failure category


@dataclasses.dataclass
class Trajectory:
    task_index: int
    sample_index: int
    token_ids: list[int]
    policy_mask: list[int]  # 1 on tokens the policy sampled (trained), 0 on prompt and observation tokens
    logprobs: list[float]  # the sampler's log-prob of each policy token, 0 elsewhere
    prompt_length: int
    images: list[Image.Image]  # the conversation's images in order: prompt images, then crops and figures
    num_prompt_images: int = 0
    turns: list[TurnRecord] = dataclasses.field(default_factory=list)
    answer: str | None = None
    finish_reason: str = ""  # "answer" | "no_answer" | "turn_limit" | "length" | "prompt_too_long" | "bad_observation"
    prefix_end: int | None = None  # index into token_ids just past the first call's <tool_call> token (None: no
    # prefix to branch from: no call, or a first call whose tag the policy spelled in pieces; `_branch_point`)
    tool_call_logprobs: list[float] = dataclasses.field(default_factory=list)  # of every tool-call span token
    resampled_from: int | None = None  # for an AXPO continuation: the row of the trajectory it was forked from

    @property
    def used_tool(self) -> bool:
        return any(turn.calls for turn in self.turns)

    @property
    def truncated(self) -> bool:
        """Cut off by a limit before it could answer: the turn limit, the token limit of a turn or of the cache, or
        a prompt too long for the cache (the rows a GRPO config's `truncation="exclude"` leaves out). A rollout that
        stopped without an answer of its own accord ("no_answer") was not cut off."""
        return self.finish_reason in TRUNCATED_FINISH_REASONS

    @property
    def tool_call_confidence(self) -> float:
        """Mean probability of the sampled tool-call tokens (AXPO's ranking score); NaN without a call."""
        return float(np.mean(np.exp(self.tool_call_logprobs))) if self.tool_call_logprobs else float("nan")


def prompt_messages(task: Task, system_prompt: str | None = None) -> list[dict]:
    """The first turn of a rollout (and of an SFT conversation): the task's images, then its question."""
    content = [{"type": "image", "image": image} for image in task.images]
    content.append({"type": "text", "text": task.question})
    messages = [{"role": "user", "content": content}]
    if system_prompt:
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


class AgentLoop:
    """Runs batches of multi-turn, tool-using rollouts for one policy, processor and tool set."""

    def __init__(self, model, processor, executor: ToolExecutor, *, max_turns: int = 3,
                 max_new_tokens_per_turn: int = 256, capacity: int = 2048, system_prompt: str | None = None,
                 tool_timeout_s: float = 12.0, pipeline_groups: int = 1, decode_segment_tokens: int = 64,
                 sticky_image_buckets: bool = True, mesh=None, log=None):
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.executor = executor
        self.tool_schemas = executor.registry.schemas()
        self.max_turns = max_turns
        self.max_new_tokens_per_turn = max_new_tokens_per_turn
        self.capacity = capacity
        self.system_prompt = system_prompt
        self.tool_timeout_s = tool_timeout_s
        if pipeline_groups < 1:
            raise ValueError(f"pipeline_groups must be >= 1, got {pipeline_groups}")
        # Rows split into groups that take turns on the device: while one group's tools run on the host, the next
        # group decodes. 1 is synchronous. On an accelerator decode is memory-bound, so a half batch costs almost
        # a whole one: 2 groups pay off when a turn's tool time is at least a decode turn's device time.
        self.pipeline_groups = pipeline_groups
        self.decode_segment_tokens = decode_segment_tokens  # Sampler.min_decode_segment
        # one image shape floor for prompts and one for observations, shared by every sampler of this loop (the
        # fork sampler's observations then reuse the shapes the rollout's compiled): see ImageBuckets
        self.prompt_images = ImageBuckets(sticky=sticky_image_buckets)
        self.observation_images = ImageBuckets(sticky=sticky_image_buckets)
        self.mesh = mesh
        self.log = log or (lambda message: print(f"[rollout] {message}", file=sys.stderr, flush=True))
        vocab = self.tokenizer.get_vocab()
        missing = [t for t in (TOOL_CALL_OPEN, TOOL_CALL_CLOSE, END_OF_TURN) if t not in vocab]
        if missing:
            raise ValueError(f"the tokenizer lacks the Qwen3-VL tokens {missing}")
        self.tool_call_open_id = vocab[TOOL_CALL_OPEN]
        self.tool_call_close_id = vocab[TOOL_CALL_CLOSE]
        self.end_of_turn_id = vocab[END_OF_TURN]
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self._answer_close_sequences = stop_sequences_for(self.tokenizer, ANSWER_CLOSE)
        self._special_tokens = list(self.tokenizer.get_added_vocab())  # tool output may not spell them (plain_text)
        self._samplers: dict[int, Sampler] = {}
        self.tool_wait_s = 0.0  # seconds the rollouts waited for tool calls (`_run_groups`); a trainer resets it

    def _image_floors(self) -> dict[str, ImageBuckets]:
        return {"prompt": self.prompt_images, "observation": self.observation_images}

    def image_bucket_state(self) -> dict:
        """The sticky image floors, for checkpoints: a resumed run pads its chunks as the uninterrupted one did."""
        return {name: [floor.num_image_rows, floor.patches_per_image] for name, floor in self._image_floors().items()}

    def load_image_bucket_state(self, state: dict) -> None:
        for name, floor in self._image_floors().items():
            floor.num_image_rows, floor.patches_per_image = (int(v) for v in state[name])

    def sampler(self, batch_size: int) -> Sampler:
        if batch_size not in self._samplers:
            self._samplers[batch_size] = Sampler(
                self.model, batch_size=batch_size, capacity=self.capacity, pad_id=self.pad_id, mesh=self.mesh,
                stop_token_ids=[self.tool_call_close_id, self.end_of_turn_id],
                stop_sequences=self._answer_close_sequences, min_decode_segment=self.decode_segment_tokens,
                prompt_images=self.prompt_images, observation_images=self.observation_images,
            )
        return self._samplers[batch_size]

    # --------------------------------------------------------------------------------------------- messages
    def prompt_messages(self, task: Task) -> list[dict]:
        return prompt_messages(task, self.system_prompt)

    def observation_text(self, observations: list[Observation], turn_ended: bool) -> str:
        """The template's rendering of tool responses after an assistant turn, through the next generation prompt.

        Rendered from the chat template itself (around a placeholder assistant turn), so a checkpoint's own
        template decides the layout. If the policy already closed its turn with <|im_end|>, that is not repeated.
        The tools' text goes in as plain text: a special token spelled in it is broken up (`plain_text`).
        """
        marker = "\x00AXPO_TURN\x00"
        observations = [dataclasses.replace(o, text=plain_text(o.text, self._special_tokens)) for o in observations]
        messages = [{"role": "user", "content": [{"type": "text", "text": "q"}]},
                    {"role": "assistant", "content": marker}] + observation_messages(observations)
        rendered = self.processor.apply_chat_template(messages, tools=self.tool_schemas, tokenize=False,
                                                      add_generation_prompt=True)
        suffix = rendered[rendered.index(marker) + len(marker):]
        if turn_ended and suffix.startswith(END_OF_TURN):
            suffix = suffix[len(END_OF_TURN):]
        return suffix

    # ------------------------------------------------------------------------------------------------ rollout
    def run(self, tasks: list[Task], num_samples: int, rng, params: SamplingParams) -> "Rollout":
        """num_samples trajectories per task, decoded together (in `pipeline_groups` groups); the Rollout keeps
        their KV caches so AXPO can fork prefixes from them (`resample`)."""
        rows = [(t, s) for t in range(len(tasks)) for s in range(num_samples)]
        trajectories, loops, caches, next_positions = [], [], [], []
        run_id = uuid.uuid4().hex[:8]
        groups = self._row_groups(len(rows))
        for group, key in zip(groups, self._group_keys(rng, len(groups))):
            sampler = self.sampler(len(group))
            prompt, too_long = self._prompts([tasks[rows[r][0]] for r in group])
            group_trajectories = []
            for b, r in enumerate(group):
                t, s = rows[r]
                if too_long[b]:
                    # a stub with nothing to train: reward 0, no tool use, counted by its finish reason
                    group_trajectories.append(Trajectory(t, s, [self.pad_id], [0], [0.0], 1, [],
                                                         finish_reason="prompt_too_long"))
                    continue
                ids = prompt["input_ids"][b][prompt["attention_mask"][b] > 0].tolist()
                group_trajectories.append(Trajectory(t, s, ids, [0] * len(ids), [0.0] * len(ids), len(ids),
                                                     list(tasks[t].images), num_prompt_images=len(tasks[t].images)))
            logits, cache = sampler.extend(prompt)
            next_positions.append(sampler.rows(cache.next_position_b))
            trajectories += group_trajectories
            loops.append(self._turn_loop(sampler, group_trajectories, logits, cache, key, params,
                                         [len(t.token_ids) for t in group_trajectories], f"{run_id}-{group[0]}",
                                         ~too_long))
        caches = self._run_groups(loops)
        return Rollout(trajectories, caches, np.concatenate(next_positions))

    def _prompts(self, tasks: list[Task]) -> tuple[dict, np.ndarray]:
        """The chat template's prompt batch for `tasks`, and which rows' prompts do not fit the KV cache with room
        for one sampled token (a question with large images, say). Such rows hold a text-only placeholder whose
        tokens are masked out: they start finished and the others roll out as usual."""
        def render(batch_tasks):
            return self.processor.apply_chat_template(
                [self.prompt_messages(task) for task in batch_tasks], tools=self.tool_schemas,
                add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="np",
                processor_kwargs={"padding": True},
            )

        prompt = render(tasks)
        too_long = np.asarray(prompt["attention_mask"]).sum(axis=1) + 1 > self.capacity
        if too_long.any():
            self.log(f"{int(too_long.sum())} of {len(tasks)} prompts do not fit the {self.capacity}-token cache: "
                     "those rows are skipped (finish_reason 'prompt_too_long')")
            prompt = render([Task("", []) if long else task for task, long in zip(tasks, too_long)])
            prompt["attention_mask"] = np.where(too_long[:, None], 0, prompt["attention_mask"])
        return prompt, too_long

    def resample(self, rollout: "Rollout", sources: list[int], k: int, rng, params: SamplingParams):
        """K continuations of each source trajectory's prefix, forked from its KV cache (AXPO.md §4.2, §4.5).

        The prefix is the prompt plus the policy's first turn up to and including its first `<tool_call>` tag,
        so every continuation starts inside a tool call. The first tool call is always in the first turn (a
        turn without one ends the rollout), so the prefix slots are untouched in the source's cache: each copy
        is rewound to just before the tag and the tag is fed again, which yields the logits after it without
        recomputing the prefix.

        A `None` source is padding (multi-host: every process forks the same number of rows): its K rows take part
        in the device work but start finished, and are not returned.
        """
        is_padding = np.repeat([s is None for s in sources], k)
        rows = np.repeat(np.asarray([0 if s is None else s for s in sources], np.int32), k)
        for source in sources:
            if source is not None and rollout.trajectories[source].prefix_end is None:
                raise ValueError(f"trajectory {source} made no tool call: it has no prefix to resample from")
        trajectories, loops = [], []
        run_id = uuid.uuid4().hex[:8]
        groups = self._row_groups(len(rows))
        for group, key in zip(groups, self._group_keys(rng, len(groups))):
            group_rows = rows[group]
            sampler = self.sampler(len(group_rows))
            cache = rollout.cache_rows(group_rows)
            prompt_length = np.array([rollout.trajectories[r].prompt_length for r in group_rows])
            prefix_end = np.array([rollout.trajectories[r].prefix_end or rollout.trajectories[r].prompt_length
                                   for r in group_rows])  # (a padding row's source may have no prefix)
            rewound_length = prefix_end - 1  # every slot before the <tool_call> tag
            cache = cache.replace(
                length_b=sampler.device_rows(rewound_length, np.int32),
                next_position_b=sampler.device_rows(
                    rollout.prompt_next_position[group_rows] + rewound_length - prompt_length, np.int32),
            )
            tag = sampler.device_rows(np.full((len(group_rows),), self.tool_call_open_id), np.int32)
            logits, cache = _decode_step(self.model, tag, cache)
            group_trajectories = []
            for r in group_rows:
                source = rollout.trajectories[r]
                end = source.prefix_end
                group_trajectories.append(Trajectory(
                    source.task_index, source.sample_index, source.token_ids[:end], source.policy_mask[:end],
                    source.logprobs[:end], source.prompt_length, source.images[: source.num_prompt_images],
                    num_prompt_images=source.num_prompt_images, prefix_end=end, resampled_from=int(r),
                ))
            trajectories += group_trajectories
            loops.append(self._turn_loop(sampler, group_trajectories, logits, cache, key, params,
                                         list(prompt_length), f"{run_id}-{group[0]}", ~is_padding[group]))
        self._run_groups(loops)
        return [t for t, padding in zip(trajectories, is_padding) if not padding]

    # ------------------------------------------------------------------------------------------- pipelining
    def _row_groups(self, num_rows: int) -> list[np.ndarray]:
        """Consecutive row groups of equal size (so they share one compiled sampler); one group when the rows
        do not split evenly."""
        groups = self.pipeline_groups if num_rows % self.pipeline_groups == 0 else 1
        return np.split(np.arange(num_rows), groups)

    @staticmethod
    def _group_keys(rng, num_groups: int):
        return [rng] if num_groups == 1 else list(jax.random.split(rng, num_groups))

    def _run_groups(self, turn_loops: list) -> list:
        """Drives the groups' turn loops round-robin. Each runs on the device until its tool calls are
        submitted; the next group then decodes while those tools run. Returns each loop's final cache. The time
        spent waiting for tools, the tool time no device work hid, adds up in `tool_wait_s`."""
        pending, caches = [None] * len(turn_loops), [None] * len(turn_loops)
        running = list(range(len(turn_loops)))
        while running:
            for i in list(running):
                try:
                    outcomes = None
                    if pending[i] is not None:
                        waited = time.perf_counter()
                        outcomes = pending[i].result()
                        self.tool_wait_s += time.perf_counter() - waited
                    pending[i] = turn_loops[i].send(outcomes)
                except StopIteration as done:
                    caches[i] = done.value
                    running.remove(i)
        return caches

    def _turn_loop(self, sampler: Sampler, trajectories, logits, cache, rng, params, turn_start, session: str,
                   active=None):
        """Decode / execute tools / extend until every row is done; `turn_start[b]` is where row b's current
        (first) turn starts in its token_ids, which is before any forked prefix tokens.

        A generator (driven by `_run_groups`): it yields the Future of each turn's tool calls and is sent their
        observations back, so another row group can use the device meanwhile; it returns the final cache.
        """
        batch_size = len(trajectories)
        turn_start = list(turn_start)
        active = np.ones(batch_size, bool) if active is None else np.array(active, bool)
        for turn in range(1, self.max_turns + 1):
            # Multi-host: every process decodes and extends together, so a turn runs while any process has a row
            # left (one with none takes part with inactive rows and no tool calls).
            if not distributed.any_process(active.any()):  # every row ended (e.g. its observation did not fit)
                break
            # each row's own budget: what its turn has left (a forked row's first turn already holds its prefix)
            # and its own cache room; one row near the end of its cache must not cut the others' turns short
            written_b = np.array([len(t.token_ids) - start for t, start in zip(trajectories, turn_start)])
            budget_b = np.clip(np.minimum(self.max_new_tokens_per_turn - written_b,
                                          self.capacity - sampler.rows(cache.length_b)), 0, None)
            max_new = int(budget_b[active].max()) if active.any() else 0
            if jax.process_count() > 1:  # every process decodes the same number of steps
                max_new = int(distributed.max_across_processes(np.int64(max_new)))
            rng, key = jax.random.split(rng)
            result, logits, cache = sampler.decode(logits, cache, key, params, max_new, active_b=active,
                                                   max_new_b=np.where(active, budget_b, 0))
            requests = {}
            for b in np.nonzero(active)[0]:
                n = int(result.lengths_b[b])
                self._append(trajectories[b], result.tokens_bn[b, :n].tolist(), policy=True,
                             logprobs=result.logprobs_bn[b, :n].tolist())
                text = self._record_turn(trajectories[b], turn_start[b], bool(result.stopped_b[b]), turn)
                if text is None:
                    active[b] = False
                else:
                    requests[b] = text
            if not distributed.any_process(bool(requests)):
                break
            self.log(f"turn {turn}: {len(requests)} of {batch_size} rows called tools")
            order = sorted(requests)
            contexts = [ToolContext(trajectories[b].images, f"{session}-{b}", self.tool_timeout_s) for b in order]
            outcomes = yield self.executor.submit([ToolRequest(requests[b], c) for b, c in zip(order, contexts)])
            texts, images = {}, {}
            for b, observations in zip(order, outcomes):
                trajectory = trajectories[b]
                trajectory.turns[-1].statuses = [o.status for o in observations]
                images[b] = [image for o in observations for image in o.images]
                texts[b] = self.observation_text(observations, trajectory.token_ids[-1] == self.end_of_turn_id)
            chunk = self._observation_chunk(texts, images, batch_size, trajectories, active)
            # a row whose observation would not fit its cache (with room for one more token) ends here
            overflow = sampler.rows(cache.length_b) + chunk["attention_mask"].sum(axis=1) + 1 > self.capacity
            if overflow.any():
                for b in np.nonzero(overflow)[0]:
                    trajectories[b].finish_reason, active[b] = "length", False
                    texts.pop(b, None)
                chunk = self._chunk(texts, images, batch_size)
            # only an observation that went in brings its images: the trajectory's images are those its tokens
            # show, in order (re-scoring and training pair them up with the image tokens)
            for b in texts:
                trajectories[b].images.extend(images[b])
            logits, cache = sampler.extend(chunk, cache, logits)
            for b in np.nonzero(active)[0]:
                ids = chunk["input_ids"][b][chunk["attention_mask"][b] > 0].tolist()
                self._append(trajectories[b], ids, policy=False)
                turn_start[b] = len(trajectories[b].token_ids)
        for b in np.nonzero(active)[0]:
            trajectories[b].finish_reason = trajectories[b].finish_reason or "turn_limit"
        for b in range(batch_size):
            self.executor.registry.close_session(f"{session}-{b}")
        return cache

    def _observation_chunk(self, texts: dict[int, str], images: dict[int, list], batch_size: int, trajectories,
                           active) -> dict:
        """`_chunk` of the rows' observations, except that a row whose observation the processor refuses ends
        there (finish reason "bad_observation", the observation left out, as for one too long for the cache) and
        the other rows go on. Tool output is untrusted; an error that no single row's observation causes is not
        the tools' and is raised."""
        try:
            return self._chunk(texts, images, batch_size)
        except Exception:  # noqa: BLE001 - find the rows whose observations cause it
            refused = []
            for b in sorted(texts):
                try:
                    self._chunk({b: texts[b]}, {b: images[b]}, batch_size)
                except Exception as error:  # noqa: BLE001
                    refused.append(b)
                    self.log(f"row {b} ends: the processor refused its tool observation ({type(error).__name__}: "
                             f"{error})")
            if not refused:
                raise
        for b in refused:
            trajectories[b].finish_reason, active[b] = "bad_observation", False
            texts.pop(b)
        return self._chunk(texts, images, batch_size)

    def _chunk(self, texts: dict[int, str], images: dict[int, list], batch_size: int) -> dict:
        """Processor outputs of each row's observation text (empty for rows without one), images in row order."""
        flat_images = [image for b in sorted(texts) for image in images[b]]
        return self.processor(text=[texts.get(b, "") for b in range(batch_size)], images=flat_images or None,
                              return_tensors="np", padding=True)

    def _append(self, trajectory: Trajectory, ids: list[int], policy: bool, logprobs=None) -> None:
        trajectory.token_ids.extend(ids)
        trajectory.policy_mask.extend([int(policy)] * len(ids))
        trajectory.logprobs.extend(logprobs if logprobs is not None else [0.0] * len(ids))

    def can_continue(self, trajectory: Trajectory) -> bool:
        """Whether a fork of `trajectory` at its branch point could write a token: its first turn's budget left after
        the prefix (a forked row's first turn counts the prefix, as the source's did) and room in the cache."""
        end = trajectory.prefix_end
        return (end is not None and end - trajectory.prompt_length < self.max_new_tokens_per_turn
                and end < self.capacity)

    def _branch_point(self, first_turn_ids: list[int], turn_start: int) -> int | None:
        """AXPO's prefix end (AXPO.md §4.2): the index just past the `<tool_call>` token that opens the first tool
        call, or None when the rollout has no prefix to branch from. The first call is always in the first turn (a
        turn without one ends the rollout). The tools run every call the turn's text holds, and a policy can spell
        the tag as ordinary pieces (`<`, `tool`, `_call>`) that decode to the same text; a first call opened that way
        has no tag token to rewind to, so the rollout still counts as tool-using but is no resample source."""
        if self.tool_call_open_id not in first_turn_ids:
            return None
        i = first_turn_ids.index(self.tool_call_open_id)
        if TOOL_CALL_OPEN in self.tokenizer.decode(first_turn_ids[:i], skip_special_tokens=False):
            return None
        return turn_start + i + 1

    def _record_turn(self, trajectory: Trajectory, turn_start: int, stopped: bool, turn: int) -> str | None:
        """Records the turn that runs from turn_start to the end of the row's tokens; returns its text if its
        tool calls should run, None if the row is done."""
        ids = trajectory.token_ids[turn_start:]
        text = self.tokenizer.decode(ids, skip_special_tokens=False)
        record = TurnRecord(text, len(ids))
        trajectory.turns.append(record)
        inside = False
        trajectory.tool_call_logprobs = [] if turn == 1 else trajectory.tool_call_logprobs
        if turn == 1 and trajectory.prefix_end is None:
            trajectory.prefix_end = self._branch_point(ids, turn_start)
        for i, token in enumerate(ids):  # tool-call spans, tags included, for the confidence score
            if token == self.tool_call_open_id:
                inside = True
            if inside:
                trajectory.tool_call_logprobs.append(trajectory.logprobs[turn_start + i])
            if token == self.tool_call_close_id:
                inside = False
        record.calls = len(parse_tool_calls(text))
        answer = extract_answer(text)
        if answer is not None:
            trajectory.answer, trajectory.finish_reason = answer, "answer"
            return None
        if not stopped:
            trajectory.finish_reason = "length"
            return None
        if record.calls == 0:
            trajectory.finish_reason = "no_answer"
            return None
        if turn == self.max_turns:
            trajectory.finish_reason = "turn_limit"
            return None
        return text


@dataclasses.dataclass
class Rollout:
    trajectories: list[Trajectory]
    caches: list  # each row group's KVCache after its last turn; prefix slots are never overwritten
    prompt_next_position: np.ndarray  # rope position after each row's prompt

    def cache_rows(self, rows) -> KVCache:
        """A cache whose row i is a copy of trajectory rows[i]'s row (rows index the whole rollout)."""
        return gather_cache_rows(self.caches, rows)


@jax.jit  # the model as a pytree, as in the sampler: nnx.jit's graph mode walks the module graph per call
def _decode_step(model, token_b, cache):
    return model.decode_step(token_b, cache)


def encode_trajectories(trajectories: list[Trajectory], processor, pad_id: int = 0, length: int | None = None):
    """Processor-shaped arrays of whole trajectories (right-padded), for re-scoring them in one forward.

    Images go through the checkpoint's image processor again, in conversation order, which gives exactly the
    patches the sampler saw (the processing is deterministic).
    """
    length = length or max(len(t.token_ids) for t in trajectories)
    ids = np.full((len(trajectories), length), pad_id, np.int64)
    mask = np.zeros_like(ids)
    for b, trajectory in enumerate(trajectories):
        ids[b, : len(trajectory.token_ids)] = trajectory.token_ids
        mask[b, : len(trajectory.token_ids)] = 1
    batch = {"input_ids": ids, "attention_mask": mask}
    pixel_values, grids = trajectory_images(trajectories, processor)
    if pixel_values is not None:
        batch["pixel_values"], batch["image_grid_thw"] = pixel_values, grids
    return batch


def trajectory_images(trajectories: list[Trajectory], processor):
    """(pixel_values, image_grid_thw) of all the trajectories' images in order, or (None, None) without any."""
    images = [image for trajectory in trajectories for image in trajectory.images]
    if not images:
        return None, None
    vision = processor.image_processor(images=images, return_tensors="np")
    return vision["pixel_values"], vision["image_grid_thw"]
