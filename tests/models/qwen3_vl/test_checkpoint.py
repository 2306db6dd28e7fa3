"""Checkpoint folders: HF -> Flax -> HF round trip, sharded indexes, and clear errors for bad folders."""

import json
import os
import shutil

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from transformers import Qwen3VLForConditionalGeneration

from axpo_jax.models import qwen3_vl
from axpo_jax.models.qwen3_vl import CheckpointError, InputError

from .conftest import build_hf_checkpoint, hf_logits, make_batch


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    folder = tmp_path_factory.mktemp("reference")
    hf = build_hf_checkpoint(folder, seed=1)
    return hf, folder


def _all_tensors(folder) -> dict[str, np.ndarray]:
    tensors = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            tensors.update(load_file(os.path.join(folder, name)))
    return tensors


def test_round_trip_is_bit_exact_and_transformers_loads_it(reference, tmp_path):
    hf, folder = reference
    model = qwen3_vl.from_pretrained(folder)
    qwen3_vl.save_pretrained(model, tmp_path / "out")

    original, saved = _all_tensors(folder), _all_tensors(tmp_path / "out")
    assert sorted(original) == sorted(saved)
    for name in original:
        assert original[name].dtype == saved[name].dtype, name
        np.testing.assert_array_equal(original[name], saved[name], err_msg=name)

    reloaded = Qwen3VLForConditionalGeneration.from_pretrained(tmp_path / "out").eval()
    batch = make_batch(hf.config, [[3, (1, 4, 6), 2]], padding="right")
    np.testing.assert_array_equal(hf_logits(reloaded, batch), hf_logits(hf, batch))


def test_sharded_index_loads_the_same_model(reference, tmp_path):
    hf, folder = reference
    model = qwen3_vl.from_pretrained(folder)
    qwen3_vl.save_pretrained(model, tmp_path / "sharded", max_shard_bytes=64 * 1024)
    files = [f for f in os.listdir(tmp_path / "sharded") if f.endswith(".safetensors")]
    assert len(files) > 2 and os.path.isfile(tmp_path / "sharded" / "model.safetensors.index.json")
    again = qwen3_vl.from_pretrained(tmp_path / "sharded")
    for (name_a, a), (name_b, b) in zip(qwen3_vl.named_parameters(model), qwen3_vl.named_parameters(again)):
        assert name_a == name_b
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # transformers reads the sharded folder too
    Qwen3VLForConditionalGeneration.from_pretrained(tmp_path / "sharded")


def test_bfloat16_checkpoint_loads_into_float32(reference, tmp_path):
    hf, _ = reference
    hf.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    hf.to(torch.float32)
    model = qwen3_vl.from_pretrained(tmp_path / "bf16")
    name, value = next(qwen3_vl.named_parameters(model))
    expected = dict(hf.named_parameters())[name].detach().to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(np.asarray(value), expected)


def _copy(folder, tmp_path, name):
    target = tmp_path / name
    shutil.copytree(folder, target)
    return target


def test_folder_without_qwen3_vl_config(reference, tmp_path):
    _, folder = reference
    with pytest.raises(CheckpointError, match="not a folder"):
        qwen3_vl.from_pretrained(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        qwen3_vl.from_pretrained(tmp_path / "empty")
    other = _copy(folder, tmp_path, "llama")
    config = json.loads((other / "config.json").read_text())
    config["model_type"] = "llama"
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="expected 'qwen3_vl'"):
        qwen3_vl.from_pretrained(other)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: c["text_config"]["rope_parameters"].update(rope_type="yarn"), "rope_type 'yarn' is not supported"),
        (lambda c: c["text_config"].update(hidden_act="gelu"), "hidden_act 'gelu' is not supported"),
        (lambda c: c.update(model_type="qwen3_vl_moe"), "MoE variant"),
        (lambda c: c["vision_config"].update(num_position_embeddings=15), "square number"),
    ],
)
def test_unsupported_config_fields(reference, tmp_path, edit, message):
    _, folder = reference
    target = _copy(folder, tmp_path, "edited")
    config = json.loads((target / "config.json").read_text())
    edit(config)
    (target / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=message):
        qwen3_vl.from_pretrained(target)


def test_missing_and_truncated_shards(reference, tmp_path):
    _, folder = reference
    model = qwen3_vl.from_pretrained(folder)
    sharded = tmp_path / "sharded"
    qwen3_vl.save_pretrained(model, sharded, max_shard_bytes=64 * 1024)
    shards = sorted(f for f in os.listdir(sharded) if f.endswith(".safetensors"))

    missing = _copy(sharded, tmp_path, "missing")
    os.remove(missing / shards[-1])
    with pytest.raises(CheckpointError, match=f"missing safetensors shard .*{shards[-1]}"):
        qwen3_vl.from_pretrained(missing)

    truncated = _copy(sharded, tmp_path, "truncated")
    data = (truncated / shards[0]).read_bytes()
    (truncated / shards[0]).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=f"{shards[0]}"):
        qwen3_vl.from_pretrained(truncated)

    no_weights = _copy(folder, tmp_path, "no_weights")
    os.remove(no_weights / "model.safetensors")
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        qwen3_vl.from_pretrained(no_weights)


def test_checkpoint_of_another_shape(reference, tmp_path):
    _, folder = reference
    target = _copy(folder, tmp_path, "reshaped")
    config = json.loads((target / "config.json").read_text())
    config["text_config"]["intermediate_size"] += 8
    (target / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="has shape"):
        qwen3_vl.from_pretrained(target)


def test_image_tokens_that_do_not_match_the_grids(reference):
    hf, _ = reference
    config = qwen3_vl.Qwen3VLConfig.from_dict(hf.config.to_dict())
    batch = make_batch(hf.config, [[3, (1, 4, 6), 2]], padding="right")
    too_many = dict(batch, image_grid_thw=np.array([[1, 4, 6], [1, 2, 2]]))
    with pytest.raises(InputError, match="image tokens don't match the grids"):
        qwen3_vl.prepare_inputs(config, **too_many)
    wrong_size = dict(batch, image_grid_thw=np.array([[1, 4, 8]]))
    with pytest.raises(InputError, match="image tokens don't match the grids"):
        qwen3_vl.prepare_inputs(config, **wrong_size)
    wrong_pixels = dict(batch, pixel_values=batch["pixel_values"][:-1])
    with pytest.raises(InputError, match="pixel_values shape"):
        qwen3_vl.prepare_inputs(config, **wrong_pixels)


def test_random_checkpoint_initialized_by_transformers_loads(tmp_path):
    """The large-shape path of tiny.write_random_checkpoint: transformers initializes, this port loads the folder."""
    from axpo_jax.models.qwen3_vl.tiny import tiny_config_dict, write_random_checkpoint

    config = tiny_config_dict(num_hidden_layers=2, deepstack_visual_indexes=(0, 1), vision_depth=2)
    assert write_random_checkpoint(tmp_path, config, seed=3, via="transformers") is None
    model = qwen3_vl.from_pretrained(tmp_path)
    saved = load_file(str(tmp_path / "model.safetensors"))
    np.testing.assert_array_equal(np.asarray(model.model.language_model.embed_tokens.weight[...]),
                                  saved["model.language_model.embed_tokens.weight"])
    with pytest.raises(ValueError, match="via must be"):
        write_random_checkpoint(tmp_path / "other", config, via="numpy")
