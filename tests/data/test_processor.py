"""`load_processor` refuses a folder it cannot make a working processor of, in one line naming what is missing:
transformers would build an empty one-token tokenizer (which a run then trains and exports), load a processor
that renders no conversation, or fail with a multi-line OSError."""

import shutil

import pytest

from axpo_jax.data.processor import load_processor
from axpo_jax.data.tiny_processor import build_tiny_processor
from axpo_jax.models.qwen3_vl.config import CheckpointError
from axpo_jax.modes import is_input_error


@pytest.fixture(scope="module")
def complete_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("processor") / "complete"
    build_tiny_processor(folder, patch_size=8, min_pixels=32 * 32, max_pixels=96 * 96)
    return folder


@pytest.mark.parametrize("missing, says", [
    ("tokenizer.json", "has no tokenizer files"),
    ("chat_template.jinja", "has no chat template"),
    ("preprocessor_config.json", "has no image processor settings"),
])
def test_a_folder_missing_a_processor_file_is_a_one_line_input_error(complete_folder, tmp_path, missing, says):
    folder = tmp_path / f"no_{missing}"
    shutil.copytree(complete_folder, folder)
    (folder / missing).unlink()
    with pytest.raises(CheckpointError, match=f"^{folder} {says}") as error:
        load_processor(folder)
    assert is_input_error(error.value) and "\n" not in str(error.value)  # launch.py prints it as one line


def test_a_missing_folder_is_an_input_error_and_a_complete_one_loads(complete_folder, tmp_path):
    with pytest.raises(CheckpointError, match="is not a folder") as error:
        load_processor(tmp_path / "nope")
    assert is_input_error(error.value)
    processor = load_processor(complete_folder)
    assert len(processor.tokenizer) == 512 and "<|im_start|>" in processor.chat_template


def test_a_saved_processor_loads_as_qwen3_vl_where_torchvision_is_installed(complete_folder, tmp_path, monkeypatch):
    """What an export writes (`processor.save_pretrained`) names the class transformers knows and keeps the video
    settings, so AutoProcessor (the torchvision branch) builds Qwen3VLProcessor from it, not a bare tokenizer."""
    import json

    from transformers.video_processing_utils import BaseVideoProcessor

    from axpo_jax.data import processor as processor_module

    exported = tmp_path / "exported"
    load_processor(complete_folder).save_pretrained(exported)
    saved = json.loads((exported / "processor_config.json").read_text())
    assert saved["processor_class"] == "Qwen3VLProcessor"
    source_video, _ = BaseVideoProcessor.get_video_processor_dict(str(complete_folder))
    assert BaseVideoProcessor.get_video_processor_dict(str(exported))[0] == source_video
    assert load_processor(exported).image_processor.patch_size == 8  # and it still loads here
    # a class AutoProcessor cannot resolve falls back to a tokenizer: refused in one line, not an AttributeError later
    saved["processor_class"] = "SomethingElse"
    (exported / "processor_config.json").write_text(json.dumps(saved))
    monkeypatch.setattr(processor_module, "is_torchvision_available", lambda: True)
    with pytest.raises(CheckpointError, match="not a Qwen3-VL processor"):
        load_processor(exported)


def test_max_image_pixels_bounds_each_image_and_stays_in_an_exported_folder(complete_folder, tmp_path):
    """A 400 x 300 image is resized within the folder's 96 x 96 pixels (to 96 x 80 in multiples of 16: 12 x 10
    patches of 8 px, 30 image tokens) or within the limit given (48 x 48: to 48 x 32, 6 x 4 patches, 6 tokens,
    by hand from smart_resize's rule: each side / sqrt(area / limit), floored to 16); a folder saved from the limited
    processor loads with the limit; a limit below the processor's smallest area is a ValueError naming the field."""
    import numpy as np
    from PIL import Image

    image = Image.fromarray(np.zeros((400, 300, 3), np.uint8))

    def grid(processor):
        return processor.image_processor(images=[image])["image_grid_thw"].tolist()

    assert grid(load_processor(complete_folder)) == [[1, 12, 10]]
    limited = load_processor(complete_folder, max_image_pixels=48 * 48)
    assert grid(limited) == [[1, 6, 4]]
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}]
    inputs = limited(text=[limited.apply_chat_template(conversation, tokenize=False)], images=[image])
    assert (np.asarray(inputs["input_ids"]) == limited.image_token_id).sum() == 6
    limited.save_pretrained(tmp_path / "exported")
    assert grid(load_processor(tmp_path / "exported")) == [[1, 6, 4]]
    with pytest.raises(ValueError, match=r"max_image_pixels must be an int >= the processor's smallest image area "
                                         r"\(1024 pixels\), got 100"):
        load_processor(complete_folder, max_image_pixels=100)
