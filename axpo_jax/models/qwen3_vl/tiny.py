"""Tiny Qwen3-VL configs for tests, benchmarks and the demo: real architecture, toy sizes.

They are config.json-shaped dicts, so the same dict builds transformers' PyTorch model (the test oracle) and
this port, and a folder written from it goes through exactly the loading path of a real checkpoint.
"""

from __future__ import annotations

import copy


def tiny_config_dict(
    *,
    vocab_size: int = 320,
    hidden_size: int = 64,
    intermediate_size: int = 96,
    num_hidden_layers: int = 3,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    head_dim: int = 16,
    mrope_section: tuple[int, int, int] = (4, 2, 2),
    rope_theta: float = 5_000_000.0,
    attention_bias: bool = False,
    vision_depth: int = 3,
    vision_hidden_size: int = 32,
    vision_intermediate_size: int = 48,
    vision_num_heads: int = 2,
    patch_size: int = 4,
    num_position_embeddings: int = 16,
    deepstack_visual_indexes: tuple[int, ...] = (0, 2),
    tie_word_embeddings: bool = False,
    special_token_ids: dict | None = None,
) -> dict:
    """A config.json dict; image/video/vision-boundary ids default to the top of the vocabulary."""
    ids = {
        "image_token_id": vocab_size - 4,
        "video_token_id": vocab_size - 3,
        "vision_start_token_id": vocab_size - 2,
        "vision_end_token_id": vocab_size - 1,
    }
    ids.update({k: v for k, v in (special_token_ids or {}).items() if k in ids})
    return copy.deepcopy(
        {
            "model_type": "qwen3_vl",
            "architectures": ["Qwen3VLForConditionalGeneration"],
            "tie_word_embeddings": tie_word_embeddings,
            **ids,
            "text_config": {
                "model_type": "qwen3_vl_text",
                "vocab_size": vocab_size,
                "hidden_size": hidden_size,
                "intermediate_size": intermediate_size,
                "num_hidden_layers": num_hidden_layers,
                "num_attention_heads": num_attention_heads,
                "num_key_value_heads": num_key_value_heads,
                "head_dim": head_dim,
                "hidden_act": "silu",
                "rms_norm_eps": 1e-6,
                "attention_bias": attention_bias,
                "max_position_embeddings": 4096,
                "rope_parameters": {
                    "rope_type": "default",
                    "rope_theta": rope_theta,
                    "mrope_section": list(mrope_section),
                    "mrope_interleaved": True,
                },
                "tie_word_embeddings": tie_word_embeddings,
            },
            "vision_config": {
                "model_type": "qwen3_vl_vision",
                "depth": vision_depth,
                "hidden_size": vision_hidden_size,
                "intermediate_size": vision_intermediate_size,
                "num_heads": vision_num_heads,
                "out_hidden_size": hidden_size,
                "hidden_act": "gelu_pytorch_tanh",
                "in_channels": 3,
                "patch_size": patch_size,
                "temporal_patch_size": 2,
                "spatial_merge_size": 2,
                "num_position_embeddings": num_position_embeddings,
                "deepstack_visual_indexes": list(deepstack_visual_indexes),
            },
        }
    )


def write_random_checkpoint(folder, config_dict: dict, *, seed: int = 0, via: str = "flax", torch_device: str = "cpu"):
    """Random weights saved as a transformers checkpoint folder, initialized by this port (`via="flax"`, returns the
    model) or by transformers' PyTorch model on `torch_device` (`via="transformers"`, returns None): the one
    compiled Flax initializer takes minutes to compile for a 2B-shaped model, transformers' eager init seconds."""
    if via == "transformers":
        import torch
        import transformers

        torch.manual_seed(seed)
        with torch.device(torch_device):
            model = transformers.Qwen3VLForConditionalGeneration(transformers.Qwen3VLConfig(**config_dict))
        model.save_pretrained(folder)
        return None
    if via != "flax":
        raise ValueError(f"via must be 'flax' or 'transformers', got {via!r}")
    from axpo_jax.models.qwen3_vl.checkpoint import save_pretrained
    from axpo_jax.models.qwen3_vl.config import Qwen3VLConfig

    model = random_model(Qwen3VLConfig.from_dict(config_dict), seed=seed)
    save_pretrained(model, folder)
    return model


def random_model(config, *, seed: int = 0):
    """A Qwen3VL (`config`: a Qwen3VLConfig) with random weights, made by one compiled initializer instead of one
    eager program per parameter shape (seconds instead of ~15 s)."""
    from flax import nnx

    from axpo_jax.models.qwen3_vl.model import Qwen3VL

    return nnx.jit(lambda: Qwen3VL(config, rngs=nnx.Rngs(seed)))()
