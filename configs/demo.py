"""Demo: SFT then AXPO on the synthetic zoom task with a tiny random Qwen3-VL, on a laptop CPU in minutes.

    python launch.py --config configs/demo.py [--config.algo=grpo --config.seed=1 ...]
"""

import ml_collections


def get_config():
    config = ml_collections.ConfigDict()
    config.mode = "demo"
    config.seed = 0
    config.workdir = "runs/demo"

    # the tiny model (tiny_config_dict fields)
    config.model = ml_collections.ConfigDict(dict(hidden_size=64, num_hidden_layers=3, vision_depth=2,
                                                  deepstack_visual_indexes=(0, 1)))
    # agent loop (paper: 3 turns in training)
    config.max_turns = 3
    config.max_new_tokens_per_turn = 128
    config.capacity = 1024  # KV-cache slots per trajectory
    config.tool_timeout_s = 12.0
    config.eval_tasks = 8

    # SFT on expert trajectories
    config.sft_examples = 64
    config.sft_tool_fraction = 0.9
    config.sft_steps = 120
    config.sft_batch = 4
    config.sft_lr = 5e-3

    # RL
    config.algo = "axpo"  # "axpo" | "grpo"
    config.rl_steps = 8
    config.rl_tasks = 256
    config.questions_per_step = 4
    config.num_samples = 4  # N
    config.k = 2  # K continuations per selected prefix
    config.ratio = 0.5  # r: extra continuations <= r * B * N
    config.rl_lr = 5e-4  # 10x below the SFT rate, as RL recipes do
    config.kl_coef = 1e-3  # β, toward the SFT model
    config.micro_batch_size = 4
    return config
