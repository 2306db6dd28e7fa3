"""image_zoom_in: crop a region of a conversation image and enlarge it, so the policy can read small details."""

from __future__ import annotations

import math
from typing import Any

from PIL import Image

from axpo_jax.data.images import to_rgb
from axpo_jax.tools import schemas
from axpo_jax.tools.base import BAD_ARGUMENTS, Observation, ToolContext, ToolFailure

RELATIVE_SCALE = 1000  # Qwen3-VL grounds boxes in relative coordinates 0..1000 of each image side


class ImageZoomIn:
    """Crops `bbox_2d` ([x1, y1, x2, y2], 0-1000 relative coordinates) of image `img_idx` and returns the crop.

    Any image of the conversation can be cropped, earlier crops and figures included; the crop becomes image
    `len(context.images)` once the caller appends it. A crop narrower or shorter than `min_crop_pixels` source
    pixels is grown to that size around its centre (shifted to stay inside the image), because a few-pixel
    crop is mostly an imprecise box and would be a single vision patch. The crop is then resized, keeping its
    aspect ratio, so its short side is at least `upscale_to` pixels and its area at most `max_output_pixels`
    (which also shrinks very large crops, bounding the observation's vision tokens).
    """

    name = "image_zoom_in"
    schema = schemas.IMAGE_ZOOM_IN

    def __init__(self, min_crop_pixels: int = 32, max_output_pixels: int = 1024 * 1024, upscale_to: int = 512):
        if min_crop_pixels < 1 or upscale_to < 1 or max_output_pixels < 1:
            raise ValueError("min_crop_pixels, upscale_to and max_output_pixels must be positive")
        self.min_crop_pixels = min_crop_pixels
        self.max_output_pixels = max_output_pixels
        self.upscale_to = upscale_to

    def __call__(self, arguments: dict[str, Any], context: ToolContext) -> Observation:
        image_index = _image_index(arguments.get("img_idx", 0), len(context.images))
        label = arguments.get("label")
        if not isinstance(label, str):
            raise ToolFailure(BAD_ARGUMENTS, "label must be a string")
        source = context.images[image_index]
        box = _pixel_box(arguments.get("bbox_2d"), source.size)
        box = self._grown_to_minimum(box, source.size)
        # RGB before resizing: a 16-bit, float, CMYK or LAB source would otherwise give a crop the processor
        # misreads (and PIL cannot resize some of these modes at all)
        crop = to_rgb(source.crop(box))
        crop = crop.resize(self._output_size(crop.size), Image.Resampling.BICUBIC)
        width, height = source.size
        region = [round(box[0] * RELATIVE_SCALE / width), round(box[1] * RELATIVE_SCALE / height),
                  round(box[2] * RELATIVE_SCALE / width), round(box[3] * RELATIVE_SCALE / height)]
        text = (f"Zoomed in on {label} (image {len(context.images)}): region {region} of image {image_index}, "
                f"shown at {crop.width}x{crop.height} pixels.")
        return Observation(text=text, images=[crop])

    def _grown_to_minimum(self, box: tuple[int, int, int, int], size: tuple[int, int]) -> tuple[int, int, int, int]:
        left, right = _grown_span(box[0], box[2], self.min_crop_pixels, size[0])
        top, bottom = _grown_span(box[1], box[3], self.min_crop_pixels, size[1])
        return left, top, right, bottom

    def _output_size(self, size: tuple[int, int]) -> tuple[int, int]:
        width, height = size
        scale = max(1.0, self.upscale_to / min(width, height))
        scale = min(scale, math.sqrt(self.max_output_pixels / (width * height)))
        cap = self.max_output_pixels
        out_w, out_h = max(1, round(width * scale)), max(1, round(height * scale))
        if out_w * out_h > cap:  # both sides rounded up: rounding down keeps the product under the cap
            out_w, out_h = max(1, math.floor(width * scale)), max(1, math.floor(height * scale))
        if out_w * out_h > cap:  # a side held at 1 pixel: the other takes what the cap leaves
            if out_w <= out_h:
                out_h = max(1, cap // out_w)
            else:
                out_w = max(1, cap // out_h)
        return out_w, out_h

    def close_session(self, session_id: str) -> None:
        """Stateless: nothing to free."""


def _image_index(value: Any, image_count: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ToolFailure(BAD_ARGUMENTS, f"img_idx must be an integer, got {value!r}")
    if not 0 <= value < image_count:
        raise ToolFailure(BAD_ARGUMENTS, f"img_idx {value} is out of range: the conversation has {image_count} "
                                         f"image(s), numbered 0 to {image_count - 1}")
    return value


def _pixel_box(bbox: Any, size: tuple[int, int]) -> tuple[int, int, int, int]:
    """The smallest pixel box covering bbox_2d (validated, clipped to 0..1000), as PIL's (left, top, right,
    bottom)."""
    if (not isinstance(bbox, list) or len(bbox) != 4
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and _finite(v) for v in bbox)):
        raise ToolFailure(BAD_ARGUMENTS, f"bbox_2d must be a list of 4 numbers [x1, y1, x2, y2], got {bbox!r}")
    x1, y1, x2, y2 = bbox
    if not (x1 < x2 and y1 < y2):
        raise ToolFailure(BAD_ARGUMENTS, f"bbox_2d {bbox} must have x1 < x2 and y1 < y2")
    x1, y1, x2, y2 = (min(max(v, 0), RELATIVE_SCALE) for v in bbox)
    if not (x1 < x2 and y1 < y2):
        raise ToolFailure(BAD_ARGUMENTS, f"bbox_2d {bbox} lies outside the image: coordinates are relative, "
                                         f"0 to {RELATIVE_SCALE}")
    width, height = size
    return (math.floor(x1 * width / RELATIVE_SCALE), math.floor(y1 * height / RELATIVE_SCALE),
            math.ceil(x2 * width / RELATIVE_SCALE), math.ceil(y2 * height / RELATIVE_SCALE))


def _finite(value: int | float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float
        return False


def _grown_span(low: int, high: int, minimum: int, limit: int) -> tuple[int, int]:
    """[low, high) grown around its centre to `minimum` pixels (or the whole side, if shorter), inside
    [0, limit)."""
    length = min(minimum, limit)
    if high - low >= length:
        return low, high
    start = round((low + high - length) / 2)
    start = min(max(start, 0), limit - length)
    return start, start + length
