"""The memory planner's refusal: the RL plan's components by hand, check_fits, ensure_plan_fits, the memory_plan
mode's one-line error, and the smallest-slice search."""

import math
import os
import subprocess
import sys
from pathlib import Path

import ml_collections
import pytest

from axpo_jax import modes
from axpo_jax.bench import memory

GIB = 1024**3
MICRO = memory.config_for("micro")  # text: V=512, d=64, I=128, 1 layer, 4 heads, 2 kv heads of 16
SMALL = memory.RLMemorySettings(seq_len=32, micro_batch_per_device=1, rollout_rows=3, kv_cache_tokens=64,
                                logprob_chunk=16, image_pixels=0)


def test_check_fits_uses_the_larger_phase_and_the_headroom():
    plan = memory.MemoryPlan({"a": 3 * GIB, "b": 2 * GIB, "c": 4 * GIB}, {"x": ("a", "b"), "y": ("a", "c")})
    assert plan.peak_phase == "y" and plan.peak_bytes == 7 * GIB
    assert memory.check_fits(plan, 8 * GIB, headroom=0.1) == int(8 * GIB * 0.9) - 7 * GIB
    with pytest.raises(memory.PlanDoesNotFit) as refused:
        memory.check_fits(plan, int(7.5 * GIB), headroom=0.1, what="preset t")
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith("preset t does not fit: its y phase needs 7.00 GiB per device (a 3.00 GiB, c 4.00 GiB)")
    assert "the device has 7.50 GiB, 6.75 GiB usable with 10% headroom" in message
    assert isinstance(refused.value, modes.ModeError)  # launch.py prints it as one line and exits 1


def test_rl_plan_components_by_hand():
    shapes = memory.param_shapes(MICRO)
    n = sum(math.prod(s) for _, s in shapes)
    plan = memory.rl_memory_plan(MICRO, {"fsdp": 1}, SMALL)
    c = plan.components
    assert c["params"] == c["reference"] == c["grads"] == 2 * n and c["optimizer"] == 8 * n
    # one layer: 32 tokens x (4*64 + (2*4 + 2*2)*16 + 3*128 = 832) x 2 bytes + 4 heads x 32^2 x 6 bytes = 77,824;
    # remat keeps the layer input 32 x 64 x 2 = 4,096; a logits chunk 16 x 512 x 8 = 65,536
    assert c["activations"] == 4_096 + 77_824 + 65_536
    assert memory.activation_bytes(MICRO.text, {"tensor": 1}, dataclass_replace(SMALL, remat=False)) == \
        77_824 + 65_536
    # 1 layer x (K, V) x 2 kv heads x 16 x 64 slots x 3 rows x 2 bytes
    assert c["kv_cache"] == 2 * 2 * 16 * 64 * 3 * 2 == 24_576
    assert plan.phases["rollout"] == ("params", "reference", "optimizer", "kv_cache")
    assert plan.phase_bytes("update") == 2 * n * 3 + 8 * n + c["activations"]
    no_ref = memory.rl_memory_plan(MICRO, {"fsdp": 1}, dataclass_replace(SMALL, reference_model=False))
    assert no_ref.components["reference"] == 0
    # fp32 weights: activations and the cache in fp32 too; one layer 32 x 832 x 4 + 4 x 32^2 x (4 + 4) = 139,264
    fp32 = memory.rl_memory_plan(MICRO, {"fsdp": 1}, dataclass_replace(
        SMALL, param_bytes=4, grad_bytes=4, compute_bytes=4)).components
    assert fp32["kv_cache"] == 2 * c["kv_cache"] and fp32["activations"] == 32 * 64 * 4 + 139_264 + 65_536
    # an update of several micro-batches holds the gradients' running sum beside each micro-batch's
    accumulating = memory.rl_memory_plan(MICRO, {"fsdp": 1}, dataclass_replace(SMALL, micro_batches=3)).components
    assert accumulating["grads"] == 2 * c["grads"]
    # a fused (flash) attention keeps no 32 x 32 scores, only each query's logsumexp: 4 heads x 32 x 4 bytes
    fused = memory.rl_memory_plan(MICRO, {"fsdp": 1}, dataclass_replace(SMALL, fused_attention=True)).components
    assert fused["activations"] == c["activations"] - 4 * 32**2 * 6 + 4 * 32 * 4


