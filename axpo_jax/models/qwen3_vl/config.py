"""Qwen3-VL configuration, read from a checkpoint's config.json.

The fields mirror transformers' `Qwen3VLConfig` (text + vision sub-configs) so a real checkpoint folder and a
tiny test folder go through the same parser. Anything the port does not implement is rejected here with a
message naming the field, instead of failing later deep inside the forward.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any


class CheckpointError(ValueError):
    """A checkpoint folder or config that this port cannot load; the message names the file or field."""


@dataclasses.dataclass(frozen=True)
class TextConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 5_000_000.0
    mrope_section: tuple[int, int, int] = (24, 20, 20)
    attention_bias: bool = False
    max_position_embeddings: int = 262_144


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    depth: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    out_hidden_size: int
    deepstack_visual_indexes: tuple[int, ...]
    in_channels: int = 3
    patch_size: int = 16
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    num_position_embeddings: int = 2304
    hidden_act: str = "gelu_pytorch_tanh"
    rope_theta: float = 10_000.0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Length of one flattened pixel patch as the HF processor emits it (C * Tp * P * P)."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2


@dataclasses.dataclass(frozen=True)
class Qwen3VLConfig:
    text: TextConfig
    vision: VisionConfig
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    tie_word_embeddings: bool = False
    # The parsed config.json, kept so save_pretrained writes back what transformers expects.
    hf_config: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)
    # The folder's generation_config.json (eos ids, sampling defaults), kept so an export carries it on.
    generation_config: dict | None = dataclasses.field(default=None, compare=False, repr=False)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "Qwen3VLConfig":
        return _parse(raw)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "Qwen3VLConfig":
        config_path = os.path.join(path, "config.json")
        if not os.path.isdir(path):
            raise CheckpointError(f"{path!s} is not a folder; expected a Qwen3-VL checkpoint folder")
        if not os.path.isfile(config_path):
            raise CheckpointError(f"{path!s} has no config.json; it is not a transformers checkpoint folder")
        raw = _read_json(config_path)
        generation_path = os.path.join(path, "generation_config.json")
        generation = _read_json(generation_path) if os.path.isfile(generation_path) else None
        return dataclasses.replace(_parse(raw, source=config_path), generation_config=generation)


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None


_SUPPORTED_TEXT_ACT = ("silu",)
_SUPPORTED_VISION_ACT = ("gelu_pytorch_tanh", "gelu")


def _parse(raw: dict[str, Any], source: str = "config") -> Qwen3VLConfig:
    model_type = raw.get("model_type")
    if model_type == "qwen3_vl_moe":
        raise CheckpointError(f"{source}: model_type 'qwen3_vl_moe' (the MoE variant) is not supported yet")
    if model_type != "qwen3_vl":
        raise CheckpointError(f"{source}: model_type is {model_type!r}, expected 'qwen3_vl' (a Qwen3-VL checkpoint)")
    text, vision = raw.get("text_config"), raw.get("vision_config")
    if not isinstance(text, dict) or not isinstance(vision, dict):
        raise CheckpointError(f"{source}: a Qwen3-VL config needs 'text_config' and 'vision_config' objects")

    def need(sub: dict, key: str, where: str):
        if key not in sub:
            raise CheckpointError(f"{source}: {where}.{key} is missing")
        return sub[key]

    # transformers 5 writes rope_parameters; checkpoints saved by 4.x carry rope_scaling + rope_theta.
    rope = dict(text.get("rope_parameters") or text.get("rope_scaling") or {})
    if "rope_theta" not in rope:
        if "rope_theta" not in text:
            # published checkpoints always carry it; guessing would pick one of two defaults (transformers
            # assumes 500000, Qwen3-VL was trained with 5000000) and silently build another model
            raise CheckpointError(f"{source}: text_config.rope_theta (or rope_parameters.rope_theta) is missing")
        rope["rope_theta"] = text["rope_theta"]
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise CheckpointError(f"{source}: text_config rope_type {rope_type!r} is not supported (only 'default')")
    if rope.get("mrope_interleaved") is False:
        # transformers' Qwen3-VL always applies the interleaved layout; a non-interleaved config would be a
        # different model, so refuse it rather than silently compute something else.
        raise CheckpointError(f"{source}: mrope_interleaved=false is not supported (Qwen3-VL is interleaved)")
    act = text.get("hidden_act", "silu")
    if act not in _SUPPORTED_TEXT_ACT:
        raise CheckpointError(f"{source}: text_config.hidden_act {act!r} is not supported {_SUPPORTED_TEXT_ACT}")
    vact = vision.get("hidden_act", "gelu_pytorch_tanh")
    if vact not in _SUPPORTED_VISION_ACT:
        raise CheckpointError(f"{source}: vision_config.hidden_act {vact!r} is not supported {_SUPPORTED_VISION_ACT}")

    num_heads = need(text, "num_attention_heads", "text_config")
    hidden = need(text, "hidden_size", "text_config")
    head_dim = text.get("head_dim") or hidden // num_heads
    mrope_section = tuple(rope.get("mrope_section", (24, 20, 20)))
    if len(mrope_section) != 3 or sum(mrope_section) != head_dim // 2:
        raise CheckpointError(
            f"{source}: mrope_section {list(mrope_section)} must have 3 entries summing to head_dim/2={head_dim // 2}"
        )
    text_cfg = TextConfig(
        vocab_size=need(text, "vocab_size", "text_config"),
        hidden_size=hidden,
        intermediate_size=need(text, "intermediate_size", "text_config"),
        num_hidden_layers=need(text, "num_hidden_layers", "text_config"),
        num_attention_heads=num_heads,
        num_key_value_heads=text.get("num_key_value_heads") or num_heads,
        head_dim=head_dim,
        rms_norm_eps=float(text.get("rms_norm_eps", 1e-6)),
        rope_theta=float(rope["rope_theta"]),
        mrope_section=mrope_section,
        attention_bias=bool(text.get("attention_bias", False)),
        max_position_embeddings=int(text.get("max_position_embeddings", 262_144)),
    )
    if text_cfg.num_attention_heads % text_cfg.num_key_value_heads:
        raise CheckpointError(f"{source}: num_attention_heads must be a multiple of num_key_value_heads")

    vrope = vision.get("rope_parameters") or {}
    patch_size = vision.get("patch_size", 16)
    temporal_patch_size = vision.get("temporal_patch_size", 2)
    if not isinstance(patch_size, int) or not isinstance(temporal_patch_size, int):
        raise CheckpointError(f"{source}: vision_config patch sizes must be integers (non-square is not supported)")
    vision_cfg = VisionConfig(
        depth=need(vision, "depth", "vision_config"),
        hidden_size=need(vision, "hidden_size", "vision_config"),
        intermediate_size=need(vision, "intermediate_size", "vision_config"),
        num_heads=need(vision, "num_heads", "vision_config"),
        out_hidden_size=need(vision, "out_hidden_size", "vision_config"),
        deepstack_visual_indexes=tuple(vision.get("deepstack_visual_indexes", (8, 16, 24))),
        in_channels=vision.get("in_channels", 3),
        patch_size=patch_size,
        temporal_patch_size=temporal_patch_size,
        spatial_merge_size=vision.get("spatial_merge_size", 2),
        num_position_embeddings=vision.get("num_position_embeddings", 2304),
        hidden_act=vact,
        rope_theta=float(vrope.get("rope_theta", 10_000.0)),
    )
    if vision_cfg.out_hidden_size != text_cfg.hidden_size:
        raise CheckpointError(f"{source}: vision_config.out_hidden_size must equal text_config.hidden_size")
    side = int(round(vision_cfg.num_position_embeddings**0.5))
    if side * side != vision_cfg.num_position_embeddings:
        raise CheckpointError(f"{source}: vision_config.num_position_embeddings must be a square number")
    if any(not 0 <= i < vision_cfg.depth for i in vision_cfg.deepstack_visual_indexes):
        raise CheckpointError(f"{source}: deepstack_visual_indexes must lie in [0, depth)")
    if len(vision_cfg.deepstack_visual_indexes) > text_cfg.num_hidden_layers:
        raise CheckpointError(f"{source}: more DeepStack levels than decoder layers")

    tie = raw.get("tie_word_embeddings", text.get("tie_word_embeddings", False))
    return Qwen3VLConfig(
        text=text_cfg,
        vision=vision_cfg,
        image_token_id=raw.get("image_token_id", 151655),
        video_token_id=raw.get("video_token_id", 151656),
        vision_start_token_id=raw.get("vision_start_token_id", 151652),
        vision_end_token_id=raw.get("vision_end_token_id", 151653),
        tie_word_embeddings=bool(tie),
        hf_config=raw,
    )


def _preset(text: dict, vision: dict, tie: bool) -> dict:
    """A config.json-shaped dict with the published Qwen3-VL defaults filled in."""
    return {
        "model_type": "qwen3_vl",
        "architectures": ["Qwen3VLForConditionalGeneration"],
        "tie_word_embeddings": tie,
        "image_token_id": 151655,
        "video_token_id": 151656,
        "vision_start_token_id": 151652,
        "vision_end_token_id": 151653,
        "text_config": {
            "model_type": "qwen3_vl_text",
            "vocab_size": 151936,
            "head_dim": 128,
            "num_key_value_heads": 8,
            "rms_norm_eps": 1e-6,
            "hidden_act": "silu",
            "max_position_embeddings": 262144,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 5_000_000.0,
                "mrope_section": [24, 20, 20],
                "mrope_interleaved": True,
            },
            "tie_word_embeddings": tie,
            **text,
        },
        "vision_config": {
            "model_type": "qwen3_vl_vision",
            "hidden_act": "gelu_pytorch_tanh",
            "in_channels": 3,
            "patch_size": 16,
            "temporal_patch_size": 2,
            "spatial_merge_size": 2,
            "num_position_embeddings": 2304,
            "num_heads": 16,
            **vision,
        },
    }


# The published shapes of the dense Qwen3-VL family (Qwen/Qwen3-VL-{2,4,8,32}B-{Instruct,Thinking} config.json).
PRESETS: dict[str, dict] = {
    "2b": _preset(
        dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16),
        dict(depth=24, hidden_size=1024, intermediate_size=4096, out_hidden_size=2048,
             deepstack_visual_indexes=[5, 11, 17]),
        tie=True,
    ),
    "4b": _preset(
        dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32),
        dict(depth=24, hidden_size=1024, intermediate_size=4096, out_hidden_size=2560,
             deepstack_visual_indexes=[5, 11, 17]),
        tie=True,
    ),
    "8b": _preset(
        dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32),
        dict(depth=27, hidden_size=1152, intermediate_size=4304, out_hidden_size=4096,
             deepstack_visual_indexes=[8, 16, 24]),
        tie=False,
    ),
    "32b": _preset(
        dict(hidden_size=5120, intermediate_size=25600, num_hidden_layers=64, num_attention_heads=64),
        dict(depth=27, hidden_size=1152, intermediate_size=4304, out_hidden_size=5120,
             deepstack_visual_indexes=[8, 16, 24]),
        tie=False,
    ),
}


def preset(name: str) -> Qwen3VLConfig:
    if name not in PRESETS:
        raise KeyError(f"unknown Qwen3-VL preset {name!r}; known: {sorted(PRESETS)}")
    return Qwen3VLConfig.from_dict(PRESETS[name])
