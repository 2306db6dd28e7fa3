"""What an accelerator can do, by `jax.devices()[0].device_kind`: dense bf16 peak FLOP/s and memory per device.

MFU divides by the peak, and the memory planner checks a plan against the memory, so both read this one table.
One JAX device is one chip on every TPU listed (v4 and v5p run their two TensorCores as one "megacore" device)
and one GPU on the GPUs, so the numbers are per chip / per GPU.

Peaks are the vendors' dense (no sparsity) bf16 figures:
  * TPU v4 275 TFLOP/s, 32 GiB HBM             https://cloud.google.com/tpu/docs/v4
  * TPU v5e 197 TFLOP/s, 16 GiB HBM            https://cloud.google.com/tpu/docs/v5e
  * TPU v5p 459 TFLOP/s, 95 GiB HBM            https://cloud.google.com/tpu/docs/v5p
  * TPU v6e (Trillium) 918 TFLOP/s, 32 GiB HBM https://cloud.google.com/tpu/docs/v6e
  * H100 SXM 989 TFLOP/s, 80 GB; H100 PCIe 756 TFLOP/s, 80 GB (the datasheet's 1,979 / 1,513 are with 2:4
    sparsity, halved here)                     https://www.nvidia.com/en-us/data-center/h100/
  * H200 SXM 989 TFLOP/s, 141 GB; H200 NVL 835.5 TFLOP/s, 141 GB (1,979 / 1,671 with sparsity)
                                               https://www.nvidia.com/en-us/data-center/h200/
  * A100 312 TFLOP/s, 40 or 80 GB              https://www.nvidia.com/en-us/data-center/a100/
TPU memory sizes are the ones XLA itself assumes for each device kind (xla/python/ifrt GetDeviceMemoryInBytes).
The device_kind strings are what JAX reports: "TPU v5 lite" is v5e, "TPU v5" is v5p, "TPU v6 lite" is v6e.
"""

from __future__ import annotations

import dataclasses
import re

GIB = 1024**3
GB = 1000**3
TERA = 1e12


@dataclasses.dataclass(frozen=True)
class DeviceSpec:
    name: str  # short, stable name used in tables ("tpu_v5p", "h100_sxm")
    peak_bf16_flops: float  # dense, per device
    memory_bytes: int  # per device


TPU_V4 = DeviceSpec("tpu_v4", 275 * TERA, 32 * GIB)
TPU_V5E = DeviceSpec("tpu_v5e", 197 * TERA, 16 * GIB)
TPU_V5P = DeviceSpec("tpu_v5p", 459 * TERA, 95 * GIB)
TPU_V6E = DeviceSpec("tpu_v6e", 918 * TERA, 32 * GIB)
H100_SXM = DeviceSpec("h100_sxm", 989 * TERA, 80 * GB)
H100_PCIE = DeviceSpec("h100_pcie", 756 * TERA, 80 * GB)
H200 = DeviceSpec("h200", 989 * TERA, 141 * GB)
H200_NVL = DeviceSpec("h200_nvl", 835.5 * TERA, 141 * GB)
A100_40GB = DeviceSpec("a100_40gb", 312 * TERA, 40 * GB)
A100_80GB = DeviceSpec("a100_80gb", 312 * TERA, 80 * GB)

_TPU_KINDS = {
    "TPU v4": TPU_V4,
    "TPU v5 lite": TPU_V5E,
    "TPU v5e": TPU_V5E,
    "TPU v5": TPU_V5P,
    "TPU v5p": TPU_V5P,
    "TPU v6 lite": TPU_V6E,
    "TPU v6e": TPU_V6E,
}


def lookup(device_kind: str) -> DeviceSpec | None:
    """The spec of a device kind, or None when it is not in the table (MFU is then reported as unknown)."""
    if device_kind in _TPU_KINDS:
        return _TPU_KINDS[device_kind]
    kind = device_kind.upper()
    # GPU names carry board variants ("NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-40GB"): match by model as a whole
    # word (not "GH200" or "RTX A1000"), then form; the H100 NVL's figures are its own, not in the table.
    def model(name: str) -> bool:
        return re.search(rf"(?<![A-Z0-9]){name}(?![A-Z0-9])", kind) is not None

    if model("H200"):
        return H200_NVL if "NVL" in kind else H200
    if model("H100") and "NVL" not in kind:
        return H100_PCIE if "PCIE" in kind else H100_SXM
    if model("A100"):
        return A100_40GB if "40GB" in kind else A100_80GB
    return None


# ------------------------------------------------------------------------------------------- TPU slices

TPU_GENERATIONS = {"v4": TPU_V4, "v5e": TPU_V5E, "v5p": TPU_V5P, "v6e": TPU_V6E}

# Accelerator-type sizes offered for single-slice training, smallest first, as (name prefix, the sizes, chips per
# unit of the size). The size counts TensorCores on v4 and v5p (two per chip: v5p-8 is 4 chips) and chips on v5e
# and v6e (https://cloud.google.com/tpu/docs/v5p, .../v5e, .../v6e, .../v4).
_SLICE_SIZES = {
    "v4": ("v4", (8, 16, 32, 64, 128, 256, 512), 0.5),
    "v5p": ("v5p", (8, 16, 32, 64, 128, 256, 512, 1024), 0.5),
    "v5e": ("v5litepod", (1, 4, 8, 16, 32, 64, 128, 256), 1),
    "v6e": ("v6e", (1, 4, 8, 16, 32, 64, 128, 256), 1),
}


def tpu_slices(generation: str) -> list[tuple[str, int]]:
    """[(accelerator type, chips)] of a TPU generation, smallest first."""
    if generation not in _SLICE_SIZES:
        raise KeyError(f"unknown TPU generation {generation!r}; known: {sorted(_SLICE_SIZES)}")
    prefix, sizes, chips_per_unit = _SLICE_SIZES[generation]
    return [(f"{prefix}-{size}", int(size * chips_per_unit)) for size in sizes]


def chips_of(accelerator_type: str) -> int:
    """Chips (= JAX devices) in a slice named like `v5p-64` or `v5litepod-16`."""
    head, _, size = accelerator_type.rpartition("-")
    for prefix, sizes, chips_per_unit in _SLICE_SIZES.values():
        if head == prefix:
            if not (size.isdigit() and int(size) in sizes):  # v5p-15 or v6e-0 would make a mesh of 7 or 0 chips
                raise ValueError(f"unknown accelerator type {accelerator_type!r}: {prefix} slices are "
                                 f"{', '.join(f'{prefix}-{s}' for s in sizes)}")
            return int(int(size) * chips_per_unit)
    raise ValueError(f"unknown accelerator type {accelerator_type!r}; expected e.g. v5p-64, v6e-16, v5litepod-8, v4-32")
