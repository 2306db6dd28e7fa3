"""Benchmarks. The argument after the colon picks one:

    python launch.py --config configs/bench.py:forward   # mode bench_forward: model forward pass timing
    python launch.py --config configs/bench.py:update    # mode bench_update: RL update step vs the same in torch
    python launch.py --config configs/bench.py:memory    # mode memory_plan: per-device memory of a pod plan
    python launch.py --config configs/bench.py:sampler   # mode bench_sampler: KV-cache sampler vs HF generate
    python launch.py --config configs/bench.py:fork      # mode bench_fork: forking a prefix vs re-prefilling it
    python launch.py --config configs/bench.py:decode_window  # mode bench_decode_window: growing vs one window
    python launch.py --config configs/bench.py:tool_overlap  # mode bench_tool_overlap: tool time hidden by device
    python launch.py --config configs/bench.py:algos     # mode bench_algos: AXPO vs GRPO at equal sampled tokens
    python launch.py --config configs/bench.py:perception  # mode bench_perception: what SFT teaches the demo's vision
"""

import importlib.util
import os

import ml_collections

_MODES = {"forward": "bench_forward", "update": "bench_update", "memory": "memory_plan", "sampler": "bench_sampler",
          "fork": "bench_fork", "decode_window": "bench_decode_window", "tool_overlap": "bench_tool_overlap",
          "algos": "bench_algos", "perception": "bench_perception"}


