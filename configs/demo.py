"""Demo: SFT then AXPO on the synthetic zoom task with a tiny random Qwen3-VL, on a laptop CPU in minutes.

    python launch.py --config configs/demo.py [--config.rl.algo=grpo --config.seed=1 ...]

The two stages are the `sft` and `rl` modes with their own configs (configs/sft.py, configs/rl.py) as sub-configs;
the demo fills in the checkpoint folders and data it makes.
"""

import importlib.util
import os

import ml_collections


def _load(name):
    spec = importlib.util.spec_from_file_location(f"_{name}_config", os.path.join(os.path.dirname(__file__), f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def get_config():
    config = ml_collections.ConfigDict()
    config.mode = "demo"
    config.seed = 0
    config.workdir = "runs/demo"

    # the tiny model (tiny_config_dict fields)
    config.model = ml_collections.ConfigDict(dict(hidden_size=64, num_hidden_layers=3, vision_depth=2,
                                                  deepstack_visual_indexes=(0, 1), rope_theta=5_000_000.0))
    # rope_theta: Qwen3-VL's 5e6 leaves a 16-dim head ~2 useful rotation frequencies over a turn's length; one run
    # with 1e4 got after-SFT Pass@1 0.25 (vs 0.0 with 5e6 at seed 0) and 0.0 after RL: one seed, not yet a default
    # the synthetic zoom task's options (axpo_jax/data/synthetic.py:make_task) for the SFT data, RL and eval tasks.
    # grid=2: the red box sits in one of 4 cells, so the expert bbox is one of 4 strings; the digit still needs the
    # zoom (tests/data/test_synthetic.py checks the demo's variant). With the full 6x6 grid (36 bboxes) SFT at these
    # sizes wrote malformed boxes and never answered (after-SFT Pass@1 0.0); with grid=2 it calls the tool, gets
    # the crop and answers every held-out task (Pass@1 0.12-0.38 over 4 runs; README, Results).
    # kind="mark" (`--config.task.kind=mark`): name the colour of the mark in the box the question names
    # (make_mark_task); the model learns to read it from the crop, but not yet which box to zoom on (README, Results)
    config.task = ml_collections.ConfigDict(dict(kind="digit", grid=2))
    config.eval_tasks = 16  # held-out synthetic tasks, greedy, before SFT / after SFT / during and after RL

    # SFT on generated expert trajectories, written as JSONL + PNGs and read back through the sft mode
    config.sft_examples = 64
    config.sft_tool_fraction = 0.9
    config.sft = _load("sft")
    config.sft.length_bucket = 1024  # every demo conversation fits: one compiled shape
    config.sft.checkpoint_every = 40

    # RL (configs/rl.py's tiny defaults: AXPO, N=4, K=2, r=0.5, 8 steps on 4 questions, lr 5e-4, β 1e-3)
    config.rl = _load("rl")
    config.rl.eval_every = 0  # the demo evaluates after the last step only
    return config
