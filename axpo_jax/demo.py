"""The embedded default job: a tiny Qwen3-VL checkpoint made on the spot, run through the real code path.

Today it builds the checkpoint folder (random weights, a locally trained tokenizer with Qwen's special tokens
and chat template, the processor config), loads it exactly as a real checkpoint is loaded (processor from the
folder, weights placed on a mesh over the local devices), renders multimodal tool-use prompts with the chat
template, and runs the jitted forward and per-token log-probs. SFT and AXPO training join this job as the
trainer lands (see the README's status section).
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np
from PIL import Image, ImageDraw


def _log(message: str) -> None:
    print(f"[demo] {message}", file=sys.stderr, flush=True)


def build_tiny_checkpoint(folder: str, *, seed: int) -> dict:
    """Processor files + random weights in one transformers-format folder; returns the config dict."""
    from axpo_jax.data.tiny_processor import build_tiny_processor
    from axpo_jax.models.qwen3_vl.tiny import tiny_config_dict, write_random_checkpoint

    special = build_tiny_processor(folder, patch_size=8, min_pixels=32 * 32, max_pixels=96 * 96)
    config = tiny_config_dict(
        vocab_size=special["vocab_size"], patch_size=8, num_position_embeddings=64, special_token_ids=special
    )
    write_random_checkpoint(folder, config, seed=seed)
    return config


def synthetic_image(seed: int, size: int = 96) -> Image.Image:
    """A grey canvas with one small digit: legible only when zoomed in, the shape of the RL task to come."""
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(90, 160, 3)))
    x, y = (int(v) for v in rng.integers(4, size - 12, 2))
    ImageDraw.Draw(image).text((x, y), str(int(rng.integers(0, 10))), fill=(20, 20, 20))
    return image


def run(config) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from axpo_jax.data.processor import load_processor
    from axpo_jax.models import qwen3_vl
    from axpo_jax.parallel.mesh import make_mesh
    from axpo_jax.parallel.sharding import shard_model_inputs
    from axpo_jax.tools import schemas

    folder = os.path.join(config.workdir, "tiny_checkpoint")
    started = time.perf_counter()
    _log(f"building a tiny Qwen3-VL checkpoint in {folder}")
    build_tiny_checkpoint(folder, seed=config.seed)

    mesh = make_mesh({"fsdp": -1})
    _log(f"loading it like a real checkpoint onto a mesh of {mesh.devices.size} device(s)")
    processor = load_processor(folder)
    processor.tokenizer.padding_side = "left"
    model = qwen3_vl.from_pretrained(folder, mesh=mesh)
    num_params = sum(int(np.prod(p.shape)) for _, p in qwen3_vl.named_parameters(model))

    conversations = [
        [{"role": "user", "content": [{"type": "image", "image": synthetic_image(config.seed * 100 + i)},
                                      {"type": "text", "text": "Which digit is written in the image?"}]}]
        for i in range(config.batch_size)
    ]
    batch = processor.apply_chat_template(
        conversations, tools=[schemas.IMAGE_ZOOM_IN], add_generation_prompt=True, tokenize=True,
        return_dict=True, return_tensors="np", processor_kwargs={"padding": True},
    )
    inputs = qwen3_vl.prepare_inputs(model.config, **batch)
    targets = jnp.asarray(np.roll(inputs.input_ids_bt, -1, axis=1))

    @nnx.jit
    def forward(model, inputs, targets):
        logits = model.forward(inputs)
        return jnp.argmax(logits[:, -1], axis=-1), model.token_logprobs(inputs, targets)

    with jax.set_mesh(mesh):
        sharded = shard_model_inputs(inputs, mesh)
        t0 = time.perf_counter()
        next_token, logprobs = jax.block_until_ready(forward(model, sharded, targets))
        compile_and_run = time.perf_counter() - t0
        t0 = time.perf_counter()
        jax.block_until_ready(forward(model, sharded, targets))
        run_seconds = time.perf_counter() - t0

    real = np.asarray(inputs.attention_mask_bt, bool)[:, :-1]
    mean_logprob = float(np.asarray(logprobs)[:, :-1][real].mean())
    _log(f"prompt 0 ends with: {processor.tokenizer.decode(inputs.input_ids_bt[0][-12:])!r}")
    _log(f"forward + log-probs: {compile_and_run:.2f}s with compile, {run_seconds * 1e3:.1f} ms after")
    return {
        "checkpoint": folder,
        "params": num_params,
        "devices": int(mesh.devices.size),
        "batch": int(inputs.input_ids_bt.shape[0]),
        "tokens": int(np.asarray(inputs.attention_mask_bt).sum()),
        "image_tokens": int((np.asarray(inputs.vision_token_index_bt) >= 0).sum()),
        "mean_prompt_logprob": round(mean_logprob, 4),
        "uniform_logprob": round(-float(np.log(model.config.text.vocab_size)), 4),
        "greedy_next_tokens": processor.tokenizer.convert_ids_to_tokens(np.asarray(next_token).tolist()),
        "forward_ms": round(run_seconds * 1e3, 2),
        "seconds": round(time.perf_counter() - started, 2),
    }
