"""Loading a Qwen3-VL processor (tokenizer + chat template + image processor) from a checkpoint folder."""

import os

from transformers import AutoProcessor, Qwen3VLProcessor
from transformers.utils import is_torchvision_available

from axpo_jax.models.qwen3_vl.config import CheckpointError

# A Qwen2 tokenizer is read from tokenizer.json, or from vocab.json + merges.txt; transformers builds an empty
# one-token tokenizer, without a word, when the folder has neither.
TOKENIZER_FILE_SETS = (("tokenizer.json",), ("vocab.json", "merges.txt"))
# The image processor's settings: preprocessor_config.json, or nested in processor_config.json.
IMAGE_PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")


class Qwen3VLImageTextProcessor(Qwen3VLProcessor):
    """Qwen3VLProcessor without its video processor.

    transformers 5 implements Qwen3-VL video processing only on torchvision, and ProcessorMixin loads every
    sub-processor named in `__init__`, so `AutoProcessor` cannot load any Qwen3-VL folder without torchvision.
    Leaving `video_processor` out of the signature makes `from_pretrained` load just the image processor (PIL
    backend) and the tokenizer from the same folder; images and text are processed exactly as by Qwen3VLProcessor.
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)
        self.video_processor_settings = None  # the source folder's, written back on save (load_processor sets it)

    def to_dict(self):
        # Saved as the processor it stands in for, with the video settings it read past: a folder saved under this
        # class's name loads, where torchvision is installed, as a bare tokenizer (AutoProcessor does not know the
        # name), and without video settings AutoProcessor cannot build Qwen3VLProcessor's video processor.
        output = super().to_dict()
        output["processor_class"] = Qwen3VLProcessor.__name__
        if self.video_processor_settings is not None:
            output["video_processor"] = dict(self.video_processor_settings)
        return output


def _video_processor_settings(path: str) -> dict | None:
    from transformers.video_processing_utils import BaseVideoProcessor

    try:  # reads the JSON only: no torchvision needed
        return BaseVideoProcessor.get_video_processor_dict(path)[0]
    except OSError:
        return None


def load_processor(path: str | os.PathLike, max_image_pixels: int = 0) -> Qwen3VLProcessor:
    """Loads a Qwen3-VL processor folder (real checkpoint or tiny build): the full AutoProcessor when torchvision
    is installed, otherwise the image+text processor, which needs only numpy and Pillow.

    `max_image_pixels` > 0 lowers the area each image (a prompt's, a crop's) is resized within, from the folder's
    own limit (Qwen3-VL's: 16,777,216 pixels, 16,384 image tokens, more than a training row's KV cache holds) to
    this one; a folder exported from the run saves it, so evaluation sees images as training did.

    A folder without tokenizer files, image processor settings or a chat template is a one-line CheckpointError
    naming what is missing: transformers would otherwise build an empty tokenizer (and a run would train and
    export it), fail with a multi-line OSError, or load a processor that cannot render any conversation.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"{path} is not a folder; expected a Qwen3-VL checkpoint folder")
    if not any(all(os.path.isfile(os.path.join(path, name)) for name in names) for names in TOKENIZER_FILE_SETS):
        raise CheckpointError(f"{path} has no tokenizer files (tokenizer.json, or vocab.json and merges.txt)")
    if not any(os.path.isfile(os.path.join(path, name)) for name in IMAGE_PROCESSOR_FILES):
        raise CheckpointError(f"{path} has no image processor settings ({' or '.join(IMAGE_PROCESSOR_FILES)})")
    try:
        if is_torchvision_available():
            processor = AutoProcessor.from_pretrained(path)
        else:
            processor = Qwen3VLImageTextProcessor.from_pretrained(path)
            processor.video_processor_settings = _video_processor_settings(path)
    except OSError as error:  # a file it needs is missing or unreadable: transformers' message spans lines
        raise CheckpointError(f"{path}: cannot load the processor: {' '.join(str(error).split())}") from error
    missing = [part for part in ("tokenizer", "image_processor") if getattr(processor, part, None) is None]
    if missing:  # AutoProcessor falls back to a bare tokenizer when it cannot resolve the processor's class
        raise CheckpointError(f"{path}: loaded a {type(processor).__name__}, not a Qwen3-VL processor (no "
                              f"{' or '.join(missing)}): check processor_class in processor_config.json")
    if not processor.chat_template:
        raise CheckpointError(f"{path} has no chat template (chat_template.jinja or chat_template.json): "
                              "conversations cannot be rendered")
    if max_image_pixels:
        limit_image_pixels(processor, max_image_pixels)
    return processor


def limit_image_pixels(processor: Qwen3VLProcessor, max_image_pixels: int) -> None:
    """Sets the image processor's largest resized area (its size["longest_edge"], in pixels); a ValueError when it
    is below the smallest (size["shortest_edge"]), which every image is resized up to."""
    size = processor.image_processor.size
    smallest = int(size["shortest_edge"])
    if isinstance(max_image_pixels, bool) or not isinstance(max_image_pixels, int) or max_image_pixels < smallest:
        raise ValueError(f"max_image_pixels must be an int >= the processor's smallest image area ({smallest} "
                         f"pixels), got {max_image_pixels!r}")
    limits = {"shortest_edge": smallest, "longest_edge": max_image_pixels}
    processor.image_processor.size = limits if isinstance(size, dict) else type(size)(**limits)
