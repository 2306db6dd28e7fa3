"""The KV-cache sampler against transformers' generate (greedy), plus extend, fork, stops and compile counts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from axpo_jax.models import qwen3_vl
from axpo_jax.rollout.sampler import (ImageBuckets, Sampler, SamplingParams, filter_logits, first_argmax,
                                     sample_tokens)
from tests.models.qwen3_vl.conftest import build_hf_checkpoint, image_tokens, make_batch

GREEDY = SamplingParams(temperature=0.0)
PROMPTS = [[3, (1, 4, 6), 4], [2, (1, 6, 4), 6, (1, 2, 2), 1], [7], [5, (1, 4, 4), 2]]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sampler_model")
    hf = build_hf_checkpoint(folder, seed=0)
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    return hf, qwen3_vl.from_pretrained(folder)


@pytest.fixture(scope="module")
def sampler(models):
    return Sampler(models[1], batch_size=4, capacity=128)


def hf_greedy(hf, batch, n):
    cfg = hf.config
    vision_ids = [cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id]
    with torch.no_grad():
        out = hf.generate(**{k: torch.from_numpy(np.asarray(v)) for k, v in batch.items()}, max_new_tokens=n,
                          do_sample=False, suppress_tokens=vision_ids)  # the sampler never samples these
    return out[:, batch["input_ids"].shape[1]:].numpy()


def test_greedy_matches_generate(models, sampler):
    hf, _ = models
    batch = make_batch(hf.config, PROMPTS, padding="left")
    logits, cache = sampler.extend(batch)
    result, _, _ = sampler.decode(logits, cache, jax.random.key(0), GREEDY, 10)
    np.testing.assert_array_equal(result.tokens_bn, hf_greedy(hf, batch, 10))
    np.testing.assert_array_equal(result.lengths_b, [10] * 4)
    assert not result.stopped_b.any()


def test_a_long_prompt_extends_in_causal_blocks_like_generate(models):
    """A prompt longer than a causal query block (64 on the CPU) goes into the empty cache in blocks: the same
    logits as one piece, and greedy tokens equal to transformers'."""
    hf, model = models
    batch = make_batch(hf.config, [[70, (1, 4, 6), 80], [140]], padding="left")
    sampler = Sampler(model, batch_size=2, capacity=256)
    logits, cache = sampler.extend(batch)
    inputs, slots = sampler.chunk_inputs(batch, sampler.empty_cache(), prompt=True)
    one_piece, _ = jax.jit(lambda m, inputs, cache: m.extend(inputs, cache))(
        model, jax.device_put(inputs), sampler.empty_cache().first_slots(slots))
    np.testing.assert_allclose(np.asarray(logits), np.asarray(one_piece), atol=1e-4)
    result, _, _ = sampler.decode(logits, cache, jax.random.key(0), GREEDY, 8)
    np.testing.assert_array_equal(result.tokens_bn, hf_greedy(hf, batch, 8))


