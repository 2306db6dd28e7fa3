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
