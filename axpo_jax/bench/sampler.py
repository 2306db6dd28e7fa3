"""Rollout benchmarks: KV-cache sampling vs transformers' generate, forking a prefix, tool/device overlap.

    python launch.py --config configs/bench.py:sampler        # mode bench_sampler
    python launch.py --config configs/bench.py:fork           # mode bench_fork
    python launch.py --config configs/bench.py:decode_window  # mode bench_decode_window
    python launch.py --config configs/bench.py:tool_overlap   # mode bench_tool_overlap

`bench_sampler`: greedy decoding of `batch` prompts (`prompt_len` tokens, one `image_size`^2 image each) for
`new_tokens` tokens with our `Sampler` (`extend` = prefill, then the on-device `decode` while-loop) and with
transformers' `generate` (`do_sample=False`, the four vision token ids suppressed as the sampler bans them,
`eos_token_id=None` so both run the full length), on the same CPU, the same random model (`forward.build_models`:
built with transformers, saved, loaded with `qwen3_vl.from_pretrained`) and the same prompts. In float32 the
generated tokens must be identical: the fraction of identical rows is reported, and anything below
`min_identical_rows` (1.0) raises `BenchError` after the record has been written to stderr. Both are warmed up
(the Flax compile of extend and decode is reported separately) and timed over `repeats` interleaved runs:
prefill+decode for each, our decode alone (extend timed apart), and `generate` with one new token as
transformers' prefill, so the decode-only rates of both can be compared too. On an accelerator
(`torch_device="auto"`: CUDA when JAX and torch both see a GPU; `dtype="bfloat16"`, `preset="2b"`) the record
adds the decode's achieved bandwidth (the fewest bytes a step must read over its time) beside the device's copy
bandwidth measured in the same run; in bfloat16 the two implementations round differently, so the greedy tokens
drift apart after some steps on a random model: run it with `min_identical_rows=0` and read
`identical_first_token_fraction`, the fp32 runs being the correctness check. Beside them it times the decode
step's products alone (`decode_products_only_s`: the weight products as the decode loop does them, both
attention products over the same cache windows and the LM head, chained in the same kind of on-device loop with
nothing else: no norms, rope, softmax, cache writes or sampling), a floor for any decode loop made of XLA's
kernels on this device, and the ratios to `generate` that floor would give (`*_bound_if_only_products`). On a
CPU it also times the host's BLAS (numpy) reading as many fp32 weights as a decode step reads, in one product of
`batch` rows (`host_blas_weights_step_s`): the fastest a library kernel gets through a step's weights here, and
the ratio to `generate` even a step of nothing but that would give (`*_bound_at_host_blas_speed`).

`bench_fork`: K continuations of each of P long multimodal prefixes (P*K cache rows), two ways:
  fork       - prefill the P prefixes in a P-row cache (a batch-P `extend`), copy each row K times into a
               P*K-row cache with `Sampler.fork` (a gather of the KV rows), decode `new_tokens` tokens;
  re_prefill - prefill P*K copies of the prefixes (a batch-P*K `extend`, every prefix computed K times),
               decode the same way;
  fork_in_place (reported for completeness) - a P*K-row cache whose first P rows get the prefixes and whose
               other rows get empty chunks, then `fork` inside it: the padded [P*K, T] chunk is computed whatever
               its mask, so this costs as much as re-prefilling; forking only saves work when the prefill runs
               at the smaller batch.
Greedy decoding makes all three produce the same tokens (checked, like bench_sampler: a mismatch raises). The
record holds the median seconds of the prefill stage (extend, plus the fork), of the decode and of the total,
and the re-prefill/fork ratios.

`bench_decode_window`: one turn as rollouts decode it, a budget of `max_new_tokens` that every row ends well
before (at a token it writes near step `stop_near`), decoded twice on the same cache: with attention windows that
grow with the rows (the sampler's default) and with one window holding the whole budget (the longest row plus
`max_new_tokens`), interleaved; the greedy tokens must agree, and `whole_turn_over_growing` is the time ratio.

`bench_tool_overlap`: how much tool time the multi-turn `AgentLoop` hides behind device time. A batch of rows
runs `tool_turns` turns that each call a fake tool sleeping `tool_sleep_s`, then answers; the policy is
scripted (its turns are teacher-forced through the real model and KV cache, so every token costs a real decode
step, `think_tokens` filler tokens per turn) on the demo's tiny checkpoint (its processor and config). The
sampler's calls are timed, blocked until the device is done ("device" time includes the host-side input
preparation inside `extend`), and the tool's calls logged, giving the union of device intervals, the union of
tool intervals and the run's wall time: overlap = (device + tool - wall) / tool (host work outside both counts
against it), and the directly measured fraction of tool time during which the device was busy. Two loops run
interleaved on the same rows: the synchronous one (`pipeline_groups=1`: decode every row, run the tools,
extend; overlap ~0, a baseline) and the pipelined one (`pipeline_groups` groups of rows take turns on the device
while the others' tools run). The record's timings are those of each loop's run with the median wall time, and
`synchronous_over_pipelined_wall` their ratio.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import os
import statistics
import sys
import tempfile
import threading
import time
from typing import Any

import numpy as np

from axpo_jax.bench.forward import (
    BenchError,
    _load_average,
    _time,
    build_models,
    device_copy_gbps,
    hf_config_dict,
    host_info,
    host_loaded,
    make_batch,
    torch_device_for,
)


def _logger(mode: str):
    return lambda message: print(f"[{mode}] {message}", file=sys.stderr, flush=True)


def _median(times: list[float]) -> float:
    return round(statistics.median(times), 5)


def _vision_token_ids(hf: dict[str, Any]) -> list[int]:
    return [hf[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")]


def _fail_unless(ok: bool, record: dict, message: str) -> None:
    """A bench of samplers that generate different tokens is worthless: raise after printing the record."""
    if not ok:
        import json

        print(json.dumps(record, default=str), file=sys.stderr, flush=True)
        raise BenchError(message)


def _threads(config) -> int:
    return int(config.get("torch_threads", 0)) or os.cpu_count() or 1


# ---------------------------------------------------------------------------------------------- bench_sampler
# The sampling settings bench_sampler runs (`config.sampling`): greedy is the correctness check against generate;
# "train" and "eval" are the RL rollouts' and the paper's evaluation settings.
SAMPLING_SETTINGS = {
    "greedy": dict(temperature=0.0),
    "train": dict(temperature=1.0),
    "eval": dict(temperature=0.7, top_p=0.8, top_k=20, presence_penalty=1.5),
    "nucleus": dict(temperature=1.0, top_p=0.95),  # top-p alone, as many RL recipes sample
}


def run_sampler(config) -> dict[str, Any]:
    log = _logger("bench_sampler")
    try:
        import torch
    except ImportError as e:
        raise BenchError(f"bench_sampler compares against transformers' generate; pip install -e '.[test]' ({e})")
    import jax

    from axpo_jax.models.qwen3_vl import fused_attention_for
    from axpo_jax.models.qwen3_vl.inputs import bucket
    from axpo_jax.rollout.sampler import Sampler, SamplingParams

    preset, seed = str(config.preset), int(config.get("seed", 0))
    batch, prompt_len, new_tokens = int(config.batch), int(config.prompt_len), int(config.new_tokens)
    image_size, repeats = int(config.image_size), max(1, int(config.repeats))
    min_identical = float(config.get("min_identical_rows", 1.0))
    dtype, device = str(config.get("dtype", "float32")), torch_device_for(str(config.get("torch_device", "cpu")))
    sampling_name = str(config.get("sampling", "greedy"))
    if sampling_name not in SAMPLING_SETTINGS:
        raise BenchError(f"sampling must be one of {sorted(SAMPLING_SETTINGS)}, got {sampling_name!r}")
    sampling = SamplingParams(**SAMPLING_SETTINGS[sampling_name])
    greedy = sampling.temperature == 0

    hf = hf_config_dict(preset)
    prompts, image_tokens = make_batch(hf, batch=batch, seq_len=prompt_len, num_images=1, image_size=image_size,
                                       seed=seed)
    torch.set_num_threads(_threads(config))
    start = time.perf_counter()
    hf_model, flax_model, num_params = build_models(preset, seed, log=log, torch_device=device, dtype=dtype)
    setup_s = time.perf_counter() - start
    attention = fused_attention_for(str(config.get("attention", "auto")), dtype)
    flax_model.use_fused_attention_(attention)

    # generate: no end-of-sequence (every row runs new_tokens), vision tokens never produced, the same sampling
    # settings but the presence penalty, which transformers does not have (it only costs the sampler)
    hf_model.generation_config.eos_token_id = None
    hf_model.generation_config.pad_token_id = 0
    torch_inputs = {k: torch.from_numpy(v).to(device) for k, v in prompts.items()}
    torch_sampling = dict(do_sample=False) if greedy else dict(
        do_sample=True, temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p)

    def torch_generate(n: int) -> np.ndarray:
        with torch.no_grad():
            out = hf_model.generate(**torch_inputs, max_new_tokens=n, **torch_sampling,
                                    suppress_tokens=_vision_token_ids(hf), eos_token_id=None, pad_token_id=0)
        return out[:, prompt_len:].cpu().numpy()  # .cpu() waits for the device

    min_chunk = 16
    sampler = Sampler(flax_model, batch_size=batch, capacity=bucket(prompt_len, min_chunk) + new_tokens,
                      min_chunk=min_chunk)
    key = jax.random.key(seed)
    flax_parts: list[tuple[float, float]] = []  # (extend, decode) seconds of each flax_generate call

    def flax_generate() -> np.ndarray:
        t0 = time.perf_counter()
        logits, cache = jax.block_until_ready(sampler.extend(prompts))
        t1 = time.perf_counter()
        result, _, _ = sampler.decode(logits, cache, key, sampling, new_tokens)  # returns numpy: blocks
        flax_parts.append((t1 - t0, time.perf_counter() - t1))
        return result.tokens_bn

    log(f"warm-up: generate ({torch.get_num_threads()} torch threads), then the Flax compile")
    torch_warmup_s = _time(lambda: torch_generate(new_tokens), 1)[0]
    torch_tokens = torch_generate(new_tokens)
    flax_tokens = flax_generate()
    (flax_first_extend_s, flax_first_decode_s), = flax_parts
    flax_generate()
    if torch_tokens.shape != (batch, new_tokens):
        raise BenchError(f"generate returned {torch_tokens.shape[1]} new tokens per row, expected {new_tokens}")
    traces = dict(sampler.trace_counts)

    products_only = _products_only_runner(sampler, prompts, new_tokens)
    products_only()  # compile
    draws = None if greedy else _draw_runners(sampling, batch, hf["text_config"]["vocab_size"], new_tokens)
    blas_step = _host_blas_weights_step(flax_model.config.text, batch) if jax.default_backend() == "cpu" else None
    log(f"timing {repeats} interleaved runs each of generate, generate(1 token) and extend+decode")
    flax_parts.clear()
    load_before = _load_average()
    torch_times, torch_prefill_times, flax_times, products_times, blas_step_times = [], [], [], [], []
    draw_times = {name: [] for name in draws or ()}
    for _ in range(repeats):
        for name, draw in (draws or {}).items():
            draw_times[name] += _time(draw, 1)
        torch_times += _time(lambda: torch_generate(new_tokens), 1)
        torch_prefill_times += _time(lambda: torch_generate(1), 1)
        flax_times += _time(flax_generate, 1)
        products_times += _time(products_only, 1)
        if blas_step is not None:
            blas_step_times.append(blas_step())
    load_after = _load_average()
    extend_times, decode_times = [p[0] for p in flax_parts], [p[1] for p in flax_parts]

    same_rows = (flax_tokens == torch_tokens).all(axis=1)
    first_diff = [int(np.argmax(f != t)) for f, t in zip(flax_tokens, torch_tokens) if (f != t).any()]
    generated = batch * new_tokens
    torch_s, flax_s = statistics.median(torch_times), statistics.median(flax_times)
    torch_decode_s = max(torch_s - statistics.median(torch_prefill_times), 1e-9)
    flax_decode_s = statistics.median(decode_times)
    # Per decode step: generate(n) - generate(1) is n - 1 forwards (the prefill's logits give the first token),
    # the sampler's decode n (it also feeds its last token, so an extend or fork can go on from its logits).
    torch_step_s, flax_step_s = torch_decode_s / max(new_tokens - 1, 1), flax_decode_s / new_tokens
    extend_s, products_s = statistics.median(extend_times), statistics.median(products_times)
    step_bytes = decode_step_bytes(flax_model.config.text, dtype=dtype, batch=batch,
                                   mean_context=prompt_len + (new_tokens - 1) / 2)
    copy_gbps = device_copy_gbps()
    record = dict(
        mode="bench_sampler",
        preset=preset,
        dtype=dtype,
        attention=attention or "einsum",
        jax_device=_jax_device_kind(),
        torch_device=device,
        num_params=num_params,
        batch=batch,
        prompt_len=prompt_len,
        image_size=image_size,
        image_tokens_per_prompt=image_tokens,
        new_tokens=new_tokens,
        generated_tokens=generated,
        cache_capacity=sampler.capacity,
        repeats=repeats,
        setup_s=round(setup_s, 3),
        sampling=sampling_name,
        sampling_params=dataclasses.asdict(sampling),
        # sampled tokens are not comparable: the check is greedy's
        identical_rows_fraction=float(same_rows.mean()) if greedy else None,
        identical_first_token_fraction=float((flax_tokens[:, 0] == torch_tokens[:, 0]).mean()) if greedy else None,
        first_differing_step_per_bad_row=first_diff if greedy else None,
        torch_warmup_s=round(torch_warmup_s, 3),
        flax_first_extend_s=round(flax_first_extend_s, 3),
        flax_first_decode_s=round(flax_first_decode_s, 3),
        flax_compile_s=round(max(0.0, flax_first_extend_s + flax_first_decode_s - flax_s), 3),
        torch_median_s=_median(torch_times),
        flax_median_s=_median(flax_times),
        torch_times_s=[round(t, 4) for t in torch_times],
        flax_times_s=[round(t, 4) for t in flax_times],
        torch_prefill_median_s=_median(torch_prefill_times),
        flax_extend_median_s=_median(extend_times),
        flax_decode_median_s=_median(decode_times),
        torch_tokens_per_s=round(generated / torch_s, 1),
        flax_tokens_per_s=round(generated / flax_s, 1),
        flax_over_torch_tokens_per_s=round(torch_s / flax_s, 3),
        flax_over_torch_best_run=round(min(torch_times) / min(flax_times), 3),
        torch_decode_only_tokens_per_s=round(batch / torch_step_s, 1),
        flax_decode_only_tokens_per_s=round(batch / flax_step_s, 1),
        flax_over_torch_decode_only=round(torch_step_s / flax_step_s, 3),
        # What the decode loop would reach if a step were its products and nothing else (XLA's kernels, this
        # device): the room left for work on everything else in a step.
        decode_products_only_s=_median(products_times),
        flax_decode_over_products_only=round(flax_decode_s / products_s, 3),
        flax_over_torch_bound_if_only_products=round(torch_s / (extend_s + products_s), 3),
        flax_over_torch_decode_only_bound_if_only_products=round(torch_step_s / (products_s / new_tokens), 3),
        **_host_blas_fields(blas_step_times, torch_s, torch_step_s, extend_s, new_tokens),
        # The fewest bytes a decode step must read (weights once, each row's filled KV cache once) over the
        # measured step time: how close each side runs to the memory bandwidth that bounds decoding.
        decode_min_bytes_per_step=step_bytes,
        torch_decode_gbps=round(step_bytes / torch_step_s / 1e9, 1),
        flax_decode_gbps=round(step_bytes / flax_step_s / 1e9, 1),
        device_copy_gbps=copy_gbps,
        flax_decode_fraction_of_copy_bandwidth=(
            round(step_bytes / flax_step_s / 1e9 / copy_gbps, 3) if copy_gbps else None),
        **_draw_fields(draw_times, new_tokens),
        flax_traces=traces,
        flax_retraced_while_timing=dict(sampler.trace_counts) != traces,
        noisy=max(max(t) / min(t) for t in (torch_times, flax_times)) > 1.5,
        host_loaded=host_loaded(load_before, load_after, log=log),
        host=host_info(load_before, load_after),
    )
    log(f"{sampling_name}: generate {record['torch_tokens_per_s']:.0f} tok/s, sampler "
        f"{record['flax_tokens_per_s']:.0f} tok/s ({record['flax_over_torch_tokens_per_s']:.2f}x; decode only "
        f"{record['flax_over_torch_decode_only']:.2f}x)"
        + (f", identical rows {record['identical_rows_fraction']:.3f}" if greedy else ""))
    if draws:
        log(f"drawing a token: {record['draw_ms_per_step']:.3f} ms a step, a whole-vocabulary draw "
            f"{record['whole_vocabulary_draw_ms_per_step']:.3f} ms ({record['whole_vocabulary_draw_over_draw']:.1f}x)")
    log(f"a decode step takes {record['flax_decode_over_products_only']:.2f}x its products alone; with only the "
        f"products: {record['flax_over_torch_bound_if_only_products']:.2f}x generate (decode only "
        f"{record['flax_over_torch_decode_only_bound_if_only_products']:.2f}x)")
    if record["host_blas_weights_step_s"]:
        log(f"the host's BLAS reads a step's weights in {record['host_blas_weights_step_s'] * 1e3:.3f} ms: a step of "
            f"nothing else would give {record['flax_over_torch_bound_at_host_blas_speed']:.2f}x generate (decode "
            f"only {record['flax_over_torch_decode_only_bound_at_host_blas_speed']:.2f}x)")
    _fail_unless(not greedy or record["identical_rows_fraction"] >= min_identical, record,
                 f"only {same_rows.sum()} of {batch} rows generated the same greedy tokens as transformers "
                 f"(first differences at steps {first_diff}): the sampler does not compute the same model")
    return record


def run_decode_window(config) -> dict[str, Any]:
    """bench_decode_window: one agent turn as rollouts decode it: a budget of `max_new_tokens` that the rows end
    well before (between steps `stop_near / 2` and `stop_near`, see `late_stop_tokens`), decoded with windows that
    grow with the rows (`Sampler.decode_segments`, the default) and with one window over the whole budget (the
    longest row plus `max_new_tokens`: what a single loop must attend over), side by side on the same model, cache
    and prompts."""
    log = _logger("bench_decode_window")
    import jax

    from axpo_jax.rollout.sampler import Sampler, SamplingParams

    preset, seed = str(config.preset), int(config.get("seed", 0))
    batch, prompt_len, image_size = int(config.batch), int(config.prompt_len), int(config.image_size)
    max_new, capacity, stop_near = int(config.max_new_tokens), int(config.capacity), int(config.stop_near)
    repeats, min_identical = max(1, int(config.repeats)), float(config.get("min_identical_rows", 1.0))
    dtype, device = str(config.get("dtype", "float32")), torch_device_for(str(config.get("torch_device", "cpu")))
    hf = hf_config_dict(preset)
    prompts, _ = make_batch(hf, batch=batch, seq_len=prompt_len, num_images=1, image_size=image_size, seed=seed)
    _, model, num_params = build_models(preset, seed, log=log, torch_device=device, dtype=dtype)
    temperature = float(config.get("temperature", 0.0))
    sampling, key = SamplingParams(temperature=temperature), jax.random.key(seed)

    # A random model never writes an end of turn; tokens the rows first write late become stop tokens, so every
    # row ends between step stop_near / 2 and stop_near, as real turns end well before their budget.
    probe = Sampler(model, batch_size=batch, capacity=capacity)
    probe_result, _, _ = probe.decode(*probe.extend(prompts), key, sampling, stop_near + 1)
    stops = late_stop_tokens(probe_result.tokens_bn, stop_near)
    if not stops:
        raise RuntimeError(f"no row writes a token after step {stop_near // 2} that no row wrote before it (the "
                           f"random model repeats itself): try --config.temperature=1.0")
    samplers = {"growing": Sampler(model, batch_size=batch, capacity=capacity, stop_token_ids=stops),
                "whole_turn": Sampler(model, batch_size=batch, capacity=capacity, stop_token_ids=stops,
                                      min_decode_segment=max_new)}
    logits_bv, cache = samplers["growing"].extend(prompts)
    longest = samplers["growing"].longest(cache)
    results = {name: s.decode(logits_bv, cache, key, sampling, max_new)[0] for name, s in samplers.items()}  # compile
    traces = {name: dict(s.trace_counts) for name, s in samplers.items()}
    lengths = results["growing"].lengths_b
    log(f"{batch} rows stop after {lengths.min()}-{lengths.max()} of {max_new} tokens; timing {repeats} "
        f"interleaved runs of each")
    times: dict[str, list[float]] = {name: [] for name in samplers}
    load_before = _load_average()
    for _ in range(repeats):
        for name, s in samplers.items():
            times[name] += _time(lambda s=s: s.decode(logits_bv, cache, key, sampling, max_new), 1)
    load_after = _load_average()
    medians = {name: _median(ts) for name, ts in times.items()}
    identical = float((results["growing"].tokens_bn == results["whole_turn"].tokens_bn).all(axis=1).mean())
    record = dict(
        mode="bench_decode_window",
        preset=preset,
        dtype=dtype,
        jax_device=_jax_device_kind(),
        num_params=num_params,
        batch=batch,
        prompt_len=prompt_len,
        max_new_tokens=max_new,
        temperature=temperature,
        cache_capacity=capacity,
        tokens_per_row=lengths.tolist(),
        # the growing windows a row running to the longest row's length goes through
        windows_growing=[w for w, _ in samplers["growing"].decode_segments(longest, int(lengths.max()))],
        window_whole_turn=samplers["whole_turn"].attention_window(longest, max_new),
        median_s=medians,
        times_s={name: [round(t, 4) for t in ts] for name, ts in times.items()},
        whole_turn_over_growing=round(medians["whole_turn"] / medians["growing"], 3),
        whole_turn_over_growing_best_run=round(min(times["whole_turn"]) / min(times["growing"]), 3),
        identical_rows_fraction=identical,
        traces=traces,
        retraced_while_timing={name: dict(s.trace_counts) for name, s in samplers.items()} != traces,
        noisy=max(max(ts) / min(ts) for ts in times.values()) > 1.5,
        host_loaded=host_loaded(load_before, load_after, log=log),
        host=host_info(load_before, load_after),
    )
    log(f"growing windows {record['windows_growing']}: {medians['growing']:.3f}s; one window of "
        f"{record['window_whole_turn']}: {medians['whole_turn']:.3f}s ({record['whole_turn_over_growing']:.2f}x)")
    _fail_unless(identical >= min_identical, record,
                 f"growing and whole-turn windows generated the same tokens on only {identical:.2f} of the rows")
    return record


def late_stop_tokens(tokens_bn, stop_near: int) -> list[int]:
    """Stop tokens that end each row between step `stop_near // 2` and `stop_near`: per row, the token it writes
    closest before `stop_near` that no row writes before `stop_near // 2` (so no row ends earlier). A row that
    only repeats earlier tokens gets none and runs to its budget (random models in bf16 fall into such loops)."""
    tokens_bn = np.asarray(tokens_bn)
    early = set(tokens_bn[:, :stop_near // 2].ravel().tolist())
    stops = set()
    for row_n in tokens_bn[:, stop_near // 2:stop_near + 1]:
        late = [int(t) for t in row_n[::-1] if int(t) not in early]
        if late:
            stops.add(late[0])
    return sorted(stops)


def _products_only_runner(sampler, prompts, steps: int):
    """A no-argument function that runs `steps` iterations of the decode step's products alone on the sampler's
    decode model and a cache prefilled with `prompts` (see the module docstring), blocking until done. Like the
    decode loop, the iterations run in segments over the same cache windows (`Sampler.decode_segments`)."""
    import jax
    import jax.numpy as jnp

    logits_bv, cache = sampler.extend(prompts)
    segments = tuple(sampler.decode_segments(sampler.longest(cache), steps))
    model = sampler._decoding_model()
    b, d = logits_bv.shape[0], model.config.text.hidden_size
    dtype = model.model.language_model.embed_tokens.weight.dtype
    h0_bd = jax.random.normal(jax.random.key(0), (b, d), jnp.float32).astype(dtype)

    @jax.jit
    def loop(model, keys, values, h0_bd):
        text = model.model.language_model

        def products(h_bd, window):
            for layer, decoder_layer in enumerate(text.layers):
                attn = decoder_layer.self_attn
                q_bd = attn.project(h_bd)[0]
                k_bkes, v_bkse = keys[layer][..., :window], values[layer][:, :, :window]
                kv_heads, e = k_bkes.shape[1], k_bkes.shape[2]
                q_bkge = q_bd.reshape(b, kv_heads, -1, e)
                scores_bkgs = jnp.einsum("bkge,bkes->bkgs", q_bkge, k_bkes)
                out_bd = jnp.einsum("bkgs,bkse->bkge", scores_bkgs, v_bkse).reshape(b, -1)
                h_bd = h_bd + attn.o_proj(out_bd)
                h_bd = h_bd + decoder_layer.mlp(h_bd)
            return model.logits(h_bd)

        def step(h_bd, window):
            # the next step depends on this one's result (else XLA could hoist it) but stays near h0
            return h0_bd + 1e-6 * products(h_bd, window)[:, :1].astype(h_bd.dtype)

        h_bd = h0_bd
        for window, segment_steps in segments:
            h_bd = jax.lax.fori_loop(0, segment_steps, lambda _, h, window=window: step(h, window), h_bd)
        return h_bd

    return lambda: jax.block_until_ready(loop(model, cache.keys, cache.values, h0_bd))


def _host_blas_weights_step(text_config, batch: int):
    """A no-argument function returning the seconds numpy (the host's BLAS, every core) takes to multiply `batch`
    rows by as many fp32 weights as one decode step reads (the decoder's matrices and the LM head), laid out as one
    [hidden, n] matrix so a single call reads them all: best of 20 calls, after a warm-up."""
    from axpo_jax.bench.record import decoder_matmul_params

    hidden = text_config.hidden_size
    rng = np.random.default_rng(0)
    weights = rng.standard_normal((hidden, -(-decoder_matmul_params(text_config) // hidden)), np.float32)
    rows = rng.standard_normal((batch, hidden), np.float32)

    def best_of_20() -> float:
        rows @ weights
        return min(_time(lambda: rows @ weights, 20))

    return best_of_20


def _host_blas_fields(step_times: list[float], torch_s: float, torch_step_s: float, extend_s: float,
                      new_tokens: int) -> dict[str, Any]:
    if not step_times:
        return dict(host_blas_weights_step_s=None)
    step_s = statistics.median(step_times)
    return dict(
        host_blas_weights_step_s=round(step_s, 6),
        flax_over_torch_bound_at_host_blas_speed=round(torch_s / (extend_s + new_tokens * step_s), 3),
        flax_over_torch_decode_only_bound_at_host_blas_speed=round(torch_step_s / step_s, 3),
    )


def _draw_runners(sampling, batch: int, vocab: int, steps: int) -> dict:
    """No-argument functions that each draw `steps` tokens for `batch` rows of `vocab` logits in an on-device loop
    (each step's logits depend on the last draw, so nothing is hoisted): the sampler's `sample_tokens`, and the
    whole-vocabulary draw it replaces (`filter_logits` then one Gumbel number per entry), compiled and warm."""
    import jax
    import jax.numpy as jnp

    from axpo_jax.rollout.sampler import filter_logits, sample_tokens

    def loop_of(draw):
        @jax.jit
        def loop(key, logits_bv):
            def step(_, carry):
                key, drawn_b = carry
                key, sub = jax.random.split(key)
                return key, draw(logits_bv + 1e-9 * drawn_b[:, None].astype(logits_bv.dtype), sub)
            return jax.lax.fori_loop(0, steps, step, (key, jnp.zeros((batch,), jnp.int32)))[1]

        key, logits_bv = jax.random.key(0), jax.random.normal(jax.random.key(1), (batch, vocab), jnp.float32)
        jax.block_until_ready(loop(key, logits_bv))
        return lambda: jax.block_until_ready(loop(key, logits_bv))

    return {
        "draw": loop_of(lambda x, k: sample_tokens(x, k, sampling)),
        "whole_vocabulary_draw": loop_of(
            lambda x, k: jax.random.categorical(k, filter_logits(x, sampling), axis=-1).astype(jnp.int32)),
    }


def _draw_fields(draw_times: dict[str, list[float]], steps: int) -> dict[str, Any]:
    if not draw_times:
        return {}
    ms = {name: statistics.median(t) / steps * 1e3 for name, t in draw_times.items()}
    return dict(draw_ms_per_step=round(ms["draw"], 4),
                whole_vocabulary_draw_ms_per_step=round(ms["whole_vocabulary_draw"], 4),
                whole_vocabulary_draw_over_draw=round(ms["whole_vocabulary_draw"] / ms["draw"], 2))


def decode_step_bytes(text_config, *, dtype: str, batch: int, mean_context: float) -> int:
    """Bytes one decode step must read at least: the decoder's matmul weights and the LM head once (the embedding
    row gather and the norms are negligible), plus K and V of every filled cache slot of every row."""
    from axpo_jax.bench.record import decoder_matmul_params

    itemsize = np.dtype(np.float32).itemsize if dtype == "float32" else 2
    t = text_config
    kv_per_token = 2 * t.num_hidden_layers * t.num_key_value_heads * t.head_dim
    return int(itemsize * (decoder_matmul_params(t) + batch * mean_context * kv_per_token))


def _jax_device_kind() -> str:
    import jax

    return jax.devices()[0].device_kind


# ------------------------------------------------------------------------------------------------- bench_fork
def _take_rows(batch: dict[str, np.ndarray], rows: list[int | None]) -> dict[str, np.ndarray]:
    """Processor-shaped arrays whose row r is row rows[r] of `batch` (None: an empty chunk), images following."""
    per_image = np.asarray(batch["image_grid_thw"]).prod(-1)
    starts = np.concatenate([[0], np.cumsum(per_image)])
    images_per_row = len(per_image) // len(batch["input_ids"])  # make_batch: the same count in every row
    ids = np.zeros((len(rows), batch["input_ids"].shape[1]), batch["input_ids"].dtype)
    mask, types = np.zeros_like(ids), np.zeros_like(ids)
    images = []
    for r, source in enumerate(rows):
        if source is None:
            continue
        ids[r], mask[r] = batch["input_ids"][source], batch["attention_mask"][source]
        types[r] = batch["mm_token_type_ids"][source]
        images += range(source * images_per_row, (source + 1) * images_per_row)
    return dict(input_ids=ids, attention_mask=mask, mm_token_type_ids=types,
                pixel_values=np.concatenate([batch["pixel_values"][starts[i]:starts[i + 1]] for i in images]),
                image_grid_thw=np.asarray(batch["image_grid_thw"])[images])


def run_fork(config) -> dict[str, Any]:
    log = _logger("bench_fork")
    import jax

    from axpo_jax.models.qwen3_vl.inputs import bucket
    from axpo_jax.rollout.sampler import Sampler, SamplingParams

    preset, seed = str(config.preset), int(config.get("seed", 0))
    prefixes, k, new_tokens = int(config.prefixes), int(config.k), int(config.new_tokens)
    prefix_len, num_images, image_size = int(config.prefix_len), int(config.num_images), int(config.image_size)
    repeats = max(1, int(config.repeats))
    rows = prefixes * k
    sources = [p for p in range(prefixes) for _ in range(k)]  # row r continues prefix sources[r]

    hf = hf_config_dict(preset)
    prefix_batch, image_tokens = make_batch(hf, batch=prefixes, seq_len=prefix_len, num_images=num_images,
                                            image_size=image_size, seed=seed)
    copies = _take_rows(prefix_batch, sources)
    in_place = _take_rows(prefix_batch, list(range(prefixes)) + [None] * (rows - prefixes))
    _, model, num_params = build_models(preset, seed, log=log)
    min_chunk = 16
    capacity = bucket(prefix_len, min_chunk) + new_tokens
    small = Sampler(model, batch_size=prefixes, capacity=capacity, min_chunk=min_chunk)
    large = Sampler(model, batch_size=rows, capacity=capacity, min_chunk=min_chunk)
    greedy, key = SamplingParams(temperature=0.0), jax.random.key(seed)

    def fork():
        return jax.block_until_ready(Sampler.fork(*small.extend(prefix_batch), sources))

    def re_prefill():
        return jax.block_until_ready(large.extend(copies))

    def fork_in_place():
        return jax.block_until_ready(Sampler.fork(*large.extend(in_place), sources))

    variants = dict(fork=fork, re_prefill=re_prefill)
    if config.get("fork_in_place", True):
        variants["fork_in_place"] = fork_in_place
    times = {name: dict(prefill=[], decode=[], total=[]) for name in variants}
    tokens, first_logits = {}, {}

    def timed(name: str, first: bool = False):
        t0 = time.perf_counter()
        logits, cache = variants[name]()
        t1 = time.perf_counter()
        result, _, _ = large.decode(logits, cache, key, greedy, new_tokens)
        t2 = time.perf_counter()
        if first:
            tokens[name], first_logits[name] = result.tokens_bn, np.asarray(logits)
            return t2 - t0
        times[name]["prefill"].append(t1 - t0)
        times[name]["decode"].append(t2 - t1)
        times[name]["total"].append(t2 - t0)

    log(f"warm-up (compiles): {prefixes} prefixes of {prefix_len} tokens ({num_images} images of {image_tokens} "
        f"tokens each) -> {rows} rows, {new_tokens} new tokens")
    first_call_s = {name: round(timed(name, first=True), 3) for name in variants}
    traces = dict(small.trace_counts + large.trace_counts)
    log(f"timing {repeats} interleaved runs of {', '.join(variants)}")
    load_before = _load_average()
    for _ in range(repeats):
        for name in variants:
            timed(name)
    load_after = _load_average()

    reference = tokens["re_prefill"]
    identical = {name: float((tokens[name] == reference).all(axis=1).mean()) for name in variants}
    groups_agree = bool((reference == reference[[sources.index(s) for s in sources]]).all())
    medians = {name: {stage: _median(ts) for stage, ts in stages.items()} for name, stages in times.items()}
    record = dict(
        mode="bench_fork",
        preset=preset,
        dtype="float32",
        num_params=num_params,
        prefixes=prefixes,
        k=k,
        rows=rows,
        prefix_len=prefix_len,
        num_images_per_prefix=num_images,
        image_tokens_per_image=image_tokens,
        new_tokens=new_tokens,
        cache_capacity=capacity,
        repeats=repeats,
        prefill_tokens={name: n for name, n in (("fork", prefixes * prefix_len), ("re_prefill", rows * prefix_len),
                                                 ("fork_in_place", rows * bucket(prefix_len, min_chunk)))
                        if name in variants},  # computed (padding included), not just real
        first_call_s=first_call_s,
        median_s=medians,
        times_s={name: {stage: [round(t, 4) for t in ts] for stage, ts in stages.items()}
                 for name, stages in times.items()},
        re_prefill_over_fork_prefill=round(medians["re_prefill"]["prefill"] / medians["fork"]["prefill"], 3),
        re_prefill_over_fork_total=round(medians["re_prefill"]["total"] / medians["fork"]["total"], 3),
        # fastest run of each: less sensitive to other load on a small shared host
        re_prefill_over_fork_prefill_best_run=round(min(times["re_prefill"]["prefill"]) /
                                                    min(times["fork"]["prefill"]), 3),
        re_prefill_over_fork_total_best_run=round(min(times["re_prefill"]["total"]) / min(times["fork"]["total"]), 3),
        noisy=max(max(ts) / min(ts) for stages in times.values() for ts in stages.values()) > 1.5,
        fork_in_place_over_fork_prefill=(round(medians["fork_in_place"]["prefill"] / medians["fork"]["prefill"], 3)
                                         if "fork_in_place" in medians else None),
        identical_rows_fraction=identical,
        rows_of_a_prefix_agree=groups_agree,
        max_abs_first_logits_diff={name: float(np.max(np.abs(first_logits[name] - first_logits["re_prefill"])))
                                   for name in variants},
        traces=traces,
        retraced_while_timing=dict(small.trace_counts + large.trace_counts) != traces,
        host_loaded=host_loaded(load_before, load_after, log=log),
        host=host_info(load_before, load_after),
    )
    log(f"prefill: fork {medians['fork']['prefill']:.3f}s, re-prefill {medians['re_prefill']['prefill']:.3f}s "
        f"({record['re_prefill_over_fork_prefill']:.2f}x median, {record['re_prefill_over_fork_prefill_best_run']:.2f}x "
        f"best run); total {record['re_prefill_over_fork_total']:.2f}x")
    _fail_unless(min(identical.values()) == 1.0 and groups_agree, record,
                 f"forked and re-prefilled rows generated different greedy tokens ({identical}, rows of a prefix "
                 f"agree: {groups_agree})")
    return record


# ----------------------------------------------------------------------------------------- bench_tool_overlap
class SleepTool:
    """A tool that sleeps: stands for a tool whose time is spent off the device (a search, a python cell).
    Logs the (start, end) of every call."""

    name = "sleep"
    schema = {"type": "function", "function": {
        "name": "sleep", "description": "Waits a moment.",
        "parameters": {"type": "object", "properties": {}, "required": []}}}

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.intervals: list[tuple[float, float]] = []
        self._lock = threading.Lock()

    def __call__(self, arguments, context):
        from axpo_jax.tools.base import Observation

        start = time.perf_counter()
        time.sleep(self.seconds)
        with self._lock:
            self.intervals.append((start, time.perf_counter()))
        return Observation(text="done")

    def close_session(self, session_id: str) -> None:
        pass


def _union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[tuple[float, float]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def _length(intervals: list[tuple[float, float]]) -> float:
    return sum(end - start for start, end in _union(intervals))


def _intersection(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> float:
    """Seconds covered by both sets of intervals."""
    a, b = _union(a), _union(b)
    i = j = 0
    total = 0.0
    while i < len(a) and j < len(b):
        total += max(0.0, min(a[i][1], b[j][1]) - max(a[i][0], b[j][0]))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return total


_FORCED_TRACES: collections.Counter = collections.Counter()


@functools.cache
def _forced_decode_fn():
    import jax
    import jax.numpy as jnp
    from flax import nnx

    @nnx.jit
    def forced_decode(model, logits_bv, cache, tokens_bw, running_bw):
        """Feeds the given tokens through decode steps (teacher forcing): the device work of sampling them,
        with each token's log-prob under the model; a row's logits stay put once it stops running."""
        _FORCED_TRACES["forced_decode"] += 1

        def step(carry, x):
            logits, cache = carry
            token, running = x
            logprob = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), token[:, None], -1)[:, 0]
            new_logits, cache = model.decode_step(token, cache, running)
            return (jnp.where(running[:, None], new_logits, logits), cache), jnp.where(running, logprob, 0.0)

        (logits_bv, cache), logprobs_wb = jax.lax.scan(step, (logits_bv, cache), (tokens_bw.T, running_bw.T))
        return logits_bv, cache, logprobs_wb.T

    return forced_decode


def with_scripts(turn_loop, sampler, scripts):
    """Drives one row group's turn loop (`AgentLoop._turn_loop`) with its rows' scripts on a scripted sampler
    that the groups share: the scripts are put back on the sampler whenever this group resumes."""
    outcomes = None
    while True:
        sampler.scripts = scripts
        try:
            future = turn_loop.send(outcomes)
        except StopIteration as done:
            return done.value
        outcomes = yield future


def _scripted_sampler_class():
    import jax
    import jax.numpy as jnp

    from axpo_jax.models.qwen3_vl.inputs import bucket
    from axpo_jax.rollout.sampler import DecodeResult, Sampler

    class ScriptedSampler(Sampler):
        """Writes scripted turns (one list of token-id lists per row) through the real model and cache, and logs
        the (start, end) of every extend and decode, each blocked until the device has finished."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.scripts: list[list[list[int]]] = []
            self.intervals: list[tuple[float, float]] = []

        def extend(self, batch, cache=None, logits_bv=None):
            start = time.perf_counter()
            out = jax.block_until_ready(super().extend(batch, cache, logits_bv))
            self.intervals.append((start, time.perf_counter()))
            return out

        def decode(self, logits_bv, cache, rng, params, max_new_tokens, active_b=None, max_new_b=None):
            start = time.perf_counter()
            active = np.ones(self.batch_size, bool) if active_b is None else np.asarray(active_b, bool)
            limits = np.full(self.batch_size, max_new_tokens) if max_new_b is None else np.asarray(max_new_b)
            turns = [script.pop(0)[:limits[b]] if active[b] and script else []
                     for b, script in enumerate(self.scripts)]
            lengths = np.array([len(t) for t in turns], np.int32)
            width = min(bucket(int(lengths.max()), self.min_chunk), max_new_tokens)
            tokens = np.full((self.batch_size, width), self.pad_id, np.int32)
            for b, turn in enumerate(turns):
                tokens[b, : len(turn)] = turn
            running = np.arange(width)[None] < lengths[:, None]
            logits_bv, cache, logprobs = jax.block_until_ready(
                _forced_decode_fn()(self.model, logits_bv, cache, jnp.asarray(tokens), jnp.asarray(running)))
            pad = ((0, 0), (0, max_new_tokens - width))
            result = DecodeResult(np.pad(tokens, pad, constant_values=self.pad_id), np.pad(np.asarray(logprobs), pad),
                                  lengths, lengths > 0)  # every scripted turn ends in a stop token or sequence
            self.intervals.append((start, time.perf_counter()))
            return result, logits_bv, cache

    return ScriptedSampler


def run_tool_overlap(config) -> dict[str, Any]:
    log = _logger("bench_tool_overlap")
    import jax

    from axpo_jax.data.processor import load_processor
    from axpo_jax.data.tiny_processor import build_tiny_processor
    from PIL import Image
    from axpo_jax.models.qwen3_vl.tiny import tiny_config_dict
    from axpo_jax.rollout.agent_loop import AgentLoop, Task
    from axpo_jax.rollout.sampler import SamplingParams
    from axpo_jax.tools.executor import ToolExecutor
    from axpo_jax.tools.registry import ToolRegistry

    seed = int(config.get("seed", 0))
    tasks_n, samples = int(config.tasks), int(config.samples)
    tool_turns, sleep_s = int(config.tool_turns), float(config.tool_sleep_s)
    think_tokens, repeats = int(config.think_tokens), max(1, int(config.repeats))
    rows = tasks_n * samples

    with tempfile.TemporaryDirectory(prefix="axpo_bench_") as folder:
        # the demo's tiny checkpoint (`demo.build_tiny_checkpoint`), its weights initialized by transformers: much
        # faster on a small CPU than the eager Flax init, which compiles one program per parameter shape
        special = build_tiny_processor(folder, patch_size=8, min_pixels=32 * 32, max_pixels=96 * 96)
        processor = load_processor(folder)
    config_dict = tiny_config_dict(vocab_size=special["vocab_size"], patch_size=8, num_position_embeddings=64,
                                   special_token_ids=special)
    _, model, num_params = build_models(config_dict, seed, log=log)
    tokenizer = processor.tokenizer

    def encode(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False)

    filler = (encode(" hmm") * think_tokens)[:think_tokens]
    call = '<tool_call>\n{"name": "sleep", "arguments": {}}\n</tool_call>'
    tool_turn = encode("<think>\n") + filler + encode("\n</think>\n" + call)
    answer_turn = encode("<think>\n") + filler + encode("\n</think>\n<answer>\\boxed{7}</answer>")
    turn_tokens = max(len(tool_turn), len(answer_turn))

    tool = SleepTool(sleep_s)
    executor = ToolExecutor(ToolRegistry([tool]), max_workers=rows, timeout_s=max(10.0, 10 * sleep_s))
    ScriptedSampler = _scripted_sampler_class()

    class ScriptedLoop(AgentLoop):
        """Every row group shares the one scripted sampler of its batch size; each group's turn loop puts its
        own rows' scripts on it whenever it resumes (the groups take turns, never at once)."""

        def sampler(self, batch_size):
            if batch_size not in self._samplers:
                self._samplers[batch_size] = ScriptedSampler(
                    self.model, batch_size=batch_size, capacity=self.capacity, pad_id=self.pad_id)
            return self._samplers[batch_size]

        def _turn_loop(self, sampler, trajectories, *args):
            scripts = [[list(tool_turn)] * tool_turns + [list(answer_turn)] for _ in trajectories]
            return with_scripts(super()._turn_loop(sampler, trajectories, *args), sampler, scripts)

    max_new = 1 << (turn_tokens - 1).bit_length()
    groups = int(config.get("pipeline_groups", 2))
    if rows % groups:
        raise BenchError(f"rows ({rows}) must split into pipeline_groups ({groups}) equal groups")
    loops = {name: ScriptedLoop(model, processor, executor, max_turns=tool_turns + 1,
                                max_new_tokens_per_turn=max_new, capacity=int(config.capacity),
                                pipeline_groups=g, log=lambda message: None)
             for name, g in (("synchronous", 1), ("pipelined", groups))}
    rng = np.random.default_rng(seed)
    tasks = [Task("Which digit?", [Image.fromarray(rng.integers(0, 255, (96, 96, 3), dtype=np.uint8))], "7")
             for _ in range(tasks_n)]

    def one_run(name: str) -> dict[str, Any]:
        loop = loops[name]
        sampler = loop.sampler(rows // loop.pipeline_groups)
        sampler.intervals, tool.intervals = [], []
        executor.reset_stats()
        start = time.perf_counter()
        rollout = loop.run(tasks, samples, jax.random.key(seed), SamplingParams(temperature=0.0))
        wall = time.perf_counter() - start
        trajectories = rollout.trajectories
        reasons = sorted({t.finish_reason for t in trajectories})
        statuses = sorted({s for t in trajectories for turn in t.turns for s in turn.statuses})
        if reasons != ["answer"] or statuses != ["ok"] or len(tool.intervals) != rows * tool_turns:
            raise BenchError(f"the scripted rollout went wrong: finish reasons {reasons}, tool statuses {statuses}, "
                             f"{len(tool.intervals)} tool calls (expected {rows * tool_turns})")
        device, tools = _length(sampler.intervals), _length(tool.intervals)
        return dict(wall_s=wall, device_s=device, tool_s=tools,
                    tool_call_s_sum=sum(end - s for s, end in tool.intervals),
                    host_other_s=wall - _length(sampler.intervals + tool.intervals),
                    overlap=(device + tools - wall) / tools,
                    overlap_measured=_intersection(sampler.intervals, tool.intervals) / tools,
                    sampler_calls=len(sampler.intervals),
                    tokens=int(sum(len(t.token_ids) for t in trajectories)))

    def traces():
        return sum((s.trace_counts for loop in loops.values() for s in loop._samplers.values()),
                   collections.Counter()) + _FORCED_TRACES

    log(f"warm-up runs (compile): {rows} rows, {tool_turns} tool turns of {turn_tokens} tokens, "
        f"tool sleeps {sleep_s}s, pipelined in {groups} groups")
    warmup = {name: one_run(name) for name in loops}
    traces_before = traces()
    log(f"timing {repeats} run(s) of each loop, interleaved")
    load_before = _load_average()
    runs: dict[str, list] = {name: [] for name in loops}
    for _ in range(repeats):
        for name in loops:
            runs[name].append(one_run(name))
    load_after = _load_average()
    executor.close()

    def summary(name: str) -> dict[str, Any]:
        median_run = sorted(runs[name], key=lambda r: r["wall_s"])[len(runs[name]) // 2]  # numbers that belong together
        return dict(
            warmup_wall_s=round(warmup[name]["wall_s"], 3),
            **{k: round(v, 4) if isinstance(v, float) else v for k, v in median_run.items()},
            runs=[{k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()} for r in runs[name]],
        )

    synchronous, pipelined = summary("synchronous"), summary("pipelined")
    record = dict(
        mode="bench_tool_overlap",
        num_params=num_params,
        rows=rows,
        tasks=tasks_n,
        samples=samples,
        tool_turns=tool_turns,
        policy_turns=tool_turns + 1,
        tokens_per_turn=turn_tokens,
        tool_sleep_s=sleep_s,
        repeats=repeats,
        pipeline_groups=groups,
        synchronous=synchronous,
        pipelined=pipelined,
        synchronous_over_pipelined_wall=round(synchronous["wall_s"] / pipelined["wall_s"], 3),
        overlap=pipelined["overlap"],
        overlap_measured=pipelined["overlap_measured"],
        retraced_while_timing=traces() != traces_before,
        host_loaded=host_loaded(load_before, load_after, log=log),
        host=host_info(load_before, load_after),
    )
    for name, r in (("synchronous", synchronous), ("pipelined", pipelined)):
        log(f"{name}: wall {r['wall_s']:.3f}s = device {r['device_s']:.3f}s + tools {r['tool_s']:.3f}s + host "
            f"{r['host_other_s']:.3f}s; overlap {r['overlap']:.3f} (measured {r['overlap_measured']:.3f})")
    log(f"synchronous / pipelined wall time: {record['synchronous_over_pipelined_wall']:.2f}x")
    return record