def _demo_config():
    spec = importlib.util.spec_from_file_location("_demo_config", os.path.join(os.path.dirname(__file__), "demo.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def get_config(arg=None):
    if arg not in _MODES:
        raise ValueError(f"configs/bench.py needs one of {sorted(_MODES)} after a colon, got {arg!r} "
                         f"(e.g. --config configs/bench.py:forward)")
    config = ml_collections.ConfigDict()
    config.mode = _MODES[arg]
    config.seed = 0

    if arg == "forward":
        config.preset = "tiny"  # "micro" (tests), "tiny" (default, < 1 min on 2 cores), "small" (manual runs)
        config.batch = 4
        config.seq_len = 128
        config.num_images = 1  # per sample
        config.image_size = 128  # 8x8 patches of 16 px: 16 image tokens per image
        config.repeats = 10  # timed runs of each, interleaved torch / flax
        config.torch_threads = 0  # 0: os.cpu_count()
        config.max_logits_diff = 1e-4  # fp32; a larger Flax-vs-torch difference fails the run
    elif arg == "update":
        config.preset = "tiny"  # see axpo_jax/bench/forward.py PRESETS
        config.batch = 4
        config.seq_len = 128  # the loss mask covers the second half of each row
        config.num_images = 1  # per sample
        config.image_size = 128  # 8x8 patches of 16 px: 16 image tokens per image
        config.repeats = 5  # timed steps of each, interleaved torch / jax
        config.kl_coef = 0.0  # > 0: + beta * low_var_kl against a frozen copy of the initial weights
        config.learning_rate = 1e-5
        config.torch_threads = 0  # 0: os.cpu_count()
        config.max_loss_rel_diff = 1e-4  # first-step JAX-vs-torch agreement, else the run fails
        config.max_logprob_diff = 1e-4
        config.max_grad_norm_rel_diff = 1e-3
        config.dtype = "float32"  # "bfloat16" on accelerators (then loosen the three checks above)
        config.torch_device = "cpu"  # "auto": CUDA when JAX and torch both see a GPU; "cuda"
        config.attention = "auto"  # the JAX update's attention (configs/rl.py): cuDNN on a GPU in bf16, else einsum
    elif arg == "sampler":
        config.preset = "tiny"  # see axpo_jax/bench/forward.py PRESETS
        config.batch = 8
        config.prompt_len = 64  # tokens per prompt, its image included
        config.image_size = 128  # one image per prompt: 8x8 patches of 16 px, 16 image tokens
        config.new_tokens = 128  # no stop: every row generates all of them
        # "greedy" (the check: identical tokens); "train" (temperature 1, the RL rollouts') or "eval" (the paper's
        # 0.7 / 0.8 / 20 / 1.5) or "nucleus" (temperature 1, top-p 0.95 alone) sample on both sides, then the record
        # adds the draw alone vs a whole-vocabulary draw
        config.sampling = "greedy"
        config.repeats = 3  # timed runs of each, interleaved generate / sampler
        config.torch_threads = 0  # 0: os.cpu_count()
        config.min_identical_rows = 1.0  # fp32: every row must generate exactly transformers' tokens
        config.dtype = "float32"  # "bfloat16" on accelerators (then min_identical_rows=0: rounding differs)
        config.torch_device = "cpu"  # "auto": CUDA when JAX and torch both see a GPU; "cuda"
        config.attention = "auto"  # the prompts' prefill attention (configs/rl.py): cuDNN on a GPU in bf16
    elif arg == "fork":
        config.preset = "tiny"
        config.prefixes = 2
        config.k = 4  # continuations per prefix: prefixes * k cache rows
        config.prefix_len = 1024  # tokens per prefix, its images included
        config.num_images = 2  # per prefix
        config.image_size = 256  # 16x16 patches of 16 px, 64 image tokens per image
        config.new_tokens = 32
        config.repeats = 5  # interleaved fork / re_prefill / fork_in_place
        config.fork_in_place = True  # also time forking inside a batch-(prefixes*k) prefill (as slow as re-prefill)
    elif arg == "decode_window":
        config.preset = "tiny"
        config.batch = 8
        config.prompt_len = 64  # tokens per prompt, its image included
        config.image_size = 128
        config.max_new_tokens = 512  # the turn's budget (configs/rl.py's paper preset allows 2048)
        config.capacity = 1024
        config.stop_near = 100  # every row ends between step stop_near / 2 and this one
        config.temperature = 0.0  # greedy; 1.0 samples (random bf16 models repeat themselves greedily)
        config.repeats = 5  # interleaved growing / whole_turn
        config.min_identical_rows = 1.0  # fp32: both must decode the same tokens (bf16: 0, windows round apart)
        config.dtype = "float32"
        config.torch_device = "cpu"  # where transformers builds the random model ("auto": CUDA when there is one)
    elif arg == "tool_overlap":
        config.tasks = 2
        config.samples = 4  # rows = tasks * samples
        config.tool_turns = 2  # turns that call the tool; one more answers
        config.tool_sleep_s = 0.25  # per call (a turn's calls run concurrently); ~ one decode turn of device time
        config.think_tokens = 96  # filler tokens per scripted turn (each one a real decode step)
        config.capacity = 1024  # KV-cache slots per row (decode cost grows with it: attention spans every slot)
        config.repeats = 3
        config.pipeline_groups = 2  # the pipelined loop's row groups (the synchronous loop is timed beside it)
    elif arg == "algos":
        config.workdir = "runs/axpo_vs_grpo"
        config.demo = _demo_config()  # the SFT policy every run starts from, and the RL settings
        config.seeds = (0, 1, 2)
        config.variants = ("axpo", "grpo_equal")  # + "grpo" (same N as AXPO)
        config.steps = 8
        config.eval_tasks = 16
        config.eval_every = 4
    elif arg == "perception":
        demo = _demo_config()
        config.workdir = "runs/perception"
        config.model, config.task = demo.model, demo.task  # the demo's tiny model and task variant
        config.probes = ("colour", "quadrant", "digit", "mark", "mark_full")  # axpo_jax/bench/perception.py
        config.steps = 150  # per probe; the demo's SFT stage takes 120 steps of 4 conversations
        config.batch_size = 16
        config.train_examples = 256
        config.eval_examples = 16
        config.eval_every = 25
        config.learning_rate = 3e-3
    else:  # memory
        config.presets = ("8b", "32b")
        config.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=8, tensor=1))
        config.device_memory_gib = 95.0  # TPU v5p HBM
        config.fail_if_not_fit = True  # exit 1 with a one-line error when a preset's RL plan exceeds the device
        config.seq_len = 2048
        config.batch_per_device = 1
        config.images_per_sample = 1
        config.patches_per_image = 1024  # a 512x512 image: 32x32 patches of 16 px, 256 image tokens
        config.kv_cache_tokens = 8192  # per sequence, for the analytic rollout KV cache
        config.logprob_chunk = 256
        # the update's attention in the RL plan: "einsum" (every head's S x S scores are held), "cudnn" (an NVIDIA
        # GPU's flash attention, decoder and vision tower: each query's softmax statistics) or "splash" (a TPU's
        # flash kernel, the decoder only)
        config.attention = "einsum"
        config.targets = ("logits", "token_logprobs")
        # > 0: compile with this many and twice as many decoder layers, extrapolate temp memory to full depth.
        config.compile_layers = 0
        # The plan is compiled for fake CPU devices, one per mesh device (follows --config.mesh.* overrides).
        config.jax_platforms = "cpu"
        config.xla_host_device_count = (
            config.mesh.get_ref("data") * config.mesh.get_ref("fsdp") * config.mesh.get_ref("tensor")
        )
    return config
