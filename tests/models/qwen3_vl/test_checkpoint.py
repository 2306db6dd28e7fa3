"""Checkpoint folders: HF -> Flax -> HF round trip, sharded indexes, and clear errors for bad folders and inputs."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file, save_file
from transformers import GenerationConfig, Qwen3VLForConditionalGeneration

from axpo_jax.models import qwen3_vl
from axpo_jax.models.qwen3_vl import CheckpointError, InputError, checkpoint
from axpo_jax.models.qwen3_vl.tiny import tiny_config_dict

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


def _weight_files(folder) -> list[str]:
    return sorted(f for f in os.listdir(folder) if f.startswith("model"))


@pytest.mark.parametrize("first_shard_bytes, second_shard_bytes", [(64 * 1024, 4 << 30), (4 << 30, 64 * 1024)],
                         ids=["sharded_then_single", "single_then_sharded"])
def test_second_save_into_a_folder_replaces_the_first(reference, tmp_path, first_shard_bytes, second_shard_bytes):
    _, folder = reference
    first, second = qwen3_vl.from_pretrained(folder), qwen3_vl.from_pretrained(folder)
    nnx.update(second, jax.tree.map(lambda x: x + 0.5, nnx.state(second, nnx.Param)))
    out = tmp_path / "out"
    qwen3_vl.save_pretrained(first, out, max_shard_bytes=first_shard_bytes)
    qwen3_vl.save_pretrained(second, out, max_shard_bytes=second_shard_bytes)
    # another reader (transformers prefers model.safetensors to the index) finds only the second save's files
    alone = tmp_path / "alone"
    qwen3_vl.save_pretrained(second, alone, max_shard_bytes=second_shard_bytes)
    assert _weight_files(out) == _weight_files(alone)
    for (name, want), (_, got) in zip(qwen3_vl.named_parameters(second),
                                      qwen3_vl.named_parameters(qwen3_vl.from_pretrained(out))):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=name)


def test_folder_with_both_a_single_file_and_an_index_is_refused(reference, tmp_path):
    _, folder = reference
    both = _copy(folder, tmp_path, "both")
    sharded = tmp_path / "sharded"
    qwen3_vl.save_pretrained(qwen3_vl.from_pretrained(folder), sharded, max_shard_bytes=64 * 1024)
    for name in os.listdir(sharded):
        if name.startswith("model-") or name.endswith(".index.json"):
            shutil.copy(sharded / name, both / name)
    with pytest.raises(CheckpointError, match="both model.safetensors and model.safetensors.index.json"):
        qwen3_vl.from_pretrained(both)


def _tie_config(target):
    config = json.loads((target / "config.json").read_text())
    config["tie_word_embeddings"] = config["text_config"]["tie_word_embeddings"] = True
    (target / "config.json").write_text(json.dumps(config))


def test_tied_config_with_a_different_lm_head_is_refused(reference, tmp_path):
    _, folder = reference  # an untied model: its lm_head differs from its embeddings
    untied = _copy(folder, tmp_path, "untied")
    _tie_config(untied)
    with pytest.raises(CheckpointError, match="lm_head.weight differs from model.language_model.embed_tokens.weight"
                                              ".*set tie_word_embeddings to false"):
        qwen3_vl.from_pretrained(untied)

    tied = _copy(folder, tmp_path, "tied")
    _tie_config(tied)
    tensors = load_file(str(tied / "model.safetensors"))
    tensors["lm_head.weight"] = tensors["model.language_model.embed_tokens.weight"].copy()
    save_file(tensors, str(tied / "model.safetensors"), metadata={"format": "pt"})
    model = qwen3_vl.from_pretrained(tied)  # a tied copy written out by the exporter loads as before
    assert model.lm_head is None

    # compared block by block: a head that differs only in its last row, past the first blocks, is still caught
    tensors["lm_head.weight"][-1] += 1
    save_file(tensors, str(tied / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="differs"):
        checkpoint._check_tied_head(checkpoint.SafetensorsFolder(tied), str(tied), rows_per_read=100)


@pytest.mark.parametrize("transformers_4", [False, True], ids=["rope_parameters", "rope_scaling"])
def test_config_without_rope_theta_is_refused(transformers_4):
    config = tiny_config_dict(rope_theta=1000.0)
    text = config["text_config"]
    if transformers_4:  # the layout Qwen published with: rope_theta beside rope_scaling
        text["rope_scaling"] = text.pop("rope_parameters")
        text["rope_theta"] = text["rope_scaling"].pop("rope_theta")
        assert qwen3_vl.Qwen3VLConfig.from_dict(config).text.rope_theta == 1000.0
        del text["rope_theta"]
    else:
        del text["rope_parameters"]["rope_theta"]
    with pytest.raises(CheckpointError, match=r"text_config.rope_theta \(or rope_parameters.rope_theta\) is missing"):
        qwen3_vl.Qwen3VLConfig.from_dict(config)


def test_export_keeps_the_generation_config(reference, tmp_path):
    _, folder = reference
    source = _copy(folder, tmp_path, "instruct")
    generation = {"bos_token_id": 151643, "do_sample": True, "eos_token_id": [151645, 151643], "temperature": 0.7,
                  "top_k": 20, "top_p": 0.8}  # as Qwen3-VL-*-Instruct publish it
    (source / "generation_config.json").write_text(json.dumps(generation))
    qwen3_vl.save_pretrained(qwen3_vl.from_pretrained(source), tmp_path / "out")
    assert json.loads((tmp_path / "out" / "generation_config.json").read_text()) == generation
    assert GenerationConfig.from_pretrained(tmp_path / "out").eos_token_id == [151645, 151643]

    os.remove(source / "generation_config.json")
    qwen3_vl.save_pretrained(qwen3_vl.from_pretrained(source), tmp_path / "plain")
    assert not os.path.exists(tmp_path / "plain" / "generation_config.json")
    qwen3_vl.save_pretrained(qwen3_vl.from_pretrained(source), tmp_path / "out")  # a second save into "out"
    assert not os.path.exists(tmp_path / "out" / "generation_config.json")  # not the first save's


def test_token_ids_outside_the_vocabulary(reference):
    hf, _ = reference
    config = qwen3_vl.Qwen3VLConfig.from_dict(hf.config.to_dict())
    vocab = config.text.vocab_size
    batch = make_batch(hf.config, [[3, (1, 4, 6), 2], [4]], padding="right")  # row 1 right-padded with id 0
    qwen3_vl.prepare_inputs(config, **batch)
    for bad in (vocab, -1):
        ids = batch["input_ids"].copy()
        ids[0, 1] = bad
        with pytest.raises(InputError, match=rf"token id {bad} \(sample 0, position 1\) is outside the vocabulary "
                                             rf"\[0, {vocab}\)"):
            qwen3_vl.prepare_inputs(config, **dict(batch, input_ids=ids))
    # padding may hold an id the table takes (the sampler pads with -1) but not one past it (NaN embeddings)
    ids = batch["input_ids"].copy()
    ids[1, -1] = -1
    qwen3_vl.prepare_inputs(config, **dict(batch, input_ids=ids))
    ids[1, -1] = vocab
    with pytest.raises(InputError, match=rf"padding id {vocab} \(sample 1, position {ids.shape[1] - 1}\)"):
        qwen3_vl.prepare_inputs(config, **dict(batch, input_ids=ids))


def test_multi_frame_image_grids_are_refused(reference):
    hf, _ = reference
    config = qwen3_vl.Qwen3VLConfig.from_dict(hf.config.to_dict())
    batch = make_batch(hf.config, [[3, (2, 4, 4), 2]], padding="right")  # tokens and pixels consistent with t=2
    with pytest.raises(InputError, match=r"image_grid_thw \[\[2, 4, 4\]\] has t != 1: video / multi-frame grids "
                                         r"are not supported"):
        qwen3_vl.prepare_inputs(config, **batch)
