"""Mode `bench_forward`: the jitted Flax forward against transformers' PyTorch forward, same CPU, same weights.

    python launch.py --config configs/bench.py:forward [--config.preset=small --config.batch=2 ...]

A small random Qwen3-VL is built with transformers, saved with `save_pretrained` and loaded back with
`qwen3_vl.from_pretrained`, so both implementations hold identical float32 weights. Both get the same batch
(`batch` samples of `seq_len` tokens, `num_images` images of `image_size`^2 pixels per sample), are warmed up
(the Flax warm-up is the jit compile, reported separately) and timed over `repeats` interleaved runs. The record
holds the median seconds and tokens/s of each, their ratio (and the best-run ratio, less sensitive to other load
on a small shared host), the median of the same forward through plain `jax.jit` on the split state (the gap to
`nnx.jit` is nnx's per-call Python overhead), and the max-abs logits difference over the real tokens,
which must stay below `max_logits_diff` (1e-4): a bench of a model that computes something else is worthless,
so a larger difference raises `BenchError` after the record has been written to stderr.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import tempfile
import time
from typing import Any

import numpy as np

from axpo_jax import modes

# Sizes of the random models (a config.json-shaped dict is built from these by `hf_config_dict`). Special token
# ids sit at the top of the small vocabulary.
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "micro": dict(
        text=dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16),
        vision=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=8,
                    num_position_embeddings=64, deepstack_visual_indexes=[0]),
    ),
    "tiny": dict(
        text=dict(vocab_size=4096, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                  num_attention_heads=8, num_key_value_heads=2, head_dim=32),
        vision=dict(depth=2, hidden_size=128, intermediate_size=512, num_heads=4, patch_size=16,
                    num_position_embeddings=256, deepstack_visual_indexes=[0, 1]),
    ),
    "small": dict(
        text=dict(vocab_size=16384, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                  num_attention_heads=8, num_key_value_heads=4, head_dim=64),
        vision=dict(depth=4, hidden_size=256, intermediate_size=1024, num_heads=4, patch_size=16,
                    num_position_embeddings=576, deepstack_visual_indexes=[0, 1, 2]),
    ),
    # Qwen3-VL-2B's published shapes (its config.json), random weights: for accelerator runs (bf16, GPU / TPU).
    "2b": dict(
        text=dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                  num_attention_heads=16, num_key_value_heads=8, head_dim=128),
        vision=dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16, patch_size=16,
                    num_position_embeddings=2304, deepstack_visual_indexes=[5, 11, 17]),
        tie_word_embeddings=True,
    ),
}

_TORCH_MISSING = "bench_forward compares against transformers' PyTorch model; pip install -e '.[test]'"


class BenchError(modes.ModeError, RuntimeError):
    """The benchmark cannot run, or the two implementations disagree. A ModeError, so launch.py prints it as one
    line."""


def _log(message: str) -> None:
    print(f"[bench_forward] {message}", file=sys.stderr, flush=True)


def _mrope_section(head_dim: int) -> list[int]:
    """Qwen3-VL's (24, 20, 20) split of head_dim/2 frequencies, scaled to a smaller head."""
    half = head_dim // 2
    h = w = round(half * 20 / 64)
    return [half - h - w, h, w]


def hf_config_dict(preset: str) -> dict[str, Any]:
    """A transformers Qwen3-VL config (as a dict) for one of `PRESETS`."""
    if preset not in PRESETS:
        raise BenchError(f"unknown bench_forward preset {preset!r}; known: {sorted(PRESETS)}")
    text, vision = dict(PRESETS[preset]["text"]), dict(PRESETS[preset]["vision"])
    vocab = text["vocab_size"]
    text.update(
        hidden_act="silu",
        rms_norm_eps=1e-6,
        max_position_embeddings=32768,
        rope_parameters=dict(rope_type="default", rope_theta=5_000_000.0,
                             mrope_section=_mrope_section(text["head_dim"]), mrope_interleaved=True),
    )
    vision.update(hidden_act="gelu_pytorch_tanh", in_channels=3, temporal_patch_size=2, spatial_merge_size=2,
                  out_hidden_size=text["hidden_size"])
    return dict(
        model_type="qwen3_vl",
        text_config=text,
        vision_config=vision,
        vision_start_token_id=vocab - 4,
        vision_end_token_id=vocab - 3,
        image_token_id=vocab - 2,
        video_token_id=vocab - 1,
        tie_word_embeddings=bool(PRESETS[preset].get("tie_word_embeddings", False)),
    )


