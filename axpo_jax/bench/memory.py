"""Mode `memory_plan`: per-device memory of the 8B / 32B Qwen3-VL on a device mesh, without any weights.

    python launch.py --config configs/bench.py:memory [--config.mesh.fsdp=4 --config.mesh.tensor=2 ...]

For each preset the model is built abstractly in bfloat16, every parameter gets the sharding of
`parallel.sharding.param_spec`, the batch (`batch_per_device` x data x fsdp samples of `seq_len` tokens, with
`images_per_sample` images of `patches_per_image` patches each) gets the sharding of `shard_model_inputs`, and the
jitted forward is lowered and compiled for the mesh. XLA's `memory_analysis()` of the compiled per-device
program gives the argument / output / temp bytes of:

  * `logits`: `Qwen3VL.forward`, [B, T, V] logits (what sampling calls), and
  * `token_logprobs`: `Qwen3VL.token_logprobs`, [B, T] float32 (what the training loss calls).

On the CPU backend (where launch.py simulates the mesh with `xla_host_device_count` fake devices) the numbers are
those of the CPU compiler: fusion and layouts differ from a TPU's, so treat them as an estimate. What training
adds on top is computed analytically and labelled so: gradients (a params-sized copy), fp32 AdamW moments
(2 x 4 bytes per parameter, sharded like the parameters) and the KV cache of `kv_cache_tokens` tokens per
sequence for rollouts. Backward-pass activations are NOT included (the compiled program is a forward).

Compiling the unrolled 36-/64-layer decoder on CPU is slow; `compile_layers=L` (> 0) compiles the model with L
and 2L decoder layers instead and extrapolates the compiled temp / code bytes linearly to the full depth
(the record says "extrapolated from L and 2L layers"); parameter bytes are always exact.

The RL plan and the refusal. `rl_memory_plan` adds up, per device and without compiling anything, what one RL
step holds at its two peaks: the rollout phase (policy + reference weights, optimizer state, the rollout KV
cache) and the update phase (the same weights and optimizer state, gradients, activations); see `RLMemorySettings`
for the assumptions. `check_fits` raises `PlanDoesNotFit` (one line naming every component) when the larger
phase exceeds the device memory less a headroom, and `ensure_plan_fits` is what a training mode calls before it
allocates anything. The `memory_plan` mode reports this plan for each preset too and, with `fail_if_not_fit`
(default on), ends with that one-line error when a preset does not fit. `python -m axpo_jax.bench.memory`
prints the table of the smallest TPU slice each preset needs (tpu/README.md).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from axpo_jax import modes
from axpo_jax.bench import devices

GIB = 1024**3
_TARGETS = ("logits", "token_logprobs")


def _log(message: str) -> None:
    print(f"[memory_plan] {message}", file=sys.stderr, flush=True)


def _gib(x: float) -> float:
    return round(x / GIB, 3)


# --------------------------------------------------------------------------------------------- model and inputs


def abstract_sharded_state(config, mesh, dtype):
    """(graphdef, state) of the abstract model; state leaves are ShapeDtypeStructs carrying their NamedSharding.
    Also returns [(name, shape, dtype, spec)] for every parameter."""
    import jax
    from flax import nnx
    from jax.sharding import NamedSharding

    from axpo_jax.models import qwen3_vl
    from axpo_jax.models.qwen3_vl.checkpoint import _param_name
    from axpo_jax.parallel.sharding import param_spec

    graphdef, state = nnx.split(qwen3_vl.abstract_model(config, dtype=dtype))
    table = []

    def shard(path, leaf):
        name = _param_name(path)
        spec = param_spec(name, tuple(leaf.shape), mesh)
        table.append((name, tuple(leaf.shape), leaf.dtype, spec))
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=NamedSharding(mesh, spec))

    pure = jax.tree_util.tree_map_with_path(shard, nnx.to_pure_dict(state))
    nnx.replace_by_pure_dict(state, pure)
    return graphdef, state, table


def shard_bytes(shape, itemsize: int, spec, mesh) -> int:
    """Bytes of one device's shard of an array of `shape` laid out as `spec` over `mesh`."""
    total = itemsize
    for i, dim in enumerate(shape):
        axes = spec[i] if i < len(spec) else None
        names = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
        split = int(np.prod([mesh.shape[a] for a in names])) if names else 1
        total *= -(-dim // split)
    return int(total)


def abstract_inputs(config, mesh, *, batch: int, seq_len: int, images_per_sample: int, patches_per_image: int):
    """Abstract `ModelInputs` (+ targets) for `batch` x `seq_len` tokens and batch*images_per_sample image rows,
    sharded the way `parallel.sharding.shard_model_inputs` places real ones."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding

    from axpo_jax.models.qwen3_vl import ModelInputs
    from axpo_jax.parallel.sharding import batch_spec

    unit = config.vision.spatial_merge_size**2
    if patches_per_image % unit:
        raise ValueError(f"patches_per_image={patches_per_image} must be a multiple of spatial_merge_size^2={unit}")
    rows = max(1, batch * images_per_sample)
    b, t, n, length = batch, seq_len, rows, patches_per_image

    def sds(shape, dtype, axis=0):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, batch_spec(shape, mesh, axis)))

    inputs = ModelInputs(
        input_ids_bt=sds((b, t), jnp.int32),
        attention_mask_bt=sds((b, t), jnp.int32),
        position_ids_3bt=sds((3, b, t), jnp.int32, axis=1),
        vision_token_index_bt=sds((b, t), jnp.int32),
        pixel_patches_nlp=sds((n, length, config.vision.patch_dim), jnp.float32),
        patch_valid_nl=sds((n, length), jnp.bool_),
        patch_pos_index_nl4=sds((n, length, 4), jnp.int32),
        patch_pos_weight_nl4=sds((n, length, 4), jnp.float32),
        patch_rope_hw_nl2=sds((n, length, 2), jnp.int32),
    )
    return inputs, sds((b, t), jnp.int32)


def with_text_layers(config, layers: int):
    return dataclasses.replace(config, text=dataclasses.replace(config.text, num_hidden_layers=layers))


def compile_forward(config, mesh, *, dtype, target: str, inputs, targets, logprob_chunk: int):
    """Lowers + compiles `target` for the mesh; returns (memory stats dict, compile seconds)."""
    import jax
    from flax import nnx

    from axpo_jax.models.qwen3_vl.model import causal_query_blocks

    graphdef, state, _ = abstract_sharded_state(config, mesh, dtype)

    if target == "logits":
        def fn(state, inputs):
            return nnx.merge(graphdef, state).forward(inputs)

        args = (state, inputs)
    else:
        def fn(state, inputs, targets):
            return nnx.merge(graphdef, state).token_logprobs(inputs, targets, chunk_size=logprob_chunk)

        args = (state, inputs, targets)
    start = time.perf_counter()
    # The abstract arguments carry their NamedShardings; under the mesh the model's activation constraints keep
    # the hidden states split by sample (as training and rollouts run), and XLA propagates the rest.
    # the accelerator's attention (one piece), not the CPU's causal query blocks
    with jax.set_mesh(mesh), causal_query_blocks(0):
        compiled = jax.jit(fn).lower(*args).compile()
    seconds = time.perf_counter() - start
    stats = compiled.memory_analysis()
    if stats is None:
        raise RuntimeError(f"the {jax.default_backend()} backend gives no memory_analysis() for compiled programs")
    fields = dict(argument="argument_size_in_bytes", output="output_size_in_bytes", temp="temp_size_in_bytes",
                  alias="alias_size_in_bytes", generated_code="generated_code_size_in_bytes",
                  peak="peak_memory_in_bytes")
    return {key: int(getattr(stats, field, 0) or 0) for key, field in fields.items()}, seconds


# --------------------------------------------------------------------------------------------- the plan


def _kv_cache_bytes(text, mesh, *, batch: int, tokens: int, itemsize: int) -> int:
    """Per device: layers x (K, V) x kv_heads x head_dim x tokens x batch, with the batch split over data x fsdp
    and the kv heads over tensor, each when it divides (k_proj / v_proj split their output over tensor)."""
    from axpo_jax.parallel.sharding import BATCH_AXES

    batch_split = int(np.prod([mesh.shape[a] for a in BATCH_AXES]))
    per_device_batch = batch // batch_split if batch % batch_split == 0 else batch
    tensor = mesh.shape["tensor"]
    heads = text.num_key_value_heads
    per_device_heads = heads // tensor if heads % tensor == 0 else heads
    return text.num_hidden_layers * 2 * per_device_heads * text.head_dim * tokens * per_device_batch * itemsize


def plan_preset(name: str, config, mesh, settings: dict[str, Any]) -> dict[str, Any]:
    import jax.numpy as jnp

    dtype = jnp.bfloat16
    itemsize = jnp.dtype(dtype).itemsize
    full_layers = config.text.num_hidden_layers
    _, _, table = abstract_sharded_state(config, mesh, dtype)
    num_params = sum(math.prod(shape) for _, shape, _, _ in table)
    params_bytes = sum(shard_bytes(shape, jnp.dtype(dt).itemsize, spec, mesh) for _, shape, dt, spec in table)
    params_fp32_bytes = sum(shard_bytes(shape, 4, spec, mesh) for _, shape, _, spec in table)
    unsharded = [n for n, shape, _, spec in table if len(shape) >= 2 and all(a is None for a in spec)]

    from axpo_jax.parallel.sharding import BATCH_AXES

    batch = settings["batch_per_device"] * int(np.prod([mesh.shape[a] for a in BATCH_AXES]))
    inputs, targets = abstract_inputs(config, mesh, batch=batch, seq_len=settings["seq_len"],
                                      images_per_sample=settings["images_per_sample"],
                                      patches_per_image=settings["patches_per_image"])
    compile_layers = settings["compile_layers"]
    if compile_layers and compile_layers < full_layers:
        min_layers = len(config.vision.deepstack_visual_indexes)
        if compile_layers < min_layers:
            raise ValueError(f"compile_layers={compile_layers} must be >= the {min_layers} DeepStack levels")
        depths = [compile_layers, min(2 * compile_layers, full_layers)]
    else:
        depths = [full_layers]

    compiled: dict[str, Any] = {}
    for target in settings["targets"]:
        runs = []
        for layers in depths:
            _log(f"{name}: compiling {target} with {layers}/{full_layers} decoder layers ...")
            stats, seconds = compile_forward(with_text_layers(config, layers), mesh, dtype=dtype, target=target,
                                             inputs=inputs, targets=targets, logprob_chunk=settings["logprob_chunk"])
            _log(f"{name}: {target} with {layers} layers compiled in {seconds:.1f}s: "
                 f"temp {_gib(stats['temp'])} GiB, arguments {_gib(stats['argument'])} GiB")
            runs.append((layers, stats, seconds))
        if len(runs) == 1:
            stats = dict(runs[0][1])
            how = f"compiled with all {full_layers} layers"
        else:
            (l1, s1, _), (l2, s2, _) = runs
            stats = {}
            for key in s1:
                slope = (s2[key] - s1[key]) / (l2 - l1)
                stats[key] = int(round(s2[key] + slope * (full_layers - l2)))
            stats["argument"] = None  # depends on the parameters: see params_gib (exact) instead
            how = f"extrapolated from {l1} and {l2} layers (of {full_layers})"
        input_bytes = runs[0][1]["argument"] - _params_bytes_at(runs[0][0], config, mesh, dtype)
        total = params_bytes + input_bytes + stats["output"] + stats["temp"] + stats["generated_code"]
        compiled[target] = dict(
            how=how,
            compile_s=[round(s, 1) for _, _, s in runs],
            argument_gib=None if stats["argument"] is None else _gib(stats["argument"]),
            inputs_gib=_gib(input_bytes),
            output_gib=_gib(stats["output"]),
            temp_gib=_gib(stats["temp"]),
            alias_gib=_gib(stats["alias"]),
            generated_code_gib=_gib(stats["generated_code"]),
            # XLA's own peak; on the CPU backend it is arguments + outputs only (temps not counted).
            peak_gib=_gib(stats["peak"]) if stats.get("peak") else None,
            total_gib=_gib(total),
            fits=total <= settings["device_memory_gib"] * GIB,
            bytes=dict(stats, inputs=int(input_bytes), total=int(total)),
        )

    kv_bytes = _kv_cache_bytes(config.text, mesh, batch=batch, tokens=settings["kv_cache_tokens"], itemsize=itemsize)
    train_base = params_bytes * 2 + params_fp32_bytes * 2  # params + grads + AdamW (m, v) in fp32
    fwd = (compiled.get("token_logprobs") or next(iter(compiled.values())))["bytes"]
    train_total = train_base + fwd["inputs"] + fwd["output"] + fwd["temp"]
    rollout_total = params_bytes + kv_bytes
    return dict(
        num_params=int(num_params),
        text_layers=full_layers,
        vision_depth=config.vision.depth,
        global_batch=batch,
        params_gib=_gib(params_bytes),
        params_bytes=int(params_bytes),
        unsharded_matrices=unsharded,
        compiled=compiled,
        analytic=dict(
            note="computed, not compiled: grads like params (bf16), AdamW m+v in fp32 sharded like params, "
                 "KV cache of kv_cache_tokens per sequence; backward activations not included",
            grads_gib=_gib(params_bytes),
            adamw_fp32_gib=_gib(2 * params_fp32_bytes),
            kv_cache_gib=_gib(kv_bytes),
            kv_cache_tokens=settings["kv_cache_tokens"],
            train_step_lower_bound_gib=_gib(train_total),
            train_step_lower_bound_fits=train_total <= settings["device_memory_gib"] * GIB,
            rollout_params_plus_kv_gib=_gib(rollout_total),
            rollout_fits=rollout_total <= settings["device_memory_gib"] * GIB,
            bytes=dict(grads=int(params_bytes), adamw_fp32=int(2 * params_fp32_bytes), kv_cache=int(kv_bytes),
                       train_step_lower_bound=int(train_total), rollout_params_plus_kv=int(rollout_total)),
        ),
    )


# --------------------------------------------------------------------------------------------- the RL plan


class PlanDoesNotFit(modes.ModeError, ValueError):
    """A memory plan larger than the device. A ModeError, so launch.py ends the run with this one-line message
    instead of a traceback (the point is to stop before anything is allocated)."""


class _MeshShape:
    """Axis sizes standing in for a `jax.sharding.Mesh` where only `.shape` is read (param_spec, shard_bytes)."""

    def __init__(self, shape: Mapping[str, int]):
        from axpo_jax.parallel.mesh import MESH_AXES

        unknown = set(shape) - set(MESH_AXES)
        if unknown:
            raise ValueError(f"unknown mesh axes {sorted(unknown)}; axes are {MESH_AXES}")
        self.shape = {axis: int(shape.get(axis, 1)) for axis in MESH_AXES}


def _mesh_shape(mesh) -> _MeshShape:
    return _MeshShape(dict(mesh.shape) if hasattr(mesh, "shape") else dict(mesh))


@dataclasses.dataclass(frozen=True)
class RLMemorySettings:
    """What one RL step holds, per the paper's recipe where it says, and assumptions (marked) where it does not.

    Update phase: the policy's weights, gradients and AdamW moments, the frozen reference (SFT) weights for the KL
    term (paper: beta = 1e-3), and the activations of one micro-batch of `micro_batch_per_device` sequences of
    `seq_len` tokens. Rollout phase: the same weights and optimizer state (they stay resident) plus the KV cache of
    `rollout_rows` trajectories of `kv_cache_tokens` slots, split over the data x fsdp devices.

    Activations (an estimate, in `compute_bytes`): with `remat`, each decoder layer's input (L x tokens x hidden) plus one layer
    recomputed at a time during the backward pass; without it, every layer's. One layer holds its norms and
    residuals (4 x hidden), q/k/v and the attention output, the MLP's gate/up/product (3 x intermediate) per token,
    and the attention scores (fp32) and probabilities (bf16) of every head: the einsum attention materializes the
    S x S matrix (with `fused_attention`, a flash kernel, only each query's softmax statistics). Heads
    and the MLP width split over `tensor`. Plus one chunk of `logprob_chunk` positions of fp32 logits and their
    softmax. The vision tower's, for one image of `image_pixels` per sequence (config `max_image_pixels`: the
    largest an image can be), alike: each block's input (remat) plus one block's insides, whose attention scores
    are the image's L x L patches per head in the einsum form (a high-resolution image's dominate); 0: not counted.
    """

    seq_len: int = 8192  # assumption: prompt + 3 policy turns + tool observations (the paper does not say)
    micro_batch_per_device: int = 1
    rollout_rows: int = 320  # assumption: B=32 questions x N=8 rollouts + r*B*N = 64 AXPO continuations (r=0.25)
    kv_cache_tokens: int = 8192
    param_bytes: int = 2  # bf16 weights
    grad_bytes: int = 2  # gradients in the weights' dtype
    compute_bytes: int = 2  # activations and the KV cache, in the weights' dtype
    micro_batches: int = 1  # per update: with more than one, the gradients' running sum is held beside each's
    optimizer_bytes_per_param: int = 8  # AdamW m and v in fp32
    reference_model: bool = True
    remat: bool = True  # assumption: per-layer rematerialization in the update (see the class docstring)
    # the decoder attends through a flash kernel (config `attention`: cuDNN on a GPU, or splash), and the vision
    # tower (cuDNN only)
    fused_attention: bool = False
    fused_vision_attention: bool = False
    # assumption: one image per sequence, resized within this many pixels (config max_image_pixels; the presets':
    # 1,280 image tokens); 0: images not counted
    image_pixels: int = 1280 * 32 * 32
    logprob_chunk: int = 256
    headroom: float = 0.10  # share of device memory kept free for XLA's own buffers, fragmentation, collectives


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Bytes per device of each component, and which components are live together in each phase."""

    components: dict[str, int]
    phases: dict[str, tuple[str, ...]]

    def phase_bytes(self, phase: str) -> int:
        return sum(self.components[c] for c in self.phases[phase])

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.phase_bytes)

    @property
    def peak_bytes(self) -> int:
        return self.phase_bytes(self.peak_phase)

    def to_dict(self) -> dict[str, Any]:
        return dict(components_gib={k: _gib(v) for k, v in self.components.items()},
                    phases_gib={p: _gib(self.phase_bytes(p)) for p in self.phases},
                    phases={p: list(c) for p, c in self.phases.items()},
                    peak_phase=self.peak_phase, peak_gib=_gib(self.peak_bytes), bytes=dict(self.components))


