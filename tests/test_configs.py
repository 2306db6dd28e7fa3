"""The paper-recipe configs (configs/rl.py:<size>,<hardware>, configs/sft.py:...) carry the paper's numbers and fit
the machines they name by the memory plan that the rl mode checks before it allocates; plans that cannot fit are
refused."""


import pytest

from axpo_jax.bench import devices
from axpo_jax.bench.memory import PlanDoesNotFit, check_fits, chips_per_host, rl_memory_plan
from axpo_jax.models.qwen3_vl import preset
from axpo_jax.train.rl_run import memory_settings
from tests.config_files import config_module

MEMORY = {"v5p": devices.TPU_V5P, "v6e": devices.TPU_V6E, "8xh100": devices.H100_SXM,
          "8xa100": devices.lookup("NVIDIA A100-SXM4-80GB")}
# the smallest slice documented for each preset (README, tpu/README.md) and the paper's 8 x A100
FITS = [("2b", "v5p-8"), ("4b", "v5p-8"), ("8b", "v5p-8"), ("32b", "v5p-32"), ("2b", "v6e-8"), ("4b", "v6e-8"),
        ("8b", "v6e-16"), ("32b", "v6e-64"), ("2b", "8xa100"), ("4b", "8xa100"), ("8b", "8xa100"), ("8b", "8xh100")]
TOO_SMALL = [("8b", "v6e-8"), ("32b", "v5p-16"), ("32b", "v6e-32"), ("32b", "8xh100")]


def _config(name: str, arg=None):
    return config_module(name).get_config(arg)


def _host_devices(hardware: str) -> int:
    return 8 if hardware.startswith("8x") else chips_per_host(hardware)


def _check(size: str, hardware: str):
    config = _config("rl", f"{size},{hardware}")
    mesh = dict(config.mesh)
    assert mesh["data"] * mesh["fsdp"] * mesh["tensor"] == (8 if hardware.startswith("8x") else
                                                            devices.chips_of(hardware))
    processes = mesh["data"] * mesh["fsdp"] * mesh["tensor"] // _host_devices(hardware)
    settings = memory_settings(config, mesh["data"] * mesh["fsdp"], processes,
                               backend="gpu" if hardware.startswith("8x") else "tpu")
    assert settings.fused_attention == hardware.startswith("8x")  # cuDNN's flash attention on the GPUs (bf16)
    spec = MEMORY[hardware.split("-")[0]]
    return check_fits(rl_memory_plan(preset(size), mesh, settings), spec.memory_bytes, settings.headroom)


@pytest.mark.parametrize("size,hardware", FITS)
def test_paper_recipe_fits(size, hardware):
    config = _config("rl", f"{size},{hardware}")
    assert (config.num_samples, config.axpo.k, config.axpo.ratio, config.eps_low, config.eps_high,
            config.kl_coef, config.max_turns, config.temperature) == (8, 4, 0.25, 0.2, 0.4, 1e-3, 3, 1.0)
    assert config.remat and config.dtype == "bfloat16"
    _check(size, hardware)


def test_only_cudnn_attention_is_planned_without_its_scores():
    """XLA's dot_product_attention materializes the S x S scores as the einsum attention does: only cuDNN's flash
    kernel is planned without them."""
    config = _config("rl", "8b,8xh100")
    for attention, fused in (("auto", True), ("cudnn", True), ("xla", False), ("einsum", False)):
        config.attention = attention
        assert memory_settings(config, 8, 1, backend="gpu").fused_attention == fused
    config.attention = "auto"
    assert not memory_settings(config, 8, 1, backend="tpu").fused_attention


@pytest.mark.parametrize("size,hardware", TOO_SMALL)
def test_plans_that_do_not_fit_are_refused(size, hardware):
    with pytest.raises(PlanDoesNotFit, match="does not fit"):
        _check(size, hardware)


@pytest.mark.parametrize("size,hardware", FITS + TOO_SMALL + [
    ("8b", "v5p-16"), ("2b", "v5p-64"), ("32b", "v6e-16"), ("32b", "v6e-8"), ("8b", "v6e-32"), ("32b", "v5litepod-128"),
    ("8b", "v4-32")])
def test_presets_keep_each_process_on_its_own_rows_one_per_device(size, hardware):
    """Every host owns its own batch rows (tensor within a host's devices: a wider tensor axis is refused at start),
    and an update's micro-batch is one row on each device: fewer rows per process would be replicated (each device
    computing the same rows), more would multiply the activations the memory plan counts."""
    for name in ("rl", "sft"):
        config = _config(name, f"{size},{hardware}")
        mesh, host = dict(config.mesh), _host_devices(hardware)
        assert host % mesh["tensor"] == 0, (name, mesh)
        processes = mesh["data"] * mesh["fsdp"] * mesh["tensor"] // host
        assert config.micro_batch_size == mesh["data"] * mesh["fsdp"] // processes, (name, config.micro_batch_size)
    settings = memory_settings(_config("rl", f"{size},{hardware}"), mesh["data"] * mesh["fsdp"], processes)
    assert settings.micro_batch_per_device == 1


def test_sft_recipe_follows_the_rl_machine():
    sft, rl = _config("sft", "8b,v5p-16"), _config("rl", "8b,v5p-16")
    assert sft.mode == "sft" and dict(sft.mesh) == dict(rl.mesh) and sft.tools == rl.tools
    with pytest.raises(ValueError, match="hardware"):
        _config("rl", "8b,tpu-9000")


def test_demo_config_and_its_digit_variant():
    """configs/demo.py: the mark task named in words (the default) or, with `:digit`, the demo before it; the task
    options of each are those of its task maker."""
    from axpo_jax.data.synthetic import make_synthetic_task

    default, digit = _config("demo"), _config("demo", "digit")
    assert default.task.to_dict() == {"kind": "mark", "grid": 2, "ask": "place"}
    assert digit.task.to_dict() == {"kind": "digit", "grid": 2}
    assert (digit.sft_examples, digit.sft.steps, digit.eval_tasks) == (64, 120, 16)
    assert (default.sft_examples, default.sft.steps, default.eval_tasks) == (256, 400, 32)
    assert make_synthetic_task(0, **default.task).kind == "mark" and make_synthetic_task(0, **digit.task).kind == "digit"
    with pytest.raises(ValueError, match="takes no argument or 'digit'"):
        _config("demo", "mark")
