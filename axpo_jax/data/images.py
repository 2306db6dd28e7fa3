"""Decoding images to the RGB the processor feeds the model, as a viewer shows them.

A bare `Image.convert("RGB")` gets three kinds of file wrong: a phone photo keeps its sensor orientation (boxes
drawn on the displayed image then point at the wrong pixels), a 16-bit grayscale PNG is clipped to nearly all
white, and transparent pixels come out black. `to_rgb` fixes all three the way transformers' own loading does
(`image_utils.load_image` applies `ImageOps.exif_transpose`, `image_transforms.convert_to_rgb` composites
transparency onto white), so RL tasks, SFT conversations and benchmark images all look like what their authors
saw.
"""

from __future__ import annotations

import numpy as np
from PIL import ExifTags, Image, ImageOps

# single-channel modes with more than 8 bits a sample, which `convert("RGB")` clips instead of scaling
HIGH_DEPTH_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I", "F"})


def to_rgb(image: Image.Image) -> Image.Image:
    """`image` as RGB, upright by its EXIF orientation, high-depth grayscale scaled to 8 bits, transparency over
    white. Always a new image, never `image` itself, so the caller may modify the result."""
    if image.getexif().get(ExifTags.Base.Orientation, 1) != 1:  # checked first: exif_transpose copies even when upright
        image = ImageOps.exif_transpose(image)
    if image.mode in HIGH_DEPTH_MODES:
        # by the actual range, not the bit depth: "I" and "F" carry none (a 16-bit PNG may open as "I", floats may
        # span 0..1), and 12-bit sensor data stored in 16 bits would otherwise come out nearly black
        low, high = image.getextrema()
        samples = np.asarray(image, dtype=np.float32)
        scale = 255 / (high - low) if high > low else 0.0  # a uniform image has no range: it comes out black
        return Image.fromarray(np.rint((samples - low) * scale).astype(np.uint8), "L").convert("RGB")
    # the same test as transformers' convert_to_rgb: an alpha band ("RGBA", "LA", "PA") or a transparent colour
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


def load_image(path: str) -> Image.Image:
    """The image file at `path`, decoded fully and as `to_rgb` gives it."""
    with Image.open(path) as image:
        image.load()  # decode fully now: a truncated or corrupt file fails here, not later in the processor
        return to_rgb(image)
