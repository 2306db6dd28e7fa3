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
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from typing import Any

import numpy as np

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
    with jax.set_mesh(mesh):
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
    print("\n".join(lines), file=sys.stderr, flush=True)


def run(config) -> dict[str, Any]:
    import jax

    from axpo_jax.models import qwen3_vl
    from axpo_jax.parallel.mesh import MESH_AXES, make_mesh

    mesh_shape = {axis: int(config.mesh.get(axis, 1)) for axis in MESH_AXES}
    needed = int(np.prod(list(mesh_shape.values())))
    have = jax.device_count()
    if have < needed:
        raise RuntimeError(
            f"mesh {mesh_shape} needs {needed} devices but the {jax.default_backend()} backend has {have}; "
            f"on CPU set --config.xla_host_device_count={needed} (launch.py applies it before jax starts)"
        )
    mesh = make_mesh(mesh_shape, devices=jax.devices()[:needed])
    targets = tuple(config.get("targets", _TARGETS))
    unknown = set(targets) - set(_TARGETS)
    if unknown:
        raise ValueError(f"unknown memory_plan targets {sorted(unknown)}; known: {list(_TARGETS)}")
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
    _log(f"mesh {mesh_shape} on {needed} {jax.default_backend()} device(s); settings {settings}")
    results = {}
    start = time.perf_counter()
    for name in config.presets:
        model_config = config_for(name)
        results[name] = plan_preset(name, model_config, mesh, settings)
    _print_table(results, mesh_shape, settings["device_memory_gib"])
    return dict(
        mode="memory_plan",
        mesh=mesh_shape,
        backend=jax.default_backend(),
        device_kind=jax.devices()[0].device_kind,
        dtype="bfloat16",
        settings={k: (list(v) if isinstance(v, tuple) else v) for k, v in settings.items()},
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
