"""RL with AXPO (or GRPO / an ablation) from a transformers checkpoint folder.

    python launch.py --config configs/rl.py --config.checkpoint=runs/sft/hf_checkpoint --config.tasks=tasks.jsonl
    python launch.py --config configs/rl.py:8b,v5p-16 --config.checkpoint=/mnt/gcs/<bucket>/sft_8b/hf_checkpoint \
        --config.tasks=/mnt/gcs/<bucket>/rl_tasks.jsonl --config.search_corpus=/mnt/gcs/<bucket>/corpus.jsonl
        (tpu/pod.py mounts gs://<bucket> at /mnt/gcs/<bucket>; the presets give the policy the paper's three tools,
        so search needs a backend: search_corpus for offline BM25, or search_endpoint + search_api_key_env)

Without an argument: the tiny defaults the tests and the demo use (a synthetic task, CPU). With `<size>,<hardware>`
(size: 2b | 4b | 8b | 32b; hardware: v5p-<cores> | v6e-<chips> | 8xh100 | 8xa100): the paper's recipe (N=8, K=4,
r=0.25, ε 0.2/0.4, β 1e-3 toward the SFT model, 3 turns, temperature 1.0) on that machine's mesh. What the paper does
not state is chosen here and marked "unstated" (AXPO.md §3): learning rate, questions per step, token limits.
Check that a plan fits before renting: configs/bench.py:memory (and tpu/README.md's table); the mode itself
refuses a plan that does not fit the device (axpo_jax/bench/memory.py:ensure_plan_fits).
"""

import ml_collections

_GPU_MACHINES = {"8xh100": 8, "8xa100": 8}  # GPUs per machine name


def _devices(hardware: str) -> int:
    """JAX devices of a machine name: a GPU machine above, or a TPU slice (v5p-<cores>, v6e-<chips>, ...)."""
    from axpo_jax.bench.devices import chips_of

    if hardware in _GPU_MACHINES:
        return _GPU_MACHINES[hardware]
    try:
        return chips_of(hardware)
    except ValueError as error:
        raise ValueError(f"unknown hardware {hardware!r}; use a TPU slice such as v5p-16 or v6e-16, 8xh100 or "
                         f"8xa100") from error


def _hosts(hardware: str) -> int:
    """Hosts (jax processes) of a machine name: one GPU machine, or a TPU slice's VMs."""
    from axpo_jax.bench.memory import chips_per_host

    return 1 if hardware in _GPU_MACHINES else _devices(hardware) // chips_per_host(hardware)