def test_vision_activations_by_hand():
    """MICRO's vision tower (1 block, width 32, 2 heads of 16, MLP 64, 8 px patches) on one 64 x 64 image per
    sequence: 64 patches."""
    image = dataclass_replace(SMALL, image_pixels=64 * 64)
    vision = MICRO.vision
    # one block: 64 patches x (4*32 + 4*2*16 + 2*64 = 384) x 2 bytes + 2 heads x 64^2 x 6 bytes = 98,304;
    # remat keeps the block's input, 64 x 32 x 2 = 4,096
    assert memory.vision_activation_bytes(vision, {"tensor": 1}, image) == 4_096 + 98_304
    assert memory.vision_activation_bytes(vision, {"tensor": 1}, dataclass_replace(image, remat=False)) == 98_304
    # a fused attention: each query's logsumexp, 2 heads x 64 x 4 bytes, instead of the scores
    fused = dataclass_replace(image, fused_vision_attention=True)
    assert memory.vision_activation_bytes(vision, {"tensor": 1}, fused) == 4_096 + 64 * 384 * 2 + 2 * 64 * 4
    decoder_only = dataclass_replace(image, fused_attention=True)  # splash: the vision tower keeps its scores
    assert memory.vision_activation_bytes(vision, {"tensor": 1}, decoder_only) == 4_096 + 98_304
    # tensor=2: one head per device, MLP 32: 64 x (128 + 64 + 64) x 2 + 1 x 64^2 x 6 = 57,344
    assert memory.vision_activation_bytes(vision, {"tensor": 2}, image) == 4_096 + 57_344
    plan = memory.rl_memory_plan(MICRO, {"fsdp": 1}, image).components
    assert plan["activations"] == memory.rl_memory_plan(MICRO, {"fsdp": 1}, SMALL).components["activations"] \
        + 4_096 + 98_304
    assert memory.vision_activation_bytes(vision, {"tensor": 1}, SMALL) == 0  # image_pixels=0: not counted


def dataclass_replace(settings, **changes):
    import dataclasses

    return dataclasses.replace(settings, **changes)


def test_sharding_splits_weights_rows_and_heads():
    one = memory.rl_memory_plan(MICRO, {"fsdp": 1}, SMALL).components
    two = memory.rl_memory_plan(MICRO, {"fsdp": 2}, SMALL).components
    assert two["kv_cache"] == one["kv_cache"] // 3 * 2  # ceil(3 rows / 2) = 2 rows per device
    assert one["params"] / 2 <= two["params"] < one["params"]  # norms and biases stay whole
    tensor = memory.rl_memory_plan(MICRO, {"tensor": 2}, SMALL).components
    assert tensor["kv_cache"] == one["kv_cache"] // 2  # kv heads split
    assert tensor["activations"] < one["activations"]


def test_ensure_plan_fits_refuses_before_allocating():
    plan = memory.ensure_plan_fits(MICRO, {"fsdp": 1}, SMALL, device_memory_gib=1.0)
    assert plan.peak_bytes < GIB
    with pytest.raises(memory.PlanDoesNotFit, match=r"the RL memory plan on mesh .*'fsdp': 1.* does not fit"):
        memory.ensure_plan_fits(MICRO, {"fsdp": 1}, SMALL, device_memory_gib=0.0001)
    # the CPU has no known size: nothing to check against, the plan comes back
    assert memory.ensure_plan_fits(MICRO, {"fsdp": 1}, SMALL).peak_bytes == plan.peak_bytes


def _memory_config(**overrides):
    config = ml_collections.ConfigDict(dict(
        mode="memory_plan", seed=0, presets=("micro",), mesh=dict(data=1, fsdp=1, tensor=1), device_memory_gib=1.0,
        seq_len=32, batch_per_device=1, images_per_sample=1, patches_per_image=16, kv_cache_tokens=64,
        logprob_chunk=16, targets=("token_logprobs",), compile_layers=0, fail_if_not_fit=True))
    config.update(overrides)
    return config


