"""KV-cache sampling for Qwen3-VL: prefill, an on-device decode loop, extend (tool observations), fork.

The host prepares every multimodal chunk (prompts, observations with new images) with the HF processor and
`prepare_inputs`; the device keeps one KV cache row per trajectory. Shapes are bucketed (token counts, image
rows, patches per image; image shapes are sticky: `ImageBuckets`) so a steady stream of turns reuses a handful of
compiled programs; `trace_counts` records each compilation so tests and benchmarks can check that none happen in
steady state.

Multi-host: the device side runs on global arrays over the mesh (every process's rows); everything a caller
passes in or gets back is this process's rows (`rows`, `device_rows`, `gather_cache_rows`), and every
shape-deciding number (chunk width, image buckets, the longest row) is agreed by all processes first.
"""

from __future__ import annotations

import collections
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from axpo_jax.models.qwen3_vl.inputs import ModelInputs, bucket, image_buckets, prepare_inputs
from axpo_jax.models.qwen3_vl.model import KVCache, Qwen3VL
from axpo_jax.parallel import distributed


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """temperature 0 is greedy; top_k 0 and top_p 1 switch those filters off. The paper's eval setting is
    SamplingParams(temperature=0.7, top_p=0.8, top_k=20, presence_penalty=1.5); training samples at 1.0."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    # Subtracted from the logits of every token this decode call (a turn, or a fork's continuation from its branch
    # point) has already produced: each call is what a new request to a serving engine would be.
    presence_penalty: float = 0.0

    def __post_init__(self):
        # a negative temperature would sample the least likely tokens, top_p 0 would keep no token: refuse them here
        # rather than decode nonsense (these come straight from config fields)
        if not (np.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be >= 0 (0: greedy), got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] (1: off), got {self.top_p}")
        if not np.isfinite(self.top_k) or int(self.top_k) != self.top_k or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0: off), got {self.top_k}")
        if not np.isfinite(self.presence_penalty):
            raise ValueError(f"presence_penalty must be finite, got {self.presence_penalty}")

    @property
    def logprob_temperature(self) -> float:
        """The T of the log-probs the sampler reports, log softmax(logits / T), and so of the policy a trainer must
        score: the sampling temperature, or 1.0 (the model's own) when greedy."""
        return self.temperature or 1.0


@dataclasses.dataclass
class DecodeResult:
    tokens_bn: np.ndarray  # int32 [B, max_new], pad_id after each row's end
    logprobs_bn: np.ndarray  # float32, the model's log-prob of each sampled token: log softmax(logits / temperature)
    lengths_b: np.ndarray  # int32, tokens produced per row (its stop token included)
    stopped_b: np.ndarray  # bool: the row hit a stop token or sequence (else it ran into max_new)


@dataclasses.dataclass
class ImageBuckets:
    """The image shape (image rows, patches per image) that chunks are padded to: at least these, and when
    `sticky` the largest any chunk has needed so far. Tool observations bring crops of every size, one or several
    per turn: each (rows, patches) combination with each chunk width and window would be a compiled extend, and
    a large model's compile costs far more than computing the vision tower on padding. With sticky buckets a
    stream of such chunks settles on one image shape after its first few. The agent loop shares one between its
    samplers for observations (and one for prompts)."""

    num_image_rows: int = 1
    patches_per_image: int = 64
    sticky: bool = True

    def fit(self, needed: dict) -> dict:
        """The buckets for a chunk that needs `needed` (image_buckets' dict); with `sticky`, raises the floor."""
        fitted = {"num_image_rows": max(int(needed["num_image_rows"]), self.num_image_rows),
                  "patches_per_image": max(int(needed["patches_per_image"]), self.patches_per_image)}
        if self.sticky:
            self.num_image_rows, self.patches_per_image = fitted["num_image_rows"], fitted["patches_per_image"]
        return fitted


def filter_logits(logits_bv, params: SamplingParams):
    """Applies temperature, top-k and top-p (nucleus) to float32 logits; removed tokens get -inf. (The decode loop
    draws with `sample_tokens`, which applies the same filters without sorting the vocabulary where it can.)"""
    logits_bv = logits_bv / params.temperature
    if params.top_k > 0:
        kth_b1 = jax.lax.top_k(logits_bv, params.top_k)[0][:, -1:]
        logits_bv = jnp.where(logits_bv < kth_b1, -jnp.inf, logits_bv)
    if params.top_p < 1.0:
        sorted_bv = jnp.sort(logits_bv, axis=-1)[:, ::-1]
        logits_bv = jnp.where(logits_bv < _nucleus_cutoff(sorted_bv, params.top_p), -jnp.inf, logits_bv)
    return logits_bv


def _nucleus_cutoff(sorted_bv, top_p: float):
    """The smallest logit still inside the nucleus of logits sorted in descending order ([B, 1]): tokens are kept
    while the probability mass before them is below `top_p`, so the top token always stays."""
    probs_bv = jax.nn.softmax(sorted_bv, axis=-1)
    kept_bv = jnp.cumsum(probs_bv, axis=-1) - probs_bv < top_p
    return jnp.min(jnp.where(kept_bv, sorted_bv, jnp.inf), axis=-1, keepdims=True)


def _nucleus_cutoff_unsorted(logits_bv, top_p: float):
    """`_nucleus_cutoff` of the same logits without sorting them: the smallest logit whose strictly larger logits
    hold less than `top_p` of the mass. That mass only falls as the threshold rises, so 32 halvings of the float32
    order (as integers, where neighbouring floats are neighbouring numbers) leave no logit between `lo` (mass
    above >= top_p) and `hi` (< top_p), and the cutoff is the first logit above `lo`: exact, in 32 masked sums
    over the vocabulary instead of a sort (which XLA runs slowly on every backend)."""
    probs_bv = jax.nn.softmax(logits_bv, axis=-1)

    def ordered(x):  # float32 -> int32 with the same order
        bits = jax.lax.bitcast_convert_type(x, jnp.int32)
        return jnp.where(bits < 0, bits ^ 0x7FFFFFFF, bits)

    def unordered(k):
        return jax.lax.bitcast_convert_type(jnp.where(k < 0, k ^ 0x7FFFFFFF, k), jnp.float32)

    def halve(_, bounds):
        lo_b1, hi_b1 = bounds
        mid_b1 = (lo_b1 >> 1) + (hi_b1 >> 1) + (lo_b1 & hi_b1 & 1)  # the floor of the mean, without overflow
        above_b1 = jnp.sum(jnp.where(logits_bv > unordered(mid_b1), probs_bv, 0.0), axis=-1, keepdims=True)
        return jnp.where(above_b1 >= top_p, mid_b1, lo_b1), jnp.where(above_b1 >= top_p, hi_b1, mid_b1)

    lo_b1 = jnp.full(logits_bv.shape[:-1] + (1,), ordered(jnp.float32(-jnp.inf)))  # all the mass lies above -inf
    hi_b1 = ordered(jnp.max(logits_bv, axis=-1, keepdims=True))  # none above the largest
    lo_b1, _ = jax.lax.fori_loop(0, 32, halve, (lo_b1, hi_b1))
    return jnp.min(jnp.where(logits_bv > unordered(lo_b1), logits_bv, jnp.inf), axis=-1, keepdims=True)


def sample_tokens(logits_bv, key, params: SamplingParams):
    """One token per row (int32 [B]) drawn from softmax(filter_logits(logits_bv, params)), at a fraction of what
    drawing over the filtered vocabulary costs. With top-k the k largest logits are the only candidates, so top-p
    needs only their (already sorted) order and the draw is over k numbers; a whole-vocabulary sort took ~6 ms a
    step for an [8, 4096] block on this project's 2-core CPU, and it grows with Qwen3-VL's 151,936 tokens.
    Without filters one uniform number per row picks the token by its cumulative probability
    (`_inverse_cdf_sample`) instead of a Gumbel number per vocabulary entry (~0.5 ms of random bits per step at
    [8, 4096] on that CPU, 40 ms at [16, 151936]). Top-p without top-k finds its cutoff by bisection
    (`_nucleus_cutoff_unsorted`), then draws the same way. Same distributions, different draws for a key; with
    tied k-th logits, top-k keeps exactly k tokens where `filter_logits` keeps the ties too."""
    v = logits_bv.shape[-1]
    scaled_bv = logits_bv / params.temperature
    if params.top_k > 0:
        top_bk, ids_bk = jax.lax.top_k(scaled_bv, min(params.top_k, v))
        if params.top_p < 1.0:
            top_bk = jnp.where(top_bk < _nucleus_cutoff(top_bk, params.top_p), -jnp.inf, top_bk)
        pick_b = jax.random.categorical(key, top_bk, axis=-1)
        return jnp.take_along_axis(ids_bk, pick_b[:, None], axis=-1)[:, 0].astype(jnp.int32)
    if params.top_p < 1.0:
        cutoff_b1 = _nucleus_cutoff_unsorted(scaled_bv, params.top_p)
        scaled_bv = jnp.where(scaled_bv < cutoff_b1, -jnp.inf, scaled_bv)
    return _inverse_cdf_sample(scaled_bv, key)


def _inverse_cdf_sample(logits_bv, key, block: int = 128):
    """Draws token i with probability softmax(logits)_i using one uniform number per row: the first token whose
    cumulative (unnormalized) probability exceeds u * total. The running sum is taken in two levels, over blocks of
    `block` tokens and then inside the chosen block, because a cumulative sum over the whole vocabulary costs XLA:CPU
    4-7x more than the two small ones. -inf logits (banned tokens) have probability 0 and are never drawn."""
    b, v = logits_bv.shape
    num_blocks = -(-v // block)
    padded_bv = jnp.pad(logits_bv, ((0, 0), (0, num_blocks * block - v)), constant_values=-jnp.inf)
    probs_bgc = jnp.exp(padded_bv - jnp.max(padded_bv, -1, keepdims=True)).reshape(b, num_blocks, block)
    mass_bg = probs_bgc.sum(-1)
    cum_bg = jnp.cumsum(mass_bg, -1)
    target_b = jax.random.uniform(key, (b,)) * cum_bg[:, -1]
    # the block where the running sum passes the target, never one without mass (u * total may round to total)
    block_b = jnp.minimum(jnp.sum(cum_bg <= target_b[:, None], -1), _last_positive(mass_bg))
    # the running sum before the block, exactly as compared above (so target - before >= 0)
    cum_before_bg = jnp.concatenate([jnp.zeros_like(cum_bg[:, :1]), cum_bg[:, :-1]], -1)
    before_b = jnp.take_along_axis(cum_before_bg, block_b[:, None], -1)[:, 0]
    probs_bc = jnp.take_along_axis(probs_bgc, block_b[:, None, None], 1)[:, 0]
    inside_b = jnp.sum(jnp.cumsum(probs_bc, -1) <= (target_b - before_b)[:, None], -1)
    return (block_b * block + jnp.minimum(inside_b, _last_positive(probs_bc))).astype(jnp.int32)


def _last_positive(x_bn):
    """The index of each row's last positive entry (int32 [B]; rows are assumed to have one)."""
    return jnp.max(jnp.where(x_bn > 0, jnp.arange(x_bn.shape[-1], dtype=jnp.int32), 0), axis=-1)


def first_argmax(x_bv):
    """jnp.argmax over the last axis (int32: the first index of the largest value), as a max then a min over the
    indices holding it: XLA:CPU runs the two plain reductions ~2.5x faster than its (value, index) reduction,
    one of the costlier ops of a small decode step. NaN-free input (the argmax of NaN logits means nothing)."""
    v = x_bv.shape[-1]
    largest_b1 = jnp.max(x_bv, axis=-1, keepdims=True)
    first_b = jnp.min(jnp.where(x_bv == largest_b1, jnp.arange(v, dtype=jnp.int32), v), axis=-1)
    return jnp.minimum(first_b, v - 1)


class Sampler:
    """Samples continuations for a fixed batch of cache rows of a fixed capacity (tokens per row)."""

    def __init__(self, model: Qwen3VL, *, batch_size: int, capacity: int, stop_token_ids=(), stop_sequences=(),
                 pad_id: int = 0, min_chunk: int = 16, min_patches: int = 64, min_decode_segment: int = 64,
                 prompt_images: ImageBuckets | None = None, observation_images: ImageBuckets | None = None,
                 cache_dtype=None, mesh=None):
        self.model = model
        self.config = model.config
        self.batch_size = batch_size  # this process's rows (with one process: all of them)
        # Over several processes the cache, logits and sampling run on global arrays of every process's rows (each
        # provides the same number, split over the mesh's batch axes); what goes in and comes out of this class is
        # always this process's rows, as host arrays, so callers are written as for one process.
        self.shard = distributed.data_shard(mesh)
        self.global_batch_size = batch_size * self.shard.count
        self.capacity = capacity
        self.pad_id = pad_id
        self.min_chunk = min_chunk
        # image buckets of prompts (chunks into an empty cache) and of later chunks (observations), kept apart:
        # a prompt's many images would otherwise pad every observation's one crop
        self.prompt_images = prompt_images or ImageBuckets(patches_per_image=min_patches)
        self.observation_images = observation_images or ImageBuckets(patches_per_image=min_patches)
        if min_decode_segment < 1:
            raise ValueError(f"min_decode_segment must be >= 1, got {min_decode_segment}")
        self.min_decode_segment = min_decode_segment
        self.mesh = mesh
        self.cache_dtype = cache_dtype or model.model.language_model.embed_tokens.weight[...].dtype
        self.stop_token_ids = tuple(int(t) for t in stop_token_ids)
        # The policy never writes vision placeholders: a sampled <|image_pad|> would later read as an image with no
        # pixels behind it when the trajectory is re-encoded for training, so these ids are never sampled.
        cfg = self.config
        self.banned_token_ids = (cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id,
                                 cfg.vision_end_token_id)
        width = max([len(s) for s in stop_sequences] + [1])
        # right-aligned, -1 = matches anything, so sequences of different lengths share one array
        self._stop_sequences = np.full((max(len(stop_sequences), 1), width), -2, np.int32)
        for i, seq in enumerate(stop_sequences):
            self._stop_sequences[i, :width - len(seq)] = -1
            self._stop_sequences[i, width - len(seq):] = seq
        self.trace_counts: collections.Counter = collections.Counter()
        self._make_empty_cache = None
        self._decoding = None  # (the model's weight arrays, the decode loop's copy of the model: _decoding_model)

    # ------------------------------------------------------------------------------------------ process rows
    def rows(self, x) -> np.ndarray:
        """This process's rows of a per-row device array (cache lengths, positions, tokens) as a host array."""
        if self.mesh is None:
            return np.asarray(x)
        return distributed.local_rows(x, self.mesh)

    def device_rows(self, x_local, dtype=None):
        """A per-row device array (every process's rows, laid out like the cache) from this process's rows."""
        x_local = np.asarray(x_local, dtype)
        if x_local.shape[0] != self.batch_size:
            raise ValueError(f"{x_local.shape[0]} rows given, the sampler holds {self.batch_size} per process")
        if self.mesh is None:
            return jnp.asarray(x_local)
        return distributed.global_from_local(x_local, self.mesh)

    def longest(self, cache: KVCache, rows_b=None) -> int:
        """The most filled slots of any row (of `rows_b`, this process's rows to look at) on any process; 0 when
        there is none. Every process gets the same number, so shapes that depend on it agree."""
        length_b = self.rows(cache.length_b)
        if rows_b is not None:
            length_b = length_b[np.asarray(rows_b, bool)]
        most = int(length_b.max()) if length_b.size else 0
        return int(distributed.max_across_processes(np.int64(most))) if jax.process_count() > 1 else most

    # ------------------------------------------------------------------------------------------------ cache
    def empty_cache(self) -> KVCache:
        if self._make_empty_cache is None:
            make = functools.partial(KVCache.empty, self.config.text, self.global_batch_size, self.capacity,
                                     self.cache_dtype)
            shardings = None
            if self.mesh is not None:
                from axpo_jax.parallel.sharding import batch_spec

                # made in place, split by row: a global cache never exists whole on one device or host
                shardings = jax.tree.map(
                    lambda x: jax.sharding.NamedSharding(self.mesh, batch_spec(x.shape, self.mesh)),
                    jax.eval_shape(make))
            # one compiled program, kept: every prompt starts from an empty cache
            self._make_empty_cache = jax.jit(make, out_shardings=shardings)
        return self._make_empty_cache()

    def chunk_inputs(self, batch: dict, cache: KVCache, prompt: bool = False) -> tuple[ModelInputs, int]:
        """Processor outputs of one chunk per row (any padding) -> right-padded, bucketed ModelInputs whose rope
        positions continue each row's cache, and the attention window for them: the power-of-two number of
        slots that holds every row's tokens after this chunk. With several processes the buckets (tokens, image
        rows, patches) and the window are agreed on by all of them. Image buckets: `prompt_images` for a
        prompt, else `observation_images`."""
        ids = np.asarray(batch["input_ids"])
        mask = np.asarray(batch.get("attention_mask", np.ones_like(ids)))
        if ids.shape[0] != self.batch_size:
            raise ValueError(f"chunk has {ids.shape[0]} rows, the sampler was built for {self.batch_size}")
        lengths = mask.sum(axis=1)
        used = self.rows(cache.length_b)
        grids = batch.get("image_grid_thw")
        buckets = image_buckets(self.config, grids, min_patches=1)
        width, longest = bucket(int(lengths.max()), self.min_chunk), int(used.max())
        if jax.process_count() > 1:
            width, rows, patches, longest = (int(v) for v in distributed.max_across_processes(
                np.array([width, buckets["num_image_rows"], buckets["patches_per_image"], longest], np.int64)))
            buckets = {"num_image_rows": rows, "patches_per_image": patches}
        # after the processes agree, so every process's floor rises the same way
        buckets = (self.prompt_images if prompt else self.observation_images).fit(buckets)
        if jax.process_count() > 1:
            buckets["num_image_rows"] = self.shard.round_rows(buckets["num_image_rows"])
        right_ids = np.full((self.batch_size, width), self.pad_id, np.int64)
        right_mask = np.zeros_like(right_ids)
        for b in range(self.batch_size):
            right_ids[b, : lengths[b]] = ids[b][mask[b] > 0]
            right_mask[b, : lengths[b]] = 1
        too_long_b = used + lengths > self.capacity
        if too_long_b.any():
            raise ValueError(f"chunk does not fit the cache: rows {np.nonzero(too_long_b)[0].tolist()} would exceed "
                             f"capacity {self.capacity}")
        offset = self.rows(cache.next_position_b)
        inputs = prepare_inputs(
            self.config, right_ids, right_mask, batch.get("pixel_values"), grids, None,
            **buckets, position_offset_b=offset,
        )
        # Like decode, attend over a window of slots rather than the whole capacity: a prompt of 100 tokens in a
        # 1024-slot cache would otherwise score every query against 1024 keys.
        return inputs, self.attention_window(longest, width)

    def _place(self, inputs: ModelInputs) -> ModelInputs:
        if self.mesh is None:
            return jax.device_put(inputs)  # one transfer call for the whole tree (jnp.asarray per leaf: ~4x slower)
        from axpo_jax.parallel.sharding import shard_model_inputs

        return shard_model_inputs(inputs, self.mesh, spatial_merge_size=self.config.vision.spatial_merge_size)

    def extend(self, batch: dict, cache: KVCache | None = None, logits_bv=None):
        """Appends one chunk per row (a prompt when `cache` is None); returns (next-token logits [B, V], cache).
        A row whose chunk is empty keeps its cache and its `logits_bv` row (the logits it had before)."""
        prompt = cache is None
        if prompt:
            cache = self.empty_cache()
            logits_bv = self.device_rows(np.zeros((self.batch_size, self.config.text.vocab_size), np.float32))
        elif logits_bv is None:
            raise ValueError("extending a cache needs the rows' current logits (from decode or an earlier extend)")
        inputs, slots = self.chunk_inputs(batch, cache, prompt)
        return self._extend(self.model, self._place(inputs), cache, logits_bv, slots, prompt)

    # Plain jax.jit: the model goes in as a pytree (nnx modules are pytrees; nothing is written back to it).
    # nnx.jit's graph mode walks the module graph on every call (~10 ms of host time for this model, as much as a
    # small decode turn), and its tree mode checks every leaf for aliases (~0.8 ms, per extend and per segment).
    @functools.partial(jax.jit, static_argnums=(0, 5, 6))
    def _extend(self, model, inputs, cache, previous_logits_bv, slots: int, prompt: bool):
        self.trace_counts["extend"] += 1
        # a prompt goes into an empty cache: its attention can skip future slots (`causal_attention`)
        logits_bv, part = model.extend(inputs, cache.first_slots(slots), empty_cache=prompt)
        has_new_b1 = inputs.attention_mask_bt.sum(axis=1, keepdims=True) > 0
        return jnp.where(has_new_b1, logits_bv, previous_logits_bv), cache.with_first_slots(part)

    @staticmethod
    def fork(logits_bv, cache: KVCache, source_rows):
        """Row r of the result continues row source_rows[r]: a prefix forked K ways, without recomputing it."""
        rows = np.asarray(source_rows)
        batch = logits_bv.shape[0]
        # checked on the host: jnp.take fills an out-of-range row with NaN logits and a garbage cache length, and
        # wraps a negative one, and the decode would then run on them without a word
        if rows.ndim != 1 or not np.issubdtype(rows.dtype, np.integer) or ((rows < 0) | (rows >= batch)).any():
            raise ValueError(f"source_rows must be a list of integer rows in [0, {batch}), got {rows.tolist()}")
        rows = jnp.asarray(rows, jnp.int32)
        return jnp.take(logits_bv, rows, axis=0), cache.take_rows(rows)

    # ----------------------------------------------------------------------------------------------- decode
    def decode(self, logits_bv, cache: KVCache, rng, params: SamplingParams, max_new_tokens: int, active_b=None,
               max_new_b=None):
        """Samples until every active row stops or has max_new_tokens; every sampled token enters the cache.
        `max_new_b` (this process's rows, each <= max_new_tokens) gives rows budgets of their own: a row with
        little cache room left, or a forked row whose turn already holds its prefix, stops at its own limit
        without cutting the others' turns short.

        The on-device loop runs in a few segments, each attending over a window of slots that holds the running
        rows' tokens for that segment only (`decode_segment`): a turn that may write 2,048 tokens but stops after
        200 never pays attention over the 2,048 slots it did not use. The state crosses segments on the device.

        Returns (DecodeResult, next-token logits [B, V], cache) so a forked row or an extend can go on from here.
        """
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        active_local_b = np.ones(self.batch_size, bool) if active_b is None else np.asarray(active_b, bool)
        if max_new_b is None:
            # only rows that decode need room: a finished row may be fuller than any running one (it writes nothing)
            room = self.capacity - self.longest(cache, active_local_b)
            if max_new_tokens > room:
                raise ValueError(f"max_new_tokens={max_new_tokens} exceeds the cache room left ({room})")
            limit_local_b = np.full(self.batch_size, max_new_tokens, np.int32)
        else:
            limit_local_b = np.asarray(max_new_b, np.int32)
            if limit_local_b.shape != (self.batch_size,) or (limit_local_b < 0).any() or (
                    limit_local_b > max_new_tokens).any():
                raise ValueError(f"max_new_b must give each of the {self.batch_size} rows a budget from 0 to "
                                 f"max_new_tokens={max_new_tokens}, got {limit_local_b.tolist()}")
            over_b = active_local_b & (self.rows(cache.length_b) + limit_local_b > self.capacity)
            if over_b.any():
                raise ValueError(f"rows {np.nonzero(over_b)[0].tolist()}: max_new_b exceeds their cache room")
            active_local_b = active_local_b & (limit_local_b > 0)
        model = self._decoding_model()
        start_length_b = cache.length_b
        # The token buffers are a power of two wide, not max_new_tokens: near the end of a cache each turn's
        # budget (the room left) differs, and a width per budget would compile the whole loop again each time.
        width = bucket(max_new_tokens, 64)
        state = self._decode_start(logits_bv, rng, self.device_rows(active_local_b, bool),
                                   self.device_rows(limit_local_b, np.int32), width)
        step, running_local_b = 0, active_local_b
        while step < max_new_tokens and distributed.any_process(bool(running_local_b.any())):
            window, steps = self.decode_segment(self.longest(cache, running_local_b), max_new_tokens - step)
            step += steps
            state, cache = self._decode(model, state, cache, jnp.int32(step), params, window)
            running_local_b = self.rows(state.running_b)
        result = DecodeResult(self.rows(state.tokens_bn)[:, :max_new_tokens],
                              self.rows(state.logprobs_bn)[:, :max_new_tokens],
                              self.rows(cache.length_b - start_length_b), self.rows(state.stopped_b))
        return result, state.logits_bv, cache

    def attention_window(self, longest: int, new_tokens: int) -> int:
        """The cache slots an extend or a decode segment attends over: a power-of-two window that holds every
        row's tokens after `new_tokens` more, not the whole capacity (each query reads every slot it attends to:
        most of a decode step's cost for long caches)."""
        return min(self.capacity, bucket(longest + new_tokens, 64))

    def decode_segment(self, longest: int, remaining: int) -> tuple[int, int]:
        """(window, steps) of the next decode segment: the window that holds `min_decode_segment` more tokens (or
        all that remain) of the running rows, the longest of which has `longest`, and the steps that fill it.
        Windows are powers of two, so a decode of any length compiles at most log2(capacity / 64) programs."""
        window = self.attention_window(longest, min(remaining, self.min_decode_segment))
        return window, min(remaining, window - longest)

    def decode_segments(self, longest: int, new_tokens: int) -> list[tuple[int, int]]:
        """The (window, steps) segments of a decode in which no row stops early (benchmarks time such runs)."""
        segments = []
        while new_tokens > 0:
            segments.append(self.decode_segment(longest, new_tokens))
            longest, new_tokens = longest + segments[-1][1], new_tokens - segments[-1][1]
        return segments

    def _decoding_model(self) -> Qwen3VL:
        """The model as the decode loop multiplies by it. On CPU, a copy whose decoder weights are transposed and
        whose q/k/v and gate/up products are fused (`Qwen3VL.for_decoding`: XLA:CPU's batch-8 x @ W beats x @ W^T
        by ~1.5x, and a decode step is mostly these products), made once and kept while the model holds the same
        weight arrays (an update replaces them): re-laying every weight costs several ms, a dozen decode steps'
        worth of the savings, on each call.
        TPU and GPU compilers choose weight layouts themselves: the model as it is, no copy."""
        if jax.default_backend() != "cpu":
            return self.model
        weights = jax.tree.leaves(self.model)
        kept = self._decoding[0] if self._decoding is not None else []
        if len(kept) != len(weights) or any(a is not b for a, b in zip(kept, weights)):
            self._decoding = (weights, _for_decoding(self.model))
        return self._decoding[1]

    @functools.partial(jax.jit, static_argnums=(0, 5))
    def _decode_start(self, logits_bv, rng, active_b, limit_b, width: int) -> "DecodeState":
        b, v = logits_bv.shape
        return DecodeState(
            step=jnp.int32(0), logits_bv=logits_bv, rng=rng,
            tokens_bn=jnp.full((b, width), self.pad_id, jnp.int32), logprobs_bn=jnp.zeros((b, width), jnp.float32),
            running_b=active_b, limit_b=limit_b, seen_bv=jnp.zeros((b, v), jnp.float32),
            recent_bw=jnp.full((b, self._stop_sequences.shape[1]), -5, jnp.int32), stopped_b=jnp.zeros((b,), bool),
        )

    @functools.partial(jax.jit, static_argnums=(0, 5, 6))
    def _decode(self, model, state: "DecodeState", cache, segment_end, params: SamplingParams, window: int):
        """Runs the decode loop from `state` until no row runs or the step count reaches `segment_end` (traced: the
        host's count, so budgets of every size share the program), attending over the cache's first `window`
        slots."""
        self.trace_counts["decode"] += 1
        full, cache = cache, cache.first_slots(window)
        b, v = state.logits_bv.shape
        stop_ids = jnp.asarray(self.stop_token_ids or (-3,), jnp.int32)
        stop_seqs = jnp.asarray(self._stop_sequences)

        banned_v = jnp.zeros((v,), bool).at[jnp.asarray(self.banned_token_ids)].set(True)
        # step i of the decode call draws with key i of the call's key, split once here: no key split (an inner
        # loop of threefry rounds on XLA:CPU, a few % of a small model's step) inside the loop, and the same draws
        # however the call is cut into segments. Greedy decoding draws nothing.
        keys_n = None if params.temperature == 0 else jax.random.split(state.rng, state.tokens_bn.shape[1])

        def sample(logits, key, seen):
            # The reported log-prob is the model's own, log softmax(logits / temperature), before the bans, the
            # penalty and the top-k/p filters: the number a trainer recomputes from the same weights.
            scaled = logits / params.logprob_temperature
            penalized = logits - params.presence_penalty * seen if params.presence_penalty else logits
            shaped = jnp.where(banned_v, -jnp.inf, penalized)
            if params.temperature == 0:
                token = first_argmax(shaped)
            else:
                token = sample_tokens(shaped, key, params)
            picked = jnp.take_along_axis(scaled, token[:, None], -1)[:, 0]
            return token, picked - jax.nn.logsumexp(scaled, axis=-1)

        def body(carry):
            s, cache = carry
            step, running = s.step, s.running_b
            token, logprob = sample(s.logits_bv, None if keys_n is None else keys_n[step], s.seen_bv)
            token = jnp.where(running, token, self.pad_id)
            seen = s.seen_bv
            if params.presence_penalty:  # else `seen` is never read: no [B, V] update per step
                seen = seen.at[jnp.arange(b), token].max(running.astype(seen.dtype))
            recent = jnp.concatenate([s.recent_bw[:, 1:], token[:, None]], axis=1)
            hit_seq = jnp.any(jnp.all((stop_seqs[None] == recent[:, None]) | (stop_seqs[None] == -1), -1), -1)
            hit = jnp.isin(token, stop_ids) | hit_seq
            logits, cache = model.decode_step(token, cache, running)
            return DecodeState(
                step=step + 1, logits_bv=logits, rng=s.rng,
                tokens_bn=s.tokens_bn.at[:, step].set(token),
                logprobs_bn=s.logprobs_bn.at[:, step].set(jnp.where(running, logprob, 0.0)),
                running_b=running & ~hit & (step + 1 < s.limit_b), limit_b=s.limit_b, seen_bv=seen,
                recent_bw=recent,
                stopped_b=s.stopped_b | (running & hit),
            ), cache

        state, cache = jax.lax.while_loop(
            lambda carry: jnp.any(carry[0].running_b) & (carry[0].step < segment_end), body, (state, cache))
        return state, full.with_first_slots(cache)


@struct.dataclass
class DecodeState:
    """The decode loop's carry, kept on the device between segments."""

    step: jax.Array  # int32, tokens sampled so far in this decode call
    logits_bv: jax.Array  # next-token logits of every row
    rng: jax.Array  # the decode call's key (step i draws with its i-th split)
    tokens_bn: jax.Array  # int32 [B, width >= max_new], pad_id where nothing was sampled
    logprobs_bn: jax.Array
    running_b: jax.Array  # bool: not stopped, nor at its own limit (the segment's end is the host's: `segment_end`)
    limit_b: jax.Array  # int32: the most tokens each row may sample in this decode call
    seen_bv: jax.Array  # float32: 1 for tokens this decode call has produced (presence penalty)
    recent_bw: jax.Array  # int32: each row's last tokens, matched against the stop sequences
    stopped_b: jax.Array  # bool: hit a stop token or sequence


@jax.jit
def _for_decoding(model: Qwen3VL) -> Qwen3VL:
    return model.for_decoding()  # the model as a pytree: a new module of new arrays comes out


def gather_cache_rows(caches: list[KVCache], rows) -> KVCache:
    """A cache whose row i copies row `rows[i]` of the caches laid end to end (each holds the same number of rows;
    `rows` counts this process's rows only, group after group): forking prefixes K ways copies their rows.

    With several processes every process passes the same number of rows (its own) and its copies become its rows of
    the result, so each process forks only the trajectories it owns, while the copy itself is one global program.
    """
    rows = np.asarray(rows, np.int64)
    sharding = caches[0].length_b.sharding
    mesh = sharding.mesh if isinstance(sharding, jax.sharding.NamedSharding) else None
    shard = distributed.data_shard(mesh)
    if shard.count == 1:
        group_size = int(caches[0].length_b.shape[0])
        group_r = rows // group_size
        order = np.argsort(group_r, kind="stable")
        pieces = [caches[g].take_rows(jnp.asarray(rows[order][group_r[order] == g] % group_size))
                  for g in np.unique(group_r)]
        if len(pieces) == 1:
            return pieces[0]
        grouped = jax.tree.map(lambda *parts: jnp.concatenate(parts), *pieces)
        return grouped.take_rows(jnp.asarray(np.argsort(order)))  # back to the order of `rows`
    per_process = int(caches[0].length_b.shape[0]) // shard.count  # a group's rows on one process
    group, row = rows // per_process, rows % per_process
    global_rows = group * per_process * shard.count + shard.index * per_process + row
    every_row = jnp.asarray(distributed.concat_shards(global_rows, mesh), jnp.int32)  # same on every process
    return _row_taker(mesh)(tuple(caches), every_row)


@functools.lru_cache(maxsize=None)
def _row_taker(mesh):
    """A jitted row copy of caches laid end to end whose result is split by row over `mesh` like any cache."""
    from axpo_jax.parallel.sharding import batch_spec

    def take(caches, every_row):
        whole = caches[0] if len(caches) == 1 else jax.tree.map(lambda *parts: jnp.concatenate(parts), *caches)
        taken = whole.take_rows(every_row)
        return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(
            x, jax.sharding.NamedSharding(mesh, batch_spec(x.shape, mesh))), taken)

    return jax.jit(take)
