"""How far each attention's per-token log-probs are from the same weights run in float32 (a GPU check of the
fused attention, `configs/*.py: attention`): a random `preset` model in bf16 (float32 on a CPU), the einsum
attention and the fused one (cuDNN on a GPU, in the decoder and the vision tower; splash on a TPU, in the decoder;
XLA's elsewhere) against transformers in float32 and in bf16 (torch on the host's CPU where there is no CUDA).
Prints one JSON line.

    python scripts/attention_agreement.py [preset] [batch] [seq_len] [image_size]   # e.g. 2b 2 4096 on a GPU;
                                                                                      # 2b 1 8192 1024: 4,096 patches
"""

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

from axpo_jax.bench.forward import build_models, hf_config_dict, make_batch, torch_device_for
from axpo_jax.models import qwen3_vl


def main(preset: str = "micro", batch: int = 2, seq_len: int = 256, image_size: int = 0) -> dict:
    device = torch_device_for("auto")
    hf = hf_config_dict(preset)
    image_size = image_size or (448 if preset == "2b" else 128)
    inputs_np, _ = make_batch(hf, batch=batch, seq_len=seq_len, num_images=1, image_size=image_size, seed=0)
    # XLA:CPU has no bf16 x bf16 -> f32 dot
    dtype = "bfloat16" if jax.default_backend() in ("gpu", "tpu") else "float32"
    hf_model, flax_model, _ = build_models(preset, 0, torch_device=device, dtype=dtype)
    targets = np.concatenate([inputs_np["input_ids"][:, 1:], np.zeros((batch, 1), np.int64)], axis=1)
    scored = np.ones(targets.shape, bool)
    scored[:, -1] = False  # the last position has no target

    def torch_logprobs(model):
        with torch.no_grad():
            logits = model(**{k: torch.from_numpy(v).to(device) for k, v in inputs_np.items()}).logits.float()
            logp = torch.log_softmax(logits, -1).gather(-1, torch.from_numpy(targets).to(device)[..., None])[..., 0]
        return logp.cpu().numpy()

    results = {f"torch_{dtype}": torch_logprobs(hf_model)}
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # a float32 reference
    results["torch_fp32"] = torch_logprobs(hf_model.float())
    del hf_model
    prepared = jax.tree.map(jnp.asarray, qwen3_vl.prepare_inputs(flax_model.config, **inputs_np))
    fused = {"gpu": "cudnn", "tpu": "splash"}.get(jax.default_backend(), "xla")
    for name, implementation in (("jax_einsum", None), (f"jax_{fused}", fused)):
        flax_model.use_fused_attention_(implementation)
        logprobs = nnx.jit(lambda m, x, t: m.token_logprobs(x, t))(flax_model, prepared,
                                                                  jnp.asarray(targets, jnp.int32))
        results[name] = np.asarray(logprobs)
    reference = results["torch_fp32"]
    record = dict(preset=preset, dtype=dtype, batch=batch, seq_len=seq_len, image_size=image_size,
                  device=jax.devices()[0].device_kind)
    for name, logprobs in results.items():
        if name != "torch_fp32":
            diff = np.abs(logprobs - reference)[scored]
            record[f"{name}_vs_fp32"] = dict(max=round(float(diff.max()), 4), mean=round(float(diff.mean()), 6))
    diff = np.abs(results["jax_einsum"] - results[f"jax_{fused}"])[scored]
    record[f"jax_einsum_vs_jax_{fused}"] = dict(max=round(float(diff.max()), 4), mean=round(float(diff.mean()), 6))
    print(json.dumps(record))
    return record


if __name__ == "__main__":
    args = sys.argv[1:]
    main(*(args[:1] + [int(a) for a in args[1:4]]))