@functools.lru_cache(maxsize=8)
def param_shapes(config) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """(transformers name, shape) of every parameter, from the abstract model (no memory; a few seconds for 32B)."""
    import jax
    from flax import nnx

    from axpo_jax.models import qwen3_vl
    from axpo_jax.models.qwen3_vl.checkpoint import _param_name

    _, state = nnx.split(qwen3_vl.abstract_model(config))
    leaves = jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(state))
    return tuple((_param_name(path), tuple(leaf.shape)) for path, leaf in leaves)


def _split(n: int, parts: int) -> int:
    """Per-device share of `n` split `parts` ways when it divides (the sharding rules replicate otherwise)."""
    return n // parts if parts > 1 and n % parts == 0 else n


def _layer_stack_bytes(layers: int, tokens: int, hidden: int, width: int, heads: int, rows: int, length: int,
                       fused: bool, settings: RLMemorySettings) -> int:
    """A stack of `layers` attention layers over `rows` sequences of `length`: with remat each layer's input
    (tokens x hidden) plus one layer's insides, else every layer's. Insides: `width` values per token, and the
    scores in fp32 and probabilities in compute of every head (a fused kernel keeps one fp32 logsumexp per query
    instead)."""
    cb = settings.compute_bytes
    scores = rows * heads * length * 4 if fused else rows * heads * length**2 * (4 + cb)
    one_layer = tokens * width * cb + scores
    return layers * tokens * hidden * cb + one_layer if settings.remat else layers * one_layer