def test_memory_plan_mode_reports_the_rl_plan_and_refuses_what_does_not_fit():
    micro = memory.run(_memory_config())["presets"]["micro"]["rl_plan"]
    assert micro["fits"] and micro["peak_phase"] == "update" and set(micro["components_gib"]) == {
        "params", "reference", "optimizer", "grads", "activations", "kv_cache"}
    with pytest.raises(memory.PlanDoesNotFit, match="preset micro on mesh .* does not fit: its update phase"):
        memory.run(_memory_config(device_memory_gib=0.0001))
    report = memory.run(_memory_config(device_memory_gib=0.0001, fail_if_not_fit=False))
    assert report["presets"]["micro"]["rl_plan"]["fits"] is False
    # planned for a GPU's cuDNN attention: the same plan less the decoder's and the vision tower's scores
    cudnn = memory.run(_memory_config(attention="cudnn"))["presets"]["micro"]["rl_plan"]["bytes"]
    einsum = micro["bytes"]
    assert cudnn["activations"] < einsum["activations"]
    assert {k: v for k, v in cudnn.items() if k != "activations"} == \
        {k: v for k, v in einsum.items() if k != "activations"}
    # splash: the decoder's scores only; the vision tower's stay
    splash = memory.run(_memory_config(attention="splash"))["presets"]["micro"]["rl_plan"]["bytes"]
    assert cudnn["activations"] < splash["activations"] < einsum["activations"]


def test_memory_plan_refuses_unknown_names_before_planning_any_preset():
    # a bad second preset is named before the first one compiles; ModeErrors print as one line
    with pytest.raises(modes.ModeError, match=r"unknown memory_plan presets \['9b'\]"):
        memory.run(_memory_config(presets=("micro", "9b")))
    with pytest.raises(modes.ModeError, match="unknown memory_plan targets"):
        memory.run(_memory_config(targets=("logit",)))
    with pytest.raises(modes.ModeError,
                       match="memory_plan attention must be 'einsum' .*, 'cudnn' .* or 'splash' .*got 'flash'"):
        memory.run(_memory_config(attention="flash"))


def test_launch_exits_with_one_line_when_the_plan_does_not_fit():
    repo = Path(__file__).parents[2]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    done = subprocess.run(
        [sys.executable, "launch.py", "--config", "configs/bench.py:memory", "--config.presets=('micro',)",
         "--config.mesh.fsdp=1", "--config.device_memory_gib=0", "--config.seq_len=32",
         "--config.patches_per_image=16", "--config.kv_cache_tokens=64", "--config.logprob_chunk=16",
         "--config.targets=('token_logprobs',)"],
        cwd=repo, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    errors = [line for line in done.stderr.splitlines() if line.startswith("launch.py: error:")]
    assert len(errors) == 1 and "preset micro on mesh" in errors[0] and "does not fit" in errors[0]
    assert "Traceback" not in done.stderr and done.stdout.strip() == ""


def test_smallest_fitting_slice_grows_with_the_model():
    small = memory.smallest_fitting_slice(MICRO, "v5p", SMALL)
    assert small["accelerator_type"] == "v5p-8" and small["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
    huge = dataclass_replace(SMALL, seq_len=1 << 17, remat=False)  # 4 heads x (128k)^2 scores x 6 bytes: 384 GiB
    assert memory.smallest_fitting_slice(MICRO, "v5e", huge) is None


def test_chips_per_host_of_each_slice():
    """One host is one jax process: the slice's VM (4 chips on v4 / v5p, and on v5e / v6e above 8 chips)."""
    assert [memory.chips_per_host(t) for t in ("v5p-8", "v5p-16", "v5p-128", "v4-8", "v4-32")] == [4] * 5
    assert [memory.chips_per_host(t) for t in ("v6e-1", "v6e-4", "v6e-8", "v6e-16", "v6e-256")] == [1, 4, 8, 4, 4]
    assert [memory.chips_per_host(t) for t in ("v5litepod-4", "v5litepod-8", "v5litepod-16",
                                               "v5litepod-128")] == [4, 8, 4, 4]


def test_smallest_fitting_slice_keeps_tensor_within_a_host():
    """A tensor axis wider than a host's chips would make processes share batch rows (refused at start), so the
    search does not offer it even where it would fit: v5litepod-128 with tensor=8 on 4-chip hosts was offered."""
    found = [memory.smallest_fitting_slice(MICRO, generation, SMALL, tensor_sizes=(8,))
             for generation in ("v5p", "v6e", "v5e")]
    assert found[0] is None  # v5p hosts hold 4 chips (v5p-16 has 8, on 2 hosts)
    assert found[1]["accelerator_type"] == "v6e-8" and found[1]["mesh"]["tensor"] == 8  # the one 8-chip v6e host
    assert found[2]["accelerator_type"] == "v5litepod-8"
