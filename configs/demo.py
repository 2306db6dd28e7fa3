"""Demo: the end-to-end run on a tiny random Qwen3-VL, small enough for a laptop CPU.

    python launch.py --config configs/demo.py [--config.seed=1]
"""

import ml_collections


def get_config():
    config = ml_collections.ConfigDict()
    config.mode = "demo"
    config.seed = 0
    config.workdir = "runs/demo"

    config.batch_size = 4  # conversations per forward
    return config