def get_config(arg=None):
    config = ml_collections.ConfigDict()
    config.mode = "rl"
    config.seed = 0
    config.workdir = "runs/rl"
    config.checkpoint = ""  # transformers folder of the starting policy (the SFT result)
    config.reference = ""  # the KL reference; "" = the starting checkpoint
    config.dtype = ""  # "" = float32; "bfloat16" on accelerators
    # attention of whole sequences (update forwards, prompt prefills) and of each image in the vision tower: "auto" =
    # cuDNN flash attention on a GPU in bfloat16, the einsum attention elsewhere; "einsum" | "cudnn" | "xla" force
    # one; "splash": Pallas' TPU flash kernel for the decoder (not run on a TPU yet; models/qwen3_vl/model.py)
    config.attention = "auto"
    # > 0: the largest area (pixels) an image or crop is resized within; 0: the processor folder's own (Qwen3-VL's:
    # 16,777,216 pixels = 16,384 image tokens; data/processor.py)
    config.max_image_pixels = 0
    config.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))  # -1: every remaining device
    config.device_memory_gib = 0.0  # > 0: refuse a plan above this per device; 0: the device's own size (if known)

    # data: "synthetic:<n>" or a task JSONL ({"question", "images", "answer"}; axpo_jax/data/tasks.py)
    config.tasks = "synthetic:256"
    config.reward_kind = "exact"  # axpo_jax/algo/rewards.py: exact | numeric | choice | math | f1
    config.tools = ("image_zoom_in",)  # + "python", "search"
    config.search_corpus = ""  # JSONL corpus for the offline BM25 search backend
    config.search_endpoint = ""  # or a JSON web-search API (tools/search.py HTTPSearchBackend) ...
    config.search_api_key_env = ""  # ... with its key in this environment variable

    # the agent loop (paper: 3 turns in training)
    config.max_turns = 3
    config.max_new_tokens_per_turn = 128
    config.capacity = 1024  # KV-cache slots per trajectory: prompt + every turn + observations
    config.pipeline_groups = 1  # 2: half the rows decode while the other half's tools run
    # decode runs in segments whose attention window (a power of two) holds at least this many more tokens:
    # larger = fewer segments and compiled windows, smaller = windows closer to the rows' lengths
    config.decode_segment_tokens = 64
    # True: extends pad images to the largest image shape seen so far (rollout.sampler.ImageBuckets), so crops of
    # varying size stop compiling new extend programs after the first steps; False: each chunk's own buckets
    config.sticky_image_buckets = True
    config.tool_timeout_s = 12.0
    config.temperature = 1.0  # paper: 1.0 in training
    config.top_p = 1.0
    config.top_k = 0
    config.presence_penalty = 0.0

    # algorithm (paper §3-4); axpo fields = AXPOConfig, every ablation one switch
    config.algo = "axpo"  # axpo | grpo
    config.num_samples = 4  # N
    config.questions_per_step = 4  # B (unstated)
    config.axpo = ml_collections.ConfigDict(dict(
        ratio=0.5, k=2, ranking="confidence", resample_from="first_tool_call", candidates="failed_tool",
        prefix_credit=True, merge_into_source_group=False, renormalize_whole_group=False,
        budget_unit="continuations"))
    # True: AXPO's continuations always run as a batch of the budget's most prefixes x K rows (unused rows start
    # finished), so steps that select different numbers of prefixes share one compiled fork sampler; cheap on a
    # memory-bound accelerator, on the CPU the unused rows are decoded too. False: only the selected rows
    config.fixed_resample_batch = True
    # the group normalizer every algorithm's advantages share (AXPO.md §3: unstated in the paper): divide by the
    # group std (False: mean-centering only, Dr. GRPO), the std's epsilon for all-equal groups and its ddof
    # (0: population std; 1: verl's sample std); rollouts cut off by the turn/token/cache limit: "keep" (reward 0,
    # trained as failures) or "exclude" (in no statistics, not trained)
    config.advantage = ml_collections.ConfigDict(dict(std_normalize=True, eps=1e-6, ddof=0, truncation="keep"))
    config.eps_low, config.eps_high = 0.2, 0.4
    config.kl_coef = 1e-3  # β toward the reference
    config.kl_kind = "low_var_kl"  # k1 | k2 | k3 | low_var_kl (unstated; verl's clamped k3)
    # how per-token losses make a batch's loss (unstated): "token-mean" (DAPO, whose clip the paper uses),
    # "seq-mean-token-mean" (each response weighs the same: original GRPO), "seq-mean-token-sum"
    config.loss_aggregation = "token-mean"
    # a step where every trained token's advantage is 0 (all groups' rewards equal, no AXPO continuation with a
    # signal): False updates on the KL term's gradient alone, which Adam rescales to a learning-rate-sized step;
    # True skips the update (the policy and the optimizer's state and schedule stay), as DAPO drops such groups
    config.skip_zero_signal_steps = False

    # optimization (unstated in the paper)
    config.steps = 8
    config.learning_rate = 5e-4
    config.warmup_fraction = 0.0
    config.weight_decay = 0.0
    config.max_grad_norm = 1.0
    # an update whose gradients are not finite is skipped (the weights and Adam's state stay, `skipped_updates`
    # counts it); this many in a row stop the run with an error, before that step's checkpoint
    config.max_consecutive_skipped_updates = 10
    config.micro_batch_size = 4
    # optimizer updates per step (unstated): the step's rows are split M ways (row i to update i mod M). 1: one
    # on-policy update, where ρ = 1 and the clip never binds (and no forward pass for π_old runs); M > 1: the later
    # updates are off-policy and the clip limits them, as in verl / EasyR1 with a PPO mini-batch below the train batch
    config.updates_per_step = 1
    config.logprob_chunk = 256
    config.remat = False  # recompute decoder layers and vision blocks in the backward pass (True on pods: one layer)
    # how the step's forked AXPO continuations are laid out: 0 = one block per data shard over processes (what a
    # multi-host run needs); a single process given a multi-host run's shard count builds that run's global
    # batches exactly (to check a multi-host run against one process, as tests/parallel does)
    config.layout_shards = 0

    # bookkeeping
    config.checkpoint_every = 1
    config.keep_checkpoints = 2
    config.tensorboard = True
    # evaluation during training (axpo_jax/eval), logged with the step's metrics as eval/<benchmark>/...
    config.eval_every = 4  # steps; 0 = never (the last step is always evaluated otherwise)
    config.eval_tasks = "synthetic:8"  # held-out questions ("heldout"), a task source spec; "" = none
    config.eval_benchmarks = ()  # e.g. ("vstar", "hrbench4k"): the paper's benchmarks, read from eval_data_dir
    config.eval_data_dir = "data/eval"
    config.eval_max_questions = 0  # per benchmark; 0 = all
    config.eval_batch_size = 8  # questions per rollout batch
    # greedy, one sample, training's limits: the tiny model is derailed by the paper's presence penalty
    config.eval_samples = 1
    config.eval_temperature = 0.0
    config.eval_top_p = 1.0
    config.eval_top_k = 0
    config.eval_presence_penalty = 0.0
    config.eval_max_turns = 3
    config.eval_capacity = 1024
    config.eval_max_new_tokens_per_turn = 128

    if arg:
        size, _, hardware = arg.partition(",")
        if size not in ("2b", "4b", "8b", "32b") or not hardware:
            raise ValueError(f"configs/rl.py takes '<size>,<hardware>' (size 2b|4b|8b|32b), got {arg!r}")
        devices = _devices(hardware)
        config.workdir = f"runs/rl_{size}_{hardware}"
        config.dtype = "bfloat16"
        # 32B does not fit pure FSDP on v6e's 32 GiB chips at these lengths: heads/MLP split 2 ways too
        # (tpu/README.md's table, from the memory plan), within each host's 4 or 8 chips: processes that shared
        # batch rows would each run those rows' tools, so a mesh whose tensor axis crosses hosts is refused
        tensor = 2 if size == "32b" and hardware.startswith("v6e") and devices > 1 else 1
        config.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=devices // tensor, tensor=tensor))
        config.tasks = ""  # must be given: the RL question set (the paper: ~37K questions)
        config.tools = ("image_zoom_in", "python", "search")
        config.max_new_tokens_per_turn = 2048  # unstated
        config.capacity = 8192  # unstated: prompt with images + 3 turns + observations (the KV cache of every row)
        # unstated: at most 1,280 image tokens per image or crop (32 x 32 pixels each), so a high-resolution image
        # (HR-Bench's 4K / 8K) leaves the row room for its turns; the processor's own limit is 16,384 tokens
        config.max_image_pixels = 1280 * 32 * 32
        config.num_samples = 8  # paper N
        config.questions_per_step = 16  # unstated; B x N + r B N = 160 rows decode together (KV cache: memory plan)
        config.axpo.ratio, config.axpo.k = 0.25, 4  # paper r, K
        config.steps = 400  # unstated
        config.learning_rate = 1e-6  # unstated; a common value for RL of 2-8B VLMs
        config.warmup_fraction = 0.02
        # rows per process: one per batch device of the host (fewer would be replicated on every device, each
        # computing the same rows; more would multiply the update's activations)
        config.micro_batch_size = devices // tensor // _hosts(hardware)
        config.updates_per_step = 4  # unstated; verl's and EasyR1's Qwen-VL GRPO examples: train batch 512 / 128
        config.remat = True
        config.checkpoint_every = 10
        config.keep_checkpoints = 3
        # the paper's evaluation settings, on whichever benchmarks are given (eval_benchmarks, eval_data_dir)
        config.eval_tasks = ""
        config.eval_every = 50
        config.eval_samples, config.eval_temperature, config.eval_top_p = 4, 0.7, 0.8
        config.eval_top_k, config.eval_presence_penalty = 20, 1.5
        config.eval_max_turns, config.eval_capacity, config.eval_max_new_tokens_per_turn = 5, 32768, 32768
        config.eval_batch_size = 1
    return config