def test_extend_with_observation_image_matches_generate(models, sampler):
    """Turn 1, then a tool observation (text + a new image for three rows, nothing for one), then turn 2."""
    hf, _ = models
    cfg = hf.config
    rng = np.random.default_rng(7)
    prompts = make_batch(cfg, PROMPTS, padding="left", seed=1)
    logits, cache = sampler.extend(prompts)
    turn1, logits, cache = sampler.decode(logits, cache, jax.random.key(0), GREEDY, 5)

    new_grids = {0: (1, 2, 4), 1: (1, 4, 4), 3: (1, 6, 2)}
    patch_dim = cfg.vision_config.in_channels * cfg.vision_config.temporal_patch_size * cfg.vision_config.patch_size**2
    obs_ids, obs_pixels = {}, {}
    for row, grid in new_grids.items():
        obs_ids[row] = [11, 12] + image_tokens(cfg, grid) + [13]
        obs_pixels[row] = rng.standard_normal((int(np.prod(grid)), patch_dim)).astype(np.float32)
    width = max(len(v) for v in obs_ids.values())
    chunk = {"input_ids": np.zeros((4, width), np.int64), "attention_mask": np.zeros((4, width), np.int64)}
    for row, ids in obs_ids.items():
        chunk["input_ids"][row, : len(ids)], chunk["attention_mask"][row, : len(ids)] = ids, 1
    chunk["image_grid_thw"] = np.array([new_grids[r] for r in sorted(new_grids)])
    chunk["pixel_values"] = np.concatenate([obs_pixels[r] for r in sorted(new_grids)])
    logits, cache = sampler.extend(chunk, cache, logits)
    turn2, _, _ = sampler.decode(logits, cache, jax.random.key(0), GREEDY, 6)

    # transformers sees each whole conversation at once: prompt + turn 1 + observation (+ its image)
    grids = prompts["image_grid_thw"]
    per_row_images = [1, 2, 0, 1]
    starts = np.cumsum([0] + [int(np.prod(g)) for g in grids])
    first_image = np.cumsum([0] + per_row_images)
    for row in range(4):
        real = prompts["input_ids"][row][prompts["attention_mask"][row] > 0].tolist()
        ids = real + turn1.tokens_bn[row].tolist() + obs_ids.get(row, [])
        images = list(range(first_image[row], first_image[row + 1]))
        pixels = [prompts["pixel_values"][starts[i] : starts[i + 1]] for i in images]
        row_grids = [grids[i] for i in images]
        if row in new_grids:
            pixels.append(obs_pixels[row])
            row_grids.append(new_grids[row])
        single = {"input_ids": np.array([ids]), "attention_mask": np.ones((1, len(ids)), np.int64),
                  "mm_token_type_ids": (np.array([ids]) == cfg.image_token_id).astype(np.int64)}
        if pixels:
            single["pixel_values"] = np.concatenate(pixels)
            single["image_grid_thw"] = np.array(row_grids)
        np.testing.assert_array_equal(turn2.tokens_bn[row], hf_greedy(hf, single, 6)[0], err_msg=f"row {row}")


def test_fork_continues_exactly_like_the_source(models, sampler):
    hf, _ = models
    batch = make_batch(hf.config, PROMPTS, padding="right", seed=2)
    logits, cache = sampler.extend(batch)
    _, prefix_logits, prefix_cache = sampler.decode(logits, cache, jax.random.key(1), GREEDY, 4)
    reference, _, _ = sampler.decode(prefix_logits, prefix_cache, jax.random.key(1), GREEDY, 6)

    forked_logits, forked_cache = sampler.fork(prefix_logits, prefix_cache, [1, 1, 1, 1])
    np.testing.assert_array_equal(np.asarray(forked_cache.length_b), [int(prefix_cache.length_b[1])] * 4)
    greedy, _, _ = sampler.decode(forked_logits, forked_cache, jax.random.key(1), GREEDY, 6)
    np.testing.assert_array_equal(greedy.tokens_bn, np.repeat(reference.tokens_bn[1:2], 4, axis=0))

    sampled, _, _ = sampler.decode(forked_logits, forked_cache, jax.random.key(3), SamplingParams(), 6)
    assert len({tuple(r) for r in sampled.tokens_bn}) > 1  # K independent continuations of one prefix
    for rows in ([4, 0, 0, 0], [-1, 0, 0, 0], [0.5, 1, 1, 1]):  # taken as they were: NaN rows, wrapping, row 0
        with pytest.raises(ValueError, match=r"source_rows must be a list of integer rows in \[0, 4\)"):
            sampler.fork(prefix_logits, prefix_cache, rows)


