"""Benchmarks. The argument after the colon picks one:

    python launch.py --config configs/bench.py:forward   # mode bench_forward: model forward pass timing
    python launch.py --config configs/bench.py:memory    # mode memory_plan: per-device memory of a pod plan
"""

import ml_collections

_MODES = {"forward": "bench_forward", "memory": "memory_plan"}


def get_config(arg=None):
    if arg not in _MODES:
        raise ValueError(f"configs/bench.py needs one of {sorted(_MODES)} after a colon, got {arg!r} "
                         f"(e.g. --config configs/bench.py:forward)")
    config = ml_collections.ConfigDict()
    config.mode = _MODES[arg]
    config.seed = 0

    if arg == "forward":
        config.preset = "tiny"
        config.batch = 4
        config.seq_len = 128
        config.num_images = 1
        config.image_size = 64
        config.repeats = 5
    else:  # memory
        config.presets = ("8b", "32b")
        config.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=8, tensor=1))
        config.device_memory_gib = 95
        config.seq_len = 4096
        config.batch_per_device = 1
    return config
