"""Qwen3-VL in Flax NNX, checked against transformers' PyTorch implementation."""

from axpo_jax.models.qwen3_vl.checkpoint import (abstract_model, dtype_named, from_pretrained, named_parameters,
                                                 save_pretrained)
from axpo_jax.models.qwen3_vl.config import CheckpointError, Qwen3VLConfig, preset
from axpo_jax.models.qwen3_vl.inputs import InputError, ModelInputs, prepare_inputs
from axpo_jax.models.qwen3_vl.model import ATTENTION_SETTINGS, Qwen3VL, fused_attention_for

__all__ = [
    "ATTENTION_SETTINGS",
    "CheckpointError",
    "InputError",
    "ModelInputs",
    "Qwen3VL",
    "Qwen3VLConfig",
    "abstract_model",
    "dtype_named",
    "from_pretrained",
    "fused_attention_for",
    "named_parameters",
    "prepare_inputs",
    "preset",
    "save_pretrained",
]