def test_stop_tokens_and_stop_sequences(models):
    hf, model = models
    batch = make_batch(hf.config, PROMPTS, padding="left")
    free = Sampler(model, batch_size=4, capacity=128)
    logits, cache = free.extend(batch)
    full, _, _ = free.decode(logits, cache, jax.random.key(0), GREEDY, 10)
    stop_token = int(full.tokens_bn[2, 3])  # row 2 stops at its 4th token (or earlier if it repeats)
    pair = tuple(int(t) for t in full.tokens_bn[0, 5:7])  # row 0 stops after its 7th token via a sequence

    stopping = Sampler(model, batch_size=4, capacity=128, stop_token_ids=[stop_token], stop_sequences=[pair],
                       pad_id=-1)
    logits, cache = stopping.extend(batch)
    result, _, cache = stopping.decode(logits, cache, jax.random.key(0), GREEDY, 10)
    for row in range(4):
        produced = full.tokens_bn[row].tolist()
        ends = [i + 1 for i, t in enumerate(produced) if t == stop_token]
        ends += [i + 1 for i in range(1, 10) if tuple(produced[i - 1 : i + 1]) == pair]
        expected = min(ends + [10])
        assert result.lengths_b[row] == expected, row
        assert result.stopped_b[row] == (expected < 10 or bool(ends and min(ends) == 10))
        np.testing.assert_array_equal(result.tokens_bn[row, :expected], produced[:expected])
        assert (result.tokens_bn[row, expected:] == -1).all()
    assert result.lengths_b[2] <= 4 and result.lengths_b[0] <= 7
    # finished rows did not advance their cache
    np.testing.assert_array_equal(np.asarray(cache.length_b), batch["attention_mask"].sum(1) + result.lengths_b)

    # rows with budgets of their own stop there, unstopped (a length cut), and the others go on as before
    logits, cache = free.extend(batch)
    limited, _, cache = free.decode(logits, cache, jax.random.key(0), GREEDY, 10, max_new_b=[3, 10, 0, 7])
    np.testing.assert_array_equal(limited.lengths_b, [3, 10, 0, 7])
    assert not limited.stopped_b.any()
    for row, limit in enumerate([3, 10, 0, 7]):
        np.testing.assert_array_equal(limited.tokens_bn[row, :limit], full.tokens_bn[row, :limit])
    np.testing.assert_array_equal(np.asarray(cache.length_b), batch["attention_mask"].sum(1) + [3, 10, 0, 7])
    with pytest.raises(ValueError, match=r"max_new_b must give each of the 4 rows a budget from 0 to"):
        free.decode(logits, cache, jax.random.key(0), GREEDY, 10, max_new_b=[3, 11, 0, 7])


def test_steady_state_does_not_recompile(models):
    hf, model = models
    sampler = Sampler(model, batch_size=4, capacity=128)
    # different prompts, images, sampling keys and token budgets (a turn's budget shrinks with the room left), but
    # the same buckets (<= 32 tokens, <= 4 images, <= 64 patches, a 64-slot window, <= 64 new tokens)
    for seed, (prompts, budget) in enumerate([(PROMPTS, 8), ([[14, (1, 4, 4), 1], [9], [2, (1, 6, 4), 3],
                                                              [1, (1, 2, 2), 2]], 5)]):
        batch = make_batch(hf.config, prompts, padding="left", seed=seed)
        logits, cache = sampler.extend(batch)
        result, _, _ = sampler.decode(logits, cache, jax.random.key(seed), SamplingParams(temperature=0.7, top_p=0.8),
                                      budget)
        assert result.tokens_bn.shape == (4, budget) and (result.lengths_b <= budget).all()
    assert sampler.trace_counts == {"extend": 1, "decode": 1}


def test_filters_and_presence_penalty():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    top2 = filter_logits(logits, SamplingParams(top_k=2))
    assert np.isfinite(np.asarray(top2)).tolist() == [[True, True, False, False]]
    nucleus = filter_logits(logits, SamplingParams(top_p=0.7))  # 0.5 + 0.3 reach 0.7: keep two
    assert np.isfinite(np.asarray(nucleus)).tolist() == [[True, True, False, False]]
    tiny = filter_logits(logits, SamplingParams(top_p=0.01))  # the top token always stays
    assert np.isfinite(np.asarray(tiny)).tolist() == [[True, False, False, False]]
    hot = filter_logits(logits, SamplingParams(temperature=2.0))
    np.testing.assert_allclose(np.asarray(hot), np.asarray(logits) / 2)


def test_sample_tokens_draws_the_filtered_distribution():
    """sample_tokens (top-k candidates, inverse CDF) draws from softmax(filter_logits(...)), judged by the total
    variation distance of 20,000 draws, a bound (0.05; sampling noise alone gives ~0.03 here)
    that rejects a 25% hotter temperature (~0.15)."""
    rng = np.random.default_rng(0)
    v, rows = 300, 20_000  # 300: three 128-token blocks, the last one padded
    logits_v = rng.normal(0.0, 2.0, v).astype(np.float32)
    logits_v[[5, 130, 299]] = -np.inf  # banned: never drawn
    logits_bv = jnp.broadcast_to(jnp.asarray(logits_v), (rows, v))
    draw = jax.jit(sample_tokens, static_argnums=2)

    def distance(params, target):
        freq = np.bincount(np.asarray(draw(logits_bv, jax.random.key(1), params)), minlength=v) / rows
        assert freq[~np.isfinite(np.asarray(filter_logits(jnp.asarray(logits_v[None]), params))[0])].sum() == 0
        return 0.5 * np.abs(freq - target).sum()

    def softmax_of(params):
        return np.asarray(jax.nn.softmax(filter_logits(jnp.asarray(logits_v[None]), params)))[0]

    for params in (SamplingParams(temperature=1.0), SamplingParams(temperature=0.7, top_k=20),
                   SamplingParams(temperature=0.7, top_p=0.8, top_k=20), SamplingParams(top_p=0.9)):
        assert distance(params, softmax_of(params)) < 0.05, params
    assert distance(SamplingParams(temperature=1.0), softmax_of(SamplingParams(temperature=1.25))) > 0.05

    # one allowed token, first, last or in the middle of a block: always that one
    only = np.full((3, v), -np.inf, np.float32)
    only[[0, 1, 2], [0, 127, 298]] = 0.0
    for params in (SamplingParams(), SamplingParams(top_k=4), SamplingParams(top_p=0.5)):
        np.testing.assert_array_equal(np.asarray(draw(jnp.asarray(only), jax.random.key(2), params)), [0, 127, 298])