def vision_activation_bytes(vision, mesh_shape: Mapping[str, int], settings: RLMemorySettings) -> int:
    """The vision tower's update-phase activations per device: one image of `settings.image_pixels` per sequence."""
    patches = settings.image_pixels // vision.patch_size**2
    if not patches:
        return 0
    heads = _split(vision.num_heads, mesh_shape.get("tensor", 1))
    b, d = settings.micro_batch_per_device, vision.hidden_size
    # norms and residuals, q/k/v and the attention output, the MLP's input and output of its activation
    width = 4 * d + 4 * heads * vision.head_dim + 2 * _split(vision.intermediate_size, mesh_shape.get("tensor", 1))
    return _layer_stack_bytes(vision.depth, b * patches, d, width, heads, b, patches,
                              settings.fused_vision_attention, settings)


def activation_bytes(text, mesh_shape: Mapping[str, int], settings: RLMemorySettings) -> int:
    """Update-phase activations per device of the decoder (see RLMemorySettings)."""
    tensor = mesh_shape.get("tensor", 1)
    b, s, d = settings.micro_batch_per_device, settings.seq_len, text.hidden_size
    tokens = b * s
    heads, kv_heads = _split(text.num_attention_heads, tensor), _split(text.num_key_value_heads, tensor)
    width = 4 * d + (2 * heads + 2 * kv_heads) * text.head_dim + 3 * _split(text.intermediate_size, tensor)
    kept = _layer_stack_bytes(text.num_hidden_layers, tokens, d, width, heads, b, s, settings.fused_attention,
                              settings)
    return kept + b * settings.logprob_chunk * text.vocab_size * 4 * 2


