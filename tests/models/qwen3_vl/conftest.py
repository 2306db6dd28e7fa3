"""Tiny random transformers Qwen3-VL models saved to disk: the reference the Flax port is checked against."""

import numpy as np
import pytest
import torch
from transformers import Qwen3VLConfig as HFConfig
from transformers import Qwen3VLForConditionalGeneration

from axpo_jax.models.qwen3_vl.tiny import tiny_config_dict

# Shapes that exercise different code paths: GQA ratio, tied head, DeepStack levels, bias, rope sections.
VARIANTS = {
    "gqa2_untied_deepstack02": dict(),
    "mha_tied_deepstack1_bias": dict(
        num_key_value_heads=4, tie_word_embeddings=True, deepstack_visual_indexes=(1,), attention_bias=True,
        vision_depth=2, num_position_embeddings=36,
    ),
    "gqa4_deep_mrope": dict(
        num_attention_heads=8, num_key_value_heads=2, head_dim=8, mrope_section=(2, 1, 1), num_hidden_layers=4,
        deepstack_visual_indexes=(0, 1, 2),
    ),
}


def build_hf_checkpoint(folder, seed: int = 0, **overrides):
    """A random transformers model (norm weights perturbed too, so they matter) saved with save_pretrained."""
    torch.manual_seed(seed)
    hf = Qwen3VLForConditionalGeneration(HFConfig(**tiny_config_dict(**overrides))).eval()
    with torch.no_grad():
        for p in hf.parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
    hf.save_pretrained(folder)
    return hf


@pytest.fixture(scope="session", params=sorted(VARIANTS))
def hf_checkpoint(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    hf = build_hf_checkpoint(folder, **VARIANTS[request.param])
    return hf, folder


def image_tokens(config, grid) -> list[int]:
    n = int(np.prod(grid)) // config.vision_config.spatial_merge_size**2
    return [config.vision_start_token_id] + [config.image_token_id] * n + [config.vision_end_token_id]


def make_batch(config, samples: list[list], *, padding: str, seed: int = 0):
    """Processor-shaped arrays for samples given as lists of text-token runs and image grids (t, h, w)."""
    rng = np.random.default_rng(seed)
    seqs, grids = [], []
    for sample in samples:
        ids = []
        for part in sample:
            if isinstance(part, tuple):
                ids += image_tokens(config, part)
                grids.append(part)
            else:
                ids += rng.integers(0, config.text_config.vocab_size - 4, size=part).tolist()
        seqs.append(ids)
    length = max(len(s) for s in seqs)
    input_ids = np.zeros((len(seqs), length), np.int64)
    attention_mask = np.zeros_like(input_ids)
    for b, s in enumerate(seqs):
        where = slice(length - len(s), length) if padding == "left" else slice(0, len(s))
        input_ids[b, where], attention_mask[b, where] = s, 1
    batch = {"input_ids": input_ids, "attention_mask": attention_mask,
             "mm_token_type_ids": (input_ids == config.image_token_id).astype(np.int64)}
    if grids:
        vc = config.vision_config
        patch_dim = vc.in_channels * vc.temporal_patch_size * vc.patch_size**2
        grids = np.asarray(grids, np.int64)
        batch["image_grid_thw"] = grids
        batch["pixel_values"] = rng.standard_normal((int(grids.prod(-1).sum()), patch_dim)).astype(np.float32)
    return batch


def hf_logits(hf, batch):
    with torch.no_grad():
        kwargs = {k: torch.from_numpy(v) for k, v in batch.items()}
        if "image_grid_thw" not in batch:
            # Without images transformers' forward numbers positions 0..T-1 through padding; give it the
            # padding-aware positions its own generate() uses, which is what this port computes.
            positions, _ = hf.model.get_rope_index(kwargs["input_ids"], kwargs["mm_token_type_ids"],
                                                   attention_mask=kwargs["attention_mask"])
            kwargs["position_ids"] = positions
        return hf(**kwargs).logits.float().numpy()
