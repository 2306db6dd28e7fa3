"""SFT on multi-turn tool-use trajectories (JSONL + images), the stage before RL.

    python launch.py --config configs/sft.py --config.checkpoint=<transformers folder> --config.data=<sft.jsonl>
    python launch.py --config configs/sft.py:8b,v5p-64 --config.checkpoint=... --config.data=...

Writes `<workdir>/hf_checkpoint`, the starting point of `configs/rl.py`. Hardware names as in configs/rl.py.
"""

import importlib.util
import os

import ml_collections


def _rl_config():
    spec = importlib.util.spec_from_file_location("_rl_config", os.path.join(os.path.dirname(__file__), "rl.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def get_config(arg=None):
    config = ml_collections.ConfigDict()
    config.mode = "sft"
    config.seed = 0
    config.workdir = "runs/sft"
    config.checkpoint = ""
    config.data = ""  # SFT JSONL (axpo_jax/data/synthetic.py:write_sft_jsonl)
    config.dtype = ""
    # attention of whole sequences (update forwards, prompt prefills) and of each image in the vision tower: "auto" =
    # cuDNN flash attention on a GPU in bfloat16, the einsum attention elsewhere; "einsum" | "cudnn" | "xla" force
    # one; "splash": Pallas' TPU flash kernel for the decoder (not run on a TPU yet; models/qwen3_vl/model.py)
    config.attention = "auto"
    # > 0: the largest area (pixels) an image or crop is resized within; 0: the processor folder's own (Qwen3-VL's:
    # 16,777,216 pixels = 16,384 image tokens; data/processor.py)
    config.max_image_pixels = 0
    config.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
    config.tools = ("image_zoom_in",)  # schemas shown in the system prompt: the same tools as RL
    config.steps = 120
    config.batch_size = 4
    config.micro_batch_size = 4
    config.max_length = 4096  # longer conversations are skipped and counted
    config.length_bucket = 64  # batches pad to a power of two >= this (fewer shapes, fewer compiles)
    config.learning_rate = 5e-3
    config.warmup_fraction = 0.1
    config.weight_decay = 0.0
    config.max_grad_norm = 1.0
    # an update whose gradients are not finite is skipped (the weights and Adam's state stay, `skipped_updates`
    # counts it); this many in a row stop the run with an error, before that step's checkpoint
    config.max_consecutive_skipped_updates = 10
    config.logprob_chunk = 256
    config.remat = False
    config.checkpoint_every = 20
    config.keep_checkpoints = 2
    config.tensorboard = True
    if arg:
        rl = _rl_config().get_config(arg)
        size, _, hardware = arg.partition(",")
        config.workdir = f"runs/sft_{size}_{hardware}"
        config.dtype, config.mesh, config.tools = rl.dtype, rl.mesh, rl.tools
        config.max_image_pixels = rl.max_image_pixels  # SFT sees images as RL will (its exported folder keeps it)
        config.max_length = rl.capacity
        config.batch_size = 64  # unstated (the paper: 64,274 trajectories)
        config.micro_batch_size = rl.micro_batch_size
        config.remat = True
        config.steps = 2000  # ~2 epochs at 64 per step
        config.learning_rate = 1e-5  # unstated
        config.warmup_fraction = 0.03
        config.checkpoint_every = 100
    return config