def rl_memory_plan(model_config, mesh, settings: RLMemorySettings = RLMemorySettings()) -> MemoryPlan:
    """The RL step's per-device memory for `model_config` on `mesh` (a Mesh or {axis: size}); nothing compiled."""
    from axpo_jax.parallel.sharding import BATCH_AXES, param_spec

    shape = _mesh_shape(mesh)
    shapes = param_shapes(model_config)
    specs = [(s, param_spec(name, s, shape)) for name, s in shapes]

    def sharded(itemsize):
        return sum(shard_bytes(s, itemsize, spec, shape) for s, spec in specs)

    text = model_config.text
    batch_devices = int(np.prod([shape.shape[a] for a in BATCH_AXES]))
    rows = -(-settings.rollout_rows // batch_devices)
    kv_heads = _split(text.num_key_value_heads, shape.shape["tensor"])
    components = dict(
        params=sharded(settings.param_bytes),
        reference=sharded(settings.param_bytes) if settings.reference_model else 0,
        optimizer=sharded(settings.optimizer_bytes_per_param),
        grads=sharded(settings.grad_bytes) * (2 if settings.micro_batches > 1 else 1),
        activations=(activation_bytes(text, shape.shape, settings)
                     + vision_activation_bytes(model_config.vision, shape.shape, settings)),
        kv_cache=(text.num_hidden_layers * 2 * kv_heads * text.head_dim * settings.kv_cache_tokens * rows
                  * settings.compute_bytes),
    )
    resident = ("params", "reference", "optimizer")
    return MemoryPlan(components, {"rollout": resident + ("kv_cache",),
                                   "update": resident + ("grads", "activations")})


def check_fits(plan: MemoryPlan, device_memory_bytes: int, headroom: float = 0.10, *, what: str = "the plan") -> int:
    """Returns the bytes to spare in the plan's largest phase; raises PlanDoesNotFit (one line) when there are none."""
    usable = int(device_memory_bytes * (1.0 - headroom))
    phase = plan.peak_phase
    need = plan.phase_bytes(phase)
    if need <= usable:
        return usable - need
    parts = ", ".join(f"{c} {_size(plan.components[c])}" for c in plan.phases[phase] if plan.components[c])
    raise PlanDoesNotFit(
        f"{what} does not fit: its {phase} phase needs {_size(need)} per device ({parts}) but the device has "
        f"{_size(device_memory_bytes)}, {_size(usable)} usable with {headroom:.0%} headroom; use more devices "
        f"(fsdp), split heads (tensor), a shorter sequence, a smaller batch or smaller images (max_image_pixels)"
    )


def _size(n: int) -> str:
    """Bytes in the largest binary unit that keeps the number >= 1 ("3.50 GiB", "96.0 KiB")."""
    for unit, scale in (("GiB", GIB), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}" if unit == "GiB" else f"{n / scale:.1f} {unit}"
    return f"{n} B"


def device_memory_bytes_of_current_device() -> int | None:
    """What the first JAX device says it can hold (memory_stats), else the device table, else None (CPU)."""
    import jax

    device = jax.devices()[0]
    try:
        stats = device.memory_stats() or {}
    except Exception:  # noqa: BLE001 - backends without memory_stats raise or return None
        stats = {}
    if stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    spec = devices.lookup(device.device_kind)
    return spec.memory_bytes if spec else None


def ensure_plan_fits(model_config, mesh, settings: RLMemorySettings = RLMemorySettings(),
                     device_memory_gib: float | None = None) -> MemoryPlan:
    """For a training mode to call before it allocates: raises PlanDoesNotFit when the RL step's plan (analytic)
    exceeds the device; returns the plan otherwise. `device_memory_gib=None` asks the running device, and a device
    with no known size (the CPU) is not checked."""
    plan = rl_memory_plan(model_config, mesh, settings)
    capacity = device_memory_gib * GIB if device_memory_gib else device_memory_bytes_of_current_device()
    if capacity:
        shape = _mesh_shape(mesh).shape
        check_fits(plan, int(capacity), settings.headroom, what=f"the RL memory plan on mesh {shape}")
    return plan


# --------------------------------------------------------------------------------------------- slices per preset


def chips_per_host(accelerator_type: str) -> int:
    """Chips of one host (one VM, one jax process) of a TPU slice: 4 on v4 and v5p; on v5e and v6e the whole slice
    up to 8 chips (a single VM), 4 per VM above (https://cloud.google.com/tpu/docs/v5e, .../v6e, .../v5p)."""
    chips = devices.chips_of(accelerator_type)
    single_host_up_to = 8 if accelerator_type.startswith(("v5litepod-", "v6e-")) else 4
    return chips if chips <= single_host_up_to else 4


def smallest_fitting_slice(model_config, generation: str, settings: RLMemorySettings = RLMemorySettings(),
                           tensor_sizes=(1, 2, 4, 8)) -> dict[str, Any] | None:
    """The smallest slice of a TPU generation ("v5p", "v6e", "v5e", "v4") whose chips hold the RL plan, with the
    first mesh (all chips on fsdp, or fsdp x tensor) that fits; None when even the largest listed slice does not.
    `tensor` stays within one host's chips: processes must not share batch rows (parallel/distributed.py)."""
    spec = devices.TPU_GENERATIONS[generation]
    for accelerator_type, chips in devices.tpu_slices(generation):
        for tensor in tensor_sizes:
            if chips_per_host(accelerator_type) % tensor:
                continue
            mesh = {"data": 1, "fsdp": chips // tensor, "tensor": tensor}
            plan = rl_memory_plan(model_config, mesh, settings)
            try:
                spare = check_fits(plan, spec.memory_bytes, settings.headroom)
            except PlanDoesNotFit:
                continue
            return dict(accelerator_type=accelerator_type, chips=chips, mesh=mesh, peak_phase=plan.peak_phase,
                        peak_gib=_gib(plan.peak_bytes), spare_gib=_gib(spare), device_gib=_gib(spec.memory_bytes))
    return None


def slice_table(presets=("2b", "4b", "8b", "32b"), generations=("v5p", "v6e", "v5e", "v4"),
                settings: RLMemorySettings = RLMemorySettings()) -> str:
    """Markdown: the smallest slice per preset and generation (what tpu/README.md shows)."""
    lines = ["| preset | " + " | ".join(generations) + " |", "|---|" + "---|" * len(generations)]
    for name in presets:
        config = config_for(name)
        cells = []
        for generation in generations:
            found = smallest_fitting_slice(config, generation, settings)
            if found is None:
                cells.append("none listed")
                continue
            mesh = found["mesh"]
            layout = f"fsdp={mesh['fsdp']}" + (f" tensor={mesh['tensor']}" if mesh["tensor"] > 1 else "")
            cells.append(f"{found['accelerator_type']} ({layout}; {found['peak_gib']:.0f}/{found['device_gib']:.0f} GiB)")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _params_bytes_at(layers: int, config, mesh, dtype) -> int:
    import jax.numpy as jnp

    _, _, table = abstract_sharded_state(with_text_layers(config, layers), mesh, dtype)
    return sum(shard_bytes(shape, jnp.dtype(dt).itemsize, spec, mesh) for _, shape, dt, spec in table)


def _print_table(results: dict[str, Any], mesh_shape: dict[str, int], device_gib: float) -> None:
    lines = [f"per-device memory (GiB) on mesh {mesh_shape}, device {device_gib} GiB:"]
    header = f"{'preset':>6} {'target':>15} {'params':>8} {'inputs':>7} {'output':>7} {'temp':>7} {'total':>7} fits"
    lines.append(header)
    for name, r in results.items():
        for target, c in r["compiled"].items():
            lines.append(f"{name:>6} {target:>15} {r['params_gib']:8.2f} {c['inputs_gib']:7.2f} {c['output_gib']:7.2f} "
                         f"{c['temp_gib']:7.2f} {c['total_gib']:7.2f} {'yes' if c['fits'] else 'NO'}  ({c['how']})")
        a = r["analytic"]
        lines.append(f"{name:>6} {'+ analytic':>15} grads {a['grads_gib']:.2f}, AdamW fp32 {a['adamw_fp32_gib']:.2f}, "
                     f"KV cache ({a['kv_cache_tokens']} tok) {a['kv_cache_gib']:.2f}; train step >= "
                     f"{a['train_step_lower_bound_gib']:.2f} ({'fits' if a['train_step_lower_bound_fits'] else 'DOES NOT FIT'}"
                     f", backward activations excluded); rollout params+KV {a['rollout_params_plus_kv_gib']:.2f}")
        rl = r.get("rl_plan")
        if rl:
            parts = ", ".join(f"{k} {v:.2f}" for k, v in rl["components_gib"].items())
            phases = ", ".join(f"{p} {v:.2f}" for p, v in rl["phases_gib"].items())
            lines.append(f"{name:>6} {'RL step':>15} {parts}; phases {phases}: "
                         f"{'fits' if rl['fits'] else 'DOES NOT FIT'}")
    print("\n".join(lines), file=sys.stderr, flush=True)


def run(config) -> dict[str, Any]:
    import jax

    from axpo_jax.bench.forward import PRESETS as BENCH_PRESETS
    from axpo_jax.bench.forward import BenchError
    from axpo_jax.models.qwen3_vl.config import PRESETS
    from axpo_jax.parallel.mesh import MESH_AXES, make_mesh

    # every name checked before the first preset compiles (minutes for the large ones)
    known = sorted({*BENCH_PRESETS, *PRESETS})
    unknown = [name for name in config.presets if name not in known]
    if unknown:
        raise BenchError(f"unknown memory_plan presets {unknown}; known: {known}")
    targets = tuple(config.get("targets", _TARGETS))
    unknown = sorted(set(targets) - set(_TARGETS))
    if unknown:
        raise BenchError(f"unknown memory_plan targets {unknown}; known: {list(_TARGETS)}")
    attention = str(config.get("attention", "einsum"))
    if attention not in ("einsum", "cudnn", "splash"):
        raise BenchError(f"memory_plan attention must be 'einsum' (the S x S scores are held), 'cudnn' (an NVIDIA "
                         f"GPU's flash attention, decoder and vision tower) or 'splash' (a TPU's, decoder only), got "
                         f"{attention!r}")
    mesh_shape = {axis: int(config.mesh.get(axis, 1)) for axis in MESH_AXES}
    needed = int(np.prod(list(mesh_shape.values())))
    have = jax.device_count()
    if have < needed:
        raise BenchError(
            f"mesh {mesh_shape} needs {needed} devices but the {jax.default_backend()} backend has {have}; "
            f"on CPU set --config.xla_host_device_count={needed} (launch.py applies it before jax starts)"
        )
    mesh = make_mesh(mesh_shape, devices=jax.devices()[:needed])
    settings = dict(
        seq_len=int(config.seq_len),
        batch_per_device=int(config.batch_per_device),
        images_per_sample=int(config.get("images_per_sample", 1)),
        patches_per_image=int(config.get("patches_per_image", 1024)),
        kv_cache_tokens=int(config.get("kv_cache_tokens", config.seq_len)),
        compile_layers=int(config.get("compile_layers", 0)),
        logprob_chunk=int(config.get("logprob_chunk", 256)),
        device_memory_gib=float(config.device_memory_gib),
        targets=targets,
    )
    from axpo_jax.parallel.sharding import BATCH_AXES

    batch_devices = int(np.prod([mesh_shape[a] for a in BATCH_AXES]))
    rl_settings = RLMemorySettings(
        seq_len=settings["seq_len"], micro_batch_per_device=settings["batch_per_device"],
        rollout_rows=int(config.get("rollout_rows", settings["batch_per_device"] * batch_devices)),
        kv_cache_tokens=settings["kv_cache_tokens"], logprob_chunk=settings["logprob_chunk"],
        remat=bool(config.get("remat", True)), reference_model=bool(config.get("reference_model", True)),
        headroom=float(config.get("headroom", RLMemorySettings.headroom)), fused_attention=attention != "einsum",
        fused_vision_attention=attention == "cudnn",
    )
    _log(f"mesh {mesh_shape} on {needed} {jax.default_backend()} device(s); settings {settings}; RL {rl_settings}")
    results = {}
    refusals = {}
    start = time.perf_counter()
    for name in config.presets:
        model_config = config_for(name)
        results[name] = plan_preset(name, model_config, mesh, settings)
        # the RL plan's image: one of the patches the forward above was compiled with (the preset's patch size)
        image_pixels = settings["patches_per_image"] * model_config.vision.patch_size**2
        plan = rl_memory_plan(model_config, mesh_shape, dataclasses.replace(rl_settings, image_pixels=image_pixels))
        try:
            spare = check_fits(plan, int(settings["device_memory_gib"] * GIB), rl_settings.headroom,
                               what=f"preset {name} on mesh {mesh_shape}")
            results[name]["rl_plan"] = dict(plan.to_dict(), fits=True, spare_gib=_gib(spare))
        except PlanDoesNotFit as e:
            refusals[name] = e
            results[name]["rl_plan"] = dict(plan.to_dict(), fits=False, spare_gib=None)
    _print_table(results, mesh_shape, settings["device_memory_gib"])
    if refusals and bool(config.get("fail_if_not_fit", True)):
        first, error = next(iter(refusals.items()))
        others = [n for n in refusals if n != first]
        raise PlanDoesNotFit(str(error) + (f" (also too large: {', '.join(others)})" if others else ""))
    return dict(
        mode="memory_plan",
        mesh=mesh_shape,
        backend=jax.default_backend(),
        device_kind=jax.devices()[0].device_kind,
        dtype="bfloat16",
        settings={k: (list(v) if isinstance(v, tuple) else v) for k, v in settings.items()},
        rl_settings=dataclasses.asdict(rl_settings),
        seconds=round(time.perf_counter() - start, 1),
        presets=results,
    )


def config_for(name: str):
    """A qwen3_vl preset ("8b", "32b", ...), or one of bench_forward's small random-model sizes ("micro", ...)."""
    from axpo_jax.bench import forward
    from axpo_jax.models import qwen3_vl

    if name in forward.PRESETS:
        return qwen3_vl.Qwen3VLConfig.from_dict(forward.hf_config_dict(name))
    return qwen3_vl.preset(name)


if __name__ == "__main__":
    # The slice table of tpu/README.md, from the RL plan with its default (paper-recipe) settings.
    print(slice_table())