def test_nucleus_cutoff_by_bisection_equals_the_sorted_one():
    """Top-p without top-k: the cutoff found by halving the float order is exactly the one read off the sorted
    logits, with ties, banned (-inf) tokens, large offsets and scales, and nuclei of one token to nearly all."""
    from axpo_jax.rollout.sampler import _nucleus_cutoff, _nucleus_cutoff_unsorted

    rng = np.random.default_rng(0)
    cutoff = jax.jit(_nucleus_cutoff_unsorted, static_argnums=1)
    checked = 0
    for trial in range(6):
        logits = rng.standard_normal((32, 300)).astype(np.float32) * [0.1, 1.0, 8.0][trial % 3]
        if trial % 2:
            logits = np.round(logits * 2) / 2  # ties
        logits[:, rng.integers(0, 300, 40)] = -np.inf
        logits += [0.0, -1e3, 50.0][trial % 3]
        for top_p in (0.01, 0.3, 0.8, 0.95, 0.999):
            expected = np.asarray(_nucleus_cutoff(jnp.sort(jnp.asarray(logits), -1)[:, ::-1], top_p))
            np.testing.assert_array_equal(np.asarray(cutoff(jnp.asarray(logits), top_p)), expected)
            checked += len(logits)
    assert checked == 6 * 5 * 32


def test_sampling_params_refuse_values_that_would_decode_nonsense():
    SamplingParams(temperature=0.0, top_p=1.0, top_k=0)  # greedy, filters off
    for bad, match in ((dict(temperature=-0.5), "temperature"), (dict(temperature=float("nan")), "temperature"),
                       (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(top_k=-1), "top_k"),
                       (dict(top_k=2.5), "top_k"), (dict(top_k=float("nan")), "top_k must be an integer"),
                       (dict(top_k=float("inf")), "top_k must be an integer"),
                       (dict(presence_penalty=float("inf")), "presence_penalty")):
        with pytest.raises(ValueError, match=match):
            SamplingParams(**bad)


def test_first_argmax_is_argmax_ties_and_bans_included():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 5, size=(64, 50)).astype(np.float32)  # many ties: the first index of the largest wins
    x[3] = -np.inf  # every token banned
    x[4, :] = 1.0
    x[5, :-1] = -np.inf  # only the last token allowed
    got = np.asarray(first_argmax(jnp.asarray(x)))
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, np.argmax(x, axis=-1))


def test_presence_penalty_discourages_repeats(models):
    hf, model = models
    sampler = Sampler(model, batch_size=4, capacity=128)
    batch = make_batch(hf.config, PROMPTS, padding="left")
    logits, cache = sampler.extend(batch)
    plain, _, _ = sampler.decode(logits, cache, jax.random.key(0), GREEDY, 12)
    penalised, _, _ = sampler.decode(logits, cache, jax.random.key(0),
                                     SamplingParams(temperature=0.0, presence_penalty=100.0), 12)
    assert any(len(set(r)) < 12 for r in plain.tokens_bn.tolist())  # the tiny model does repeat itself
    assert all(len(set(r)) == 12 for r in penalised.tokens_bn.tolist())


def test_chunk_padding_past_capacity_never_overwrites_the_cache(models):
    """A chunk whose real tokens fit but whose padded width reaches past the last slot leaves earlier slots intact."""
    hf, model = models
    batch = make_batch(hf.config, [[20], [20], [20], [20]], padding="right", seed=4)
    chunk = make_batch(hf.config, [[17], [17], [17], [17]], padding="right", seed=5)  # padded to 32 slots
    results = []
    for capacity in (40, 128):
        sampler = Sampler(model, batch_size=4, capacity=capacity)
        logits, cache = sampler.extend(batch)
        logits, cache = sampler.extend(chunk, cache, logits)
        results.append(np.asarray(logits))
    np.testing.assert_allclose(results[0], results[1], atol=1e-5)


