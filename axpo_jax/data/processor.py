"""Loading a Qwen3-VL processor (tokenizer + chat template + image processor) from a checkpoint folder."""

import os

from transformers import AutoProcessor, Qwen3VLProcessor
from transformers.utils import is_torchvision_available


class Qwen3VLImageTextProcessor(Qwen3VLProcessor):
    """Qwen3VLProcessor without its video processor.

    transformers 5 implements Qwen3-VL video processing only on torchvision, and ProcessorMixin loads every
    sub-processor named in `__init__`, so `AutoProcessor` cannot load any Qwen3-VL folder without torchvision.
    Leaving `video_processor` out of the signature makes `from_pretrained` load just the image processor (PIL
    backend) and the tokenizer from the same folder; images and text are processed exactly as by Qwen3VLProcessor.
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


def load_processor(path: str | os.PathLike) -> Qwen3VLProcessor:
    """Loads a Qwen3-VL processor folder (real checkpoint or tiny build): the full AutoProcessor when torchvision
    is installed, otherwise the image+text processor, which needs only numpy and Pillow."""
    if is_torchvision_available():
        return AutoProcessor.from_pretrained(path)
    return Qwen3VLImageTextProcessor.from_pretrained(path)