def make_batch(hf: dict[str, Any], *, batch: int, seq_len: int, num_images: int, image_size: int, seed: int):
    """Processor-shaped numpy inputs: per sample, `num_images` x (<vision_start> image tokens <vision_end>)
    blocks separated by random text, then random text up to `seq_len`; all tokens are real (mask of ones)."""
    vision = hf["vision_config"]
    patch, merge, tp = vision["patch_size"], vision["spatial_merge_size"], vision["temporal_patch_size"]
    if image_size % (patch * merge):
        raise BenchError(f"image_size={image_size} must be a multiple of patch_size*spatial_merge_size={patch * merge}")
    side = image_size // patch
    grid = (1, side, side)  # one temporal patch: an image (the processor repeats it Tp times)
    image_tokens = side * side // (merge * merge)
    block = image_tokens + 2
    lead = 3  # text before the first image
    needed = lead + num_images * (block + 1)
    if needed > seq_len:
        raise BenchError(f"seq_len={seq_len} is too short for {num_images} image(s) of {image_tokens} tokens "
                         f"(needs at least {needed})")
    rng = np.random.default_rng(seed)
    vocab = hf["text_config"]["vocab_size"]
    input_ids = rng.integers(0, hf["vision_start_token_id"], size=(batch, seq_len)).astype(np.int64)
    mm_token_type_ids = np.zeros((batch, seq_len), np.int64)
    for b in range(batch):
        pos = lead
        for _ in range(num_images):
            input_ids[b, pos] = hf["vision_start_token_id"]
            input_ids[b, pos + 1 : pos + 1 + image_tokens] = hf["image_token_id"]
            mm_token_type_ids[b, pos + 1 : pos + 1 + image_tokens] = 1
            input_ids[b, pos + 1 + image_tokens] = hf["vision_end_token_id"]
            pos += block + 1  # one text token between images
    assert input_ids.max() < vocab
    n_images = batch * num_images
    patch_dim = vision["in_channels"] * tp * patch * patch
    pixel_values = rng.standard_normal((n_images * side * side, patch_dim), dtype=np.float32)
    return dict(
        input_ids=input_ids,
        attention_mask=np.ones((batch, seq_len), np.int64),
        pixel_values=pixel_values,
        image_grid_thw=np.tile(np.asarray(grid, np.int64), (n_images, 1)),
        mm_token_type_ids=mm_token_type_ids,
    ), image_tokens