def test_a_finished_row_fuller_than_the_room_does_not_block_the_others(models, sampler):
    """Room for new tokens is checked on the rows that decode: a finished row may be nearly full."""
    hf, _ = models
    batch = make_batch(hf.config, PROMPTS, padding="left")
    logits, cache = sampler.extend(batch)
    lengths = np.asarray(cache.length_b).copy()
    full = lengths.copy()
    full[2] = sampler.capacity - 2  # row 2 finished with its cache nearly full
    cache = cache.replace(length_b=jnp.asarray(full, jnp.int32))
    active = np.array([True, True, False, True])
    result, _, after = sampler.decode(logits, cache, jax.random.key(0), GREEDY, 10, active_b=active)
    np.testing.assert_array_equal(result.lengths_b, [10, 10, 0, 10])
    np.testing.assert_array_equal(np.asarray(after.length_b), full + np.where(active, 10, 0))
    with pytest.raises(ValueError, match="cache room"):
        sampler.decode(logits, cache, jax.random.key(0), GREEDY, 10, active_b=np.ones(4, bool))
    with pytest.raises(ValueError, match="max_new_tokens must be >= 0"):
        sampler.decode(logits, cache, jax.random.key(0), GREEDY, -1)
    nothing, _, same = sampler.decode(logits, cache, jax.random.key(0), GREEDY, 0)
    assert nothing.tokens_bn.shape == (4, 0) and (nothing.lengths_b == 0).all()
    np.testing.assert_array_equal(np.asarray(same.length_b), full)


def test_decode_follows_a_weight_update(models):
    """The decode loop's kept copy of the weights (transposed, on CPU) is remade when the model's weights change,
    as after a training step: decoding then matches a new sampler's."""
    from flax import nnx

    hf, model = models
    model = nnx.clone(model)  # the module fixture stays as it is
    batch = make_batch(hf.config, PROMPTS, padding="right", seed=3)
    kept = Sampler(model, batch_size=4, capacity=128)
    logits, cache = kept.extend(batch)
    before, _, _ = kept.decode(logits, cache, jax.random.key(0), GREEDY, 6)
    head = model.lm_head if model.lm_head is not None else model.model.language_model.embed_tokens
    head.weight[...] = head.weight[...][::-1]  # a new array, as an optimizer update assigns
    after, _, _ = kept.decode(logits, cache, jax.random.key(0), GREEDY, 6)
    fresh, _, _ = Sampler(model, batch_size=4, capacity=128).decode(logits, cache, jax.random.key(0), GREEDY, 6)
    assert (before.tokens_bn != after.tokens_bn).any()
    np.testing.assert_array_equal(after.tokens_bn, fresh.tokens_bn)
    np.testing.assert_array_equal(after.logprobs_bn, fresh.logprobs_bn)


def test_decode_runs_in_segments_over_growing_windows(models):
    """A long decode attends over a window that grows with the rows (64, then 128 slots here), one segment per
    window: greedy tokens equal generate's across the switch, sampled ones equal a single loop over the whole
    window's, and a decode whose rows all stop in the first window never runs (nor compiles) the second."""
    hf, model = models
    batch = make_batch(hf.config, PROMPTS, padding="left")
    segmented = Sampler(model, batch_size=4, capacity=128, min_decode_segment=8)
    logits, cache = segmented.extend(batch)
    longest = segmented.longest(cache)
    new_tokens = 96 - longest
    assert segmented.decode_segments(longest, new_tokens) == [(64, 64 - longest), (128, 32)]

    greedy, _, after = segmented.decode(logits, cache, jax.random.key(0), GREEDY, new_tokens)
    assert segmented.trace_counts["decode"] == 2
    np.testing.assert_array_equal(greedy.tokens_bn, hf_greedy(hf, batch, new_tokens))
    np.testing.assert_array_equal(np.asarray(after.length_b), np.asarray(cache.length_b) + new_tokens)

    whole = Sampler(model, batch_size=4, capacity=128, min_decode_segment=128)
    sampled = [s.decode(logits, cache, jax.random.key(5), SamplingParams(top_k=50), new_tokens)[0]
               for s in (segmented, whole)]
    assert whole.trace_counts["decode"] == 1
    np.testing.assert_array_equal(sampled[0].tokens_bn, sampled[1].tokens_bn)
    np.testing.assert_allclose(sampled[0].logprobs_bn, sampled[1].logprobs_bn, atol=1e-5)

    first_tokens = sorted({int(t) for t in greedy.tokens_bn[:, 0]})
    stopping = Sampler(model, batch_size=4, capacity=128, min_decode_segment=8, stop_token_ids=first_tokens)
    stopped, _, _ = stopping.decode(logits, cache, jax.random.key(0), GREEDY, new_tokens)
    np.testing.assert_array_equal(stopped.lengths_b, [1] * 4)
    assert stopping.trace_counts["decode"] == 1
    with pytest.raises(ValueError, match="min_decode_segment"):
        Sampler(model, batch_size=4, capacity=128, min_decode_segment=0)


