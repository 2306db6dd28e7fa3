"""Evaluation on the paper's benchmarks (docs/AXPO.md §5) with the paper's settings.

    python launch.py --config configs/eval.py --config.checkpoint=/path/to/Qwen3-VL-folder \
        [--config.benchmarks=vstar,hrbench4k] [--config.data_dir=data/eval] [--config.output_dir=runs/eval]

An orbax checkpoint from training: --config.checkpoint=<the transformers folder it was trained from>
--config.orbax_dir=<its checkpoint directory> [--config.orbax_step=<step>, default the latest].

Each benchmark is read from the files its authors publish, downloaded under data_dir as published (the default
path of each is in axpo_jax/eval/benchmarks/__init__.py), or from --config.data.<name>=<file or folder>.
Rerunning with the same output_dir resumes: questions with records are not run again.
"""

import ml_collections

# axpo_jax.eval.benchmarks.BENCHMARKS, in the paper's column order; listed here because a config must not import
# the package (it imports jax, and launch.py applies the config's environment before jax is imported)
BENCHMARKS = ("mathvision", "dynamath", "mathvr", "vstar", "visualprobe", "hrbench4k", "hrbench8k", "hrmmsearch",
              "mmsearch")


def get_config():
    config = ml_collections.ConfigDict()
    config.mode = "eval"

    # the policy
    config.checkpoint = ""  # transformers-format folder: architecture and processor, and the weights without orbax
    config.orbax_dir = ""  # an orbax checkpoint directory (train.checkpoints.Checkpointer): its model parameters
    config.orbax_step = -1  # -1: the latest step
    config.dtype = "bfloat16"  # "bfloat16" | "float32"
    # attention of whole sequences (update forwards, prompt prefills) and of each image in the vision tower: "auto" =
    # cuDNN flash attention on a GPU in bfloat16, the einsum attention elsewhere; "einsum" | "cudnn" | "xla" force
    # one; "splash": Pallas' TPU flash kernel for the decoder (not run on a TPU yet; models/qwen3_vl/model.py)
    config.attention = "auto"
    # > 0: the largest area (pixels) an image or crop is resized within; 0: the processor folder's own (Qwen3-VL's:
    # 16,777,216 pixels = 16,384 image tokens; data/processor.py)
    config.max_image_pixels = 0
    # with several devices: parameters sharded over fsdp x tensor, trajectory rows over data x fsdp (-1: the rest)
    config.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
    config.model_name = ""  # the row label in the table; default: the folder's name (and orbax step)

    # the benchmarks
    config.benchmarks = ",".join(BENCHMARKS)
    config.data_dir = "data/eval"
    config.data = ml_collections.ConfigDict({name: "" for name in BENCHMARKS})  # per-benchmark file/folder override
    config.max_questions = 0  # > 0: only the first N questions of each benchmark (smoke runs); records stay valid

    # the paper's evaluation settings (axpo_jax/eval/settings.py)
    config.num_samples = 4
    config.temperature = 0.7
    config.top_p = 0.8
    config.top_k = 20
    config.presence_penalty = 1.5
    config.max_turns = 5
    config.max_total_tokens = 32768  # per trajectory (the KV-cache capacity of its row)
    config.max_new_tokens_per_turn = 32768  # bounded by what is left of max_total_tokens
    config.batch_size = 8  # questions per batch (x num_samples rows); results depend on it: keep it to resume
    config.seed = 0

    # tools: image_zoom_in and python everywhere, search added for the search benchmarks
    config.tools = "image_zoom_in,python"
    config.tool_timeout_s = 12.0
    config.search_corpus = ""  # JSONL of {"title", "url", "text"}: an offline BM25 search backend
    config.search_endpoint = ""  # or a JSON web-search API (tools/search.py HTTPSearchBackend) ...
    config.search_api_key_env = ""  # ... with its key in this environment variable

    # prompts and scoring
    config.system_prompt = ""  # "" = none (the chat template still lists the tools)
    config.prompt_suffix = ""  # appended to every question on a new line, e.g. an answer-format instruction
    config.judge = ""  # "package.module:callable", judge(question, reference, prediction) -> score in [0, 1]

    config.output_dir = "runs/eval"
    config.save_responses = True  # keep each sample's text in the records
    return config