def _time(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def run(config) -> dict[str, Any]:
    try:
        import torch
    except ImportError as e:
        raise BenchError(f"{_TORCH_MISSING} ({e})") from None

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from axpo_jax.models import qwen3_vl

    preset = str(config.preset)
    batch, seq_len = int(config.batch), int(config.seq_len)
    num_images, image_size = int(config.num_images), int(config.image_size)
    repeats = max(1, int(config.repeats))
    seed = int(config.get("seed", 0))
    tolerance = float(config.get("max_logits_diff", 1e-4))
    threads = int(config.get("torch_threads", 0)) or os.cpu_count() or 1

    hf = hf_config_dict(preset)
    inputs_np, image_tokens = make_batch(hf, batch=batch, seq_len=seq_len, num_images=num_images,
                                         image_size=image_size, seed=seed)

    t0 = time.perf_counter()
    torch.set_num_threads(threads)
    hf_model, flax_model, num_params = build_models(preset, seed)
    setup_s = time.perf_counter() - t0

    torch_inputs = {k: torch.from_numpy(v) for k, v in inputs_np.items()}

    def torch_forward():
        with torch.no_grad():
            return hf_model(**torch_inputs).logits

    forward = nnx.jit(lambda m, x: m.forward(x))

    def flax_inputs():
        # timed with the forward: transformers' forward computes its rope positions and vision indices each call
        return jax.tree.map(jnp.asarray, qwen3_vl.prepare_inputs(flax_model.config, **inputs_np))

    def flax_forward():
        return jax.block_until_ready(forward(flax_model, flax_inputs()))

    # The same computation through plain jax.jit on the split state: nnx.jit walks the module graph on every
    # call, a per-call Python cost that is visible on small models; the difference isolates it.
    graphdef, state = nnx.split(flax_model)
    forward_split = jax.jit(lambda state, x: nnx.merge(graphdef, state).forward(x))

    def flax_split_forward():
        return jax.block_until_ready(forward_split(state, flax_inputs()))

    _log(f"torch warm-up ({threads} threads)")
    start = time.perf_counter()
    torch_logits = torch_forward().numpy()
    torch_warmup_s = time.perf_counter() - start
    torch_forward()  # a second warm-up call: the first one also pays for lazy allocations

    _log("flax compile + first run")
    start = time.perf_counter()
    flax_logits = np.asarray(flax_forward())
    flax_first_s = time.perf_counter() - start
    flax_forward()
    split_logits = np.asarray(flax_split_forward())
    flax_split_forward()
    if not np.array_equal(split_logits, flax_logits):
        raise BenchError("nnx.jit and jax.jit on the split state gave different logits")

    mask = inputs_np["attention_mask"].astype(bool)
    diff = float(np.max(np.abs(flax_logits[mask] - torch_logits[mask])))
    _log(f"max |logits diff| over real tokens: {diff:.3g}")

    # Interleaved, so that both see the same background load: on a shared 2-core box a competing process slows
    # torch's OpenMP barriers far more than XLA's thread pool, and back-to-back blocks would bias the ratio.
    _log(f"timing {repeats} runs each of torch, flax (nnx.jit) and flax (jax.jit on the split state), interleaved")
    load_before = _load_average()
    torch_times, flax_times, split_times = [], [], []
    for _ in range(repeats):
        torch_times += _time(torch_forward, 1)
        flax_times += _time(flax_forward, 1)
        split_times += _time(flax_split_forward, 1)
    load_after = _load_average()

    tokens = batch * seq_len
    torch_median, flax_median = statistics.median(torch_times), statistics.median(flax_times)
    # Max/min spread of the timed runs: a competing process on a small shared box shows up as a few slow runs.
    noisy = max(max(t) / min(t) for t in (torch_times, flax_times)) > 1.5
    if noisy:
        _log("warning: timings are noisy (a run took > 1.5x the fastest one; other load on the host?); "
             "compare flax_over_torch_best_run too, or rerun with more repeats")
    # A steadily busy core is worse: torch's OpenMP threads spin at barriers and a forward with one of its
    # threads descheduled can run 10-30x slower (seen on a 2-core box), consistently, so `noisy` misses it.
    loaded = host_loaded(load_before, load_after)
    # The first call = trace + compile + one run; the compile is what exceeds a median run.
    flax_compile_s = max(0.0, flax_first_s - flax_median)
    record = dict(
        mode="bench_forward",
        preset=preset,
        dtype="float32",
        num_params=int(num_params),
        batch=batch,
        seq_len=seq_len,
        num_images_per_sample=num_images,
        image_size=image_size,
        image_tokens_per_image=image_tokens,
        tokens=tokens,
        repeats=repeats,
        setup_s=round(setup_s, 3),
        torch_warmup_s=round(torch_warmup_s, 4),
        flax_first_call_s=round(flax_first_s, 3),
        flax_compile_s=round(flax_compile_s, 3),
        torch_median_s=round(torch_median, 5),
        flax_median_s=round(flax_median, 5),
        torch_times_s=[round(t, 5) for t in torch_times],
        flax_times_s=[round(t, 5) for t in flax_times],
        flax_split_jit_median_s=round(statistics.median(split_times), 5),
        torch_min_s=round(min(torch_times), 5),
        flax_min_s=round(min(flax_times), 5),
        torch_tokens_per_s=round(tokens / torch_median, 1),
        flax_tokens_per_s=round(tokens / flax_median, 1),
        flax_over_torch_tokens_per_s=round(torch_median / flax_median, 3),
        flax_over_torch_best_run=round(min(torch_times) / min(flax_times), 3),
        noisy=noisy,
        host_loaded=loaded,
        max_abs_logits_diff=diff,
        logits_diff_ok=diff < tolerance,
        host=host_info(load_before, load_after),
    )
    _log(f"torch {record['torch_tokens_per_s']:.0f} tok/s, flax {record['flax_tokens_per_s']:.0f} tok/s "
         f"(flax/torch {record['flax_over_torch_tokens_per_s']:.2f}x median, "
         f"{record['flax_over_torch_best_run']:.2f}x best run), flax compile {flax_compile_s:.2f}s; "
         f"split-state jax.jit median {record['flax_split_jit_median_s'] * 1e3:.1f} ms vs nnx.jit "
         f"{flax_median * 1e3:.1f} ms")
    if not diff < tolerance:
        import json

        print(json.dumps(record, default=str), file=sys.stderr, flush=True)
        raise BenchError(f"Flax and transformers logits differ by {diff:.3g} >= {tolerance:g} on real tokens: "
                         f"the port does not compute the same model, so the timings mean nothing")
    return record


def build_models(preset: str | dict[str, Any], seed: int, log=_log, *, torch_device: str = "cpu",
                 dtype: str = "float32"):
    """The random transformers model of `preset` (a `PRESETS` name, or a config.json-shaped dict) in eval mode on
    `torch_device` and the same weights loaded into Flax, both in `dtype` ("float32" on the CPU, "bfloat16" for
    accelerator timings): built with transformers, saved with `save_pretrained`, loaded back with
    `qwen3_vl.from_pretrained`. Returns (hf_model, flax_model, num_params)."""
    try:
        import torch
        import transformers
    except ImportError as e:
        raise BenchError(f"{_TORCH_MISSING} ({e})") from None
    import jax.numpy as jnp

    from axpo_jax.models import qwen3_vl

    if dtype not in ("float32", "bfloat16"):
        raise BenchError(f"dtype must be 'float32' or 'bfloat16', got {dtype!r}")
    hf = hf_config_dict(preset) if isinstance(preset, str) else preset
    transformers.utils.logging.disable_progress_bar()
    log(f"building the random transformers model ({f'preset {preset!r}' if isinstance(preset, str) else 'given config'}"
        f", {dtype}, on {torch_device})")
    torch.manual_seed(seed)
    with torch.device(torch_device):  # initialised where it runs: a 2B model's random init is slow on a CPU
        hf_model = transformers.Qwen3VLForConditionalGeneration(transformers.Qwen3VLConfig(**hf))
    # rope frequencies are float32 buffers that `.to(bfloat16)` would round (from_pretrained(dtype=...) keeps them):
    # rounded, a bf16 reference's angles drift with position (~1.6 nats at 4k tokens on a 2B model, 2026-11-27)
    rope_buffers = {name: buf.clone() for name, buf in hf_model.named_buffers() if name.endswith("inv_freq")}
    hf_model = hf_model.to(getattr(torch, dtype)).eval()
    for name, buf in rope_buffers.items():
        owner, _, leaf = name.rpartition(".")
        hf_model.get_submodule(owner).register_buffer(leaf, buf, persistent=False)
    num_params = sum(p.numel() for p in hf_model.parameters())
    with tempfile.TemporaryDirectory(prefix="axpo_bench_") as tmp:
        hf_model.save_pretrained(tmp)
        log(f"saved {num_params / 1e6:.2f}M parameters; loading them into Flax")
        flax_model = qwen3_vl.from_pretrained(tmp, dtype=getattr(jnp, dtype))
    return hf_model, flax_model, int(num_params)


def torch_device_for(requested: str) -> str:
    """"auto": CUDA when both JAX and torch see a GPU (each implementation on the same accelerator), else the CPU."""
    if requested != "auto":
        return requested
    import jax
    import torch

    return "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"


def device_copy_gbps(size_mib: int = 2048, repeats: int = 20) -> float | None:
    """Measured device memory bandwidth of this JAX device: a jitted elementwise copy of a `size_mib` array, bytes
    read plus written, over `repeats` calls queued back to back (per-call timing would add the host's dispatch and
    sync, ~0.1 ms, to a ~1 ms copy). The ceiling a decode step is held to; None on the CPU."""
    import jax
    import jax.numpy as jnp

    if jax.default_backend() == "cpu":
        return None
    x = jnp.ones((size_mib * 2**20 // 4,), jnp.float32)
    copy = jax.jit(lambda a: a * 1.0001)
    copy(x).block_until_ready()
    start = time.perf_counter()
    for _ in range(repeats):
        y = copy(x)
    y.block_until_ready()
    return round(2 * x.nbytes * repeats / (time.perf_counter() - start) / 1e9, 1)


def host_loaded(load_before: float | None, load_after: float | None, log=_log) -> bool:
    """Whether the 1-minute load average exceeded the cores (logs a warning if so). A steadily busy core is worse
    than a few slow runs: torch's OpenMP threads spin at barriers and a forward with one of its threads
    descheduled can run 10-30x slower (seen on a 2-core box), consistently, so a max/min spread check misses it."""
    loaded = max(x or 0.0 for x in (load_before, load_after)) > (os.cpu_count() or 1) + 0.5
    if loaded:
        log(f"warning: host load average {load_before}/{load_after} exceeds its {os.cpu_count()} cores: other "
            f"processes compete for the CPU and the timings (torch's most) are unreliable (rerun on an idle host, "
            f"or --config.torch_threads=1 where torch runs)")
    return loaded


def host_info(load_before: float | None, load_after: float | None) -> dict[str, Any]:
    """The host and library versions a timing was taken on, with the load average around it."""
    import flax
    import jax

    try:
        import torch
    except ImportError:
        torch = None
    device = jax.devices()[0]
    return dict(
        cpu_count=os.cpu_count(),
        load_average_1m_before_after=[load_before, load_after],
        torch_threads=torch.get_num_threads() if torch is not None else None,
        machine=platform.machine(),
        processor=platform.processor() or None,
        cpu_model=_cpu_model(),
        # A VM that halts an idle vCPU at once (0) pays a host wake-up (~30 us measured) each time XLA:CPU's second
        # worker thread is handed work after a pause: several times per decode step of a small model
        guest_halt_poll_ns=_read_int(_HALT_POLL_NS),
        python=platform.python_version(),
        jax_backend=jax.default_backend(),
        jax_device_kind=device.device_kind,
        jax_device_count=jax.device_count(),
        versions=dict(jax=jax.__version__, jaxlib=_version("jaxlib"), flax=flax.__version__,
                      torch=_version("torch"), transformers=_version("transformers"), numpy=np.__version__),
    )


_HALT_POLL_NS = "/sys/module/haltpoll/parameters/guest_halt_poll_ns"  # Linux guests with cpuidle-haltpoll


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
    except OSError:
        return None


def _load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None