def _observation_chunk(cfg, rows: int, grids: dict, rng, extra_text: int = 0) -> dict:
    """A tool-observation chunk: for each row in `grids`, two text tokens, its image's tokens, `extra_text` more."""
    patch_dim = cfg.vision_config.in_channels * cfg.vision_config.temporal_patch_size * cfg.vision_config.patch_size**2
    ids = {row: [11, 12] + image_tokens(cfg, grid) + [13] * (1 + extra_text) for row, grid in grids.items()}
    width = max(len(v) for v in ids.values())
    chunk = {"input_ids": np.zeros((rows, width), np.int64), "attention_mask": np.zeros((rows, width), np.int64)}
    for row, row_ids in ids.items():
        chunk["input_ids"][row, : len(row_ids)], chunk["attention_mask"][row, : len(row_ids)] = row_ids, 1
    chunk["image_grid_thw"] = np.array([grids[r] for r in sorted(grids)])
    chunk["pixel_values"] = np.concatenate([rng.standard_normal((int(np.prod(grids[r])), patch_dim))
                                            for r in sorted(grids)]).astype(np.float32)
    return chunk


def test_sticky_image_buckets_reuse_the_largest_observation_shape(models):
    """Two crops of 128 patches, then one of 16 (padded to the same width): with sticky buckets the second
    observation reuses the first's compiled extend (2 image rows x 128 patches), with tight buckets it compiles
    its own (1 x 64); both give the same logits and greedy tokens. The prompt's buckets stay apart."""
    hf, model = models
    cfg = hf.config
    samplers = {"sticky": Sampler(model, batch_size=4, capacity=128),
                "tight": Sampler(model, batch_size=4, capacity=128,
                                 observation_images=ImageBuckets(sticky=False))}
    prompts = make_batch(cfg, PROMPTS, padding="left", seed=3)
    big = _observation_chunk(cfg, 4, {0: (1, 8, 16), 1: (1, 16, 8)}, np.random.default_rng(0))
    small = _observation_chunk(cfg, 4, {2: (1, 4, 4)}, np.random.default_rng(1), extra_text=30)
    assert big["input_ids"].shape[1] > 32 and small["input_ids"].shape[1] > 32  # one width bucket: 64
    outputs = {}
    for name, sampler in samplers.items():
        logits, cache = sampler.extend(prompts)
        _, logits, cache = sampler.decode(logits, cache, jax.random.key(0), GREEDY, 3)
        logits, cache = sampler.extend(big, cache, logits)
        after_big = sampler.trace_counts["extend"]
        logits, cache = sampler.extend(small, cache, logits)
        tokens = sampler.decode(logits, cache, jax.random.key(0), GREEDY, 4)[0].tokens_bn
        outputs[name] = (np.asarray(logits), tokens, sampler.trace_counts["extend"] - after_big)
    assert outputs["sticky"][2] == 0 and outputs["tight"][2] == 1
    assert (samplers["sticky"].observation_images.num_image_rows,
            samplers["sticky"].observation_images.patches_per_image) == (2, 128)
    assert (samplers["tight"].observation_images.num_image_rows,
            samplers["tight"].observation_images.patches_per_image) == (1, 64)
    # the prompts (4 images in all, each <= 64 patches) keep their own floor
    assert samplers["sticky"].prompt_images.num_image_rows == 4
    assert samplers["sticky"].prompt_images.patches_per_image == 64
    np.testing.assert_allclose(outputs["sticky"][0], outputs["tight"][0], atol=1e-5)
    np.testing.assert_array_equal(outputs["sticky"][1], outputs["tight"][1])
