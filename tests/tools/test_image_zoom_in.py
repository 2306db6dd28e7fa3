"""image_zoom_in crops exactly the requested pixels, grows tiny boxes, upscales within its cap, rejects bad input."""

import numpy as np
import pytest
from PIL import Image

from axpo_jax.tools.base import BAD_ARGUMENTS, ToolContext, ToolFailure
from axpo_jax.tools.image_zoom_in import ImageZoomIn

RED = (255, 0, 0)


def scene() -> Image.Image:
    """A 200x100 image with random noise and a red square at x 100..120, y 50..70."""
    pixels = np.random.default_rng(0).integers(0, 200, size=(100, 200, 3), dtype=np.uint8)
    pixels[50:70, 100:120] = RED
    return Image.fromarray(pixels)


def context(*images: Image.Image) -> ToolContext:
    return ToolContext(images=list(images), session_id="s")


def no_resize(min_crop_pixels: int = 1) -> ImageZoomIn:
    """A zoom that returns the crop at its source size, to compare it pixel by pixel."""
    return ImageZoomIn(min_crop_pixels=min_crop_pixels, upscale_to=1, max_output_pixels=10**9)


def test_crop_is_pixel_exact():
    image = scene()
    observation = no_resize()({"bbox_2d": [500, 500, 600, 700], "label": "the red square"}, context(image))
    [crop] = observation.images
    np.testing.assert_array_equal(np.asarray(crop), np.asarray(image)[50:70, 100:120])
    assert observation.text == ("Zoomed in on the red square (image 1): region [500, 500, 600, 700] of image 0, "
                                "shown at 20x20 pixels.")


def test_fractional_box_covers_every_touched_pixel():
    image = scene()
    [crop] = no_resize()({"bbox_2d": [502.4, 505, 597.6, 695], "label": "x"}, context(image)).images
    np.testing.assert_array_equal(np.asarray(crop), np.asarray(image)[50:70, 100:120])


def test_upscaled_crop_keeps_aspect_and_the_square_stays_red():
    image = scene()
    [crop] = ImageZoomIn(upscale_to=112)({"bbox_2d": [450, 400, 650, 800], "label": "x"}, context(image)).images
    assert crop.size == (112, 112)  # the 40x40 source region (x 90..130, y 40..80), 2.8x
    pixels = np.asarray(crop)
    assert (pixels[36:76, 36:76] == RED).all()  # the square is 10..30 of the region: 28..84 scaled, minus blur


def test_output_is_capped_in_area_keeping_aspect():
    image = Image.new("RGB", (400, 100))
    [crop] = ImageZoomIn(upscale_to=200, max_output_pixels=20_000)(
        {"bbox_2d": [0, 0, 1000, 1000], "label": "all"}, context(image)).images
    # 400x100 * sqrt(20000 / 40000) = 282.8x70.7: the cap wins over upscaling to 800x200, rounded down since
    # 283x71 would be 20,093 pixels
    assert crop.size == (282, 70)


def test_output_never_exceeds_the_cap_by_rounding():
    # 1000x800 scaled by sqrt(2**20 / 800_000) rounds both sides up (1145x916 = 1,048,820 > 2**20)
    image = Image.new("RGB", (1000, 800))
    [crop] = ImageZoomIn()({"bbox_2d": [999.9999, 0, 1000, 1000], "label": "x"}, context(image)).images
    assert crop.width * crop.height <= 1024 * 1024
    # a sliver held at 1 pixel wide must not make the other side exceed the cap either
    zoom = ImageZoomIn(min_crop_pixels=1, upscale_to=1, max_output_pixels=100)
    [sliver] = zoom({"bbox_2d": [0, 0, 1, 1000], "label": "x"}, context(Image.new("RGB", (1000, 1000)))).images
    assert sliver.width * sliver.height <= 100


@pytest.mark.parametrize("mode", ["I;16", "I", "F", "CMYK", "LAB", "LA", "P", "1"])
def test_crop_comes_back_rgb_whatever_the_source_mode(mode):
    ramp = np.linspace(0, 1, 64 * 64, dtype=np.float64).reshape(64, 64)
    if mode in ("I;16", "I", "F"):
        scale = {"I;16": 4095, "I": 70_000, "F": 1.0}[mode]  # ranges the processor would read as nearly black
        dtype = {"I;16": np.uint16, "I": np.int32, "F": np.float32}[mode]
        image = Image.fromarray((ramp * scale).astype(dtype), mode if mode != "I;16" else None)
        assert image.mode == mode
    else:
        image = Image.fromarray((ramp * 255).astype(np.uint8), "L").convert(mode)
    [crop] = no_resize()({"bbox_2d": [0, 0, 1000, 1000], "label": "x"}, context(image)).images
    assert crop.mode == "RGB" and crop.size == (64, 64)
    if mode in ("I;16", "I", "F"):
        assert crop.getextrema()[0] == (0, 255)  # the source's own range spread over 8 bits


def test_small_box_grows_around_its_centre_and_stays_inside():
    image = scene()
    zoom = no_resize(min_crop_pixels=30)
    [crop] = zoom({"bbox_2d": [550, 580, 560, 600], "label": "x"}, context(image)).images  # 2x2 px at (110, 58)
    np.testing.assert_array_equal(np.asarray(crop), np.asarray(image)[44:74, 96:126])
    [corner] = zoom({"bbox_2d": [990, 0, 1000, 10], "label": "x"}, context(image)).images
    np.testing.assert_array_equal(np.asarray(corner), np.asarray(image)[0:30, 170:200])


def test_box_beyond_the_image_is_clipped():
    image = scene()
    observation = no_resize()({"bbox_2d": [-100, 500, 600, 1400], "label": "x"}, context(image))
    np.testing.assert_array_equal(np.asarray(observation.images[0]), np.asarray(image)[50:100, 0:120])
    assert "region [0, 500, 600, 1000] of image 0" in observation.text


def test_crop_of_a_crop():
    image = scene()
    zoom = no_resize()
    [first] = zoom({"bbox_2d": [450, 400, 650, 800], "label": "area"}, context(image)).images
    second = zoom({"bbox_2d": [250, 250, 750, 750], "label": "square", "img_idx": 1}, context(image, first))
    np.testing.assert_array_equal(np.asarray(second.images[0]), np.asarray(image)[50:70, 100:120])
    assert "(image 2): region [250, 250, 750, 750] of image 1" in second.text


@pytest.mark.parametrize("arguments, fragment", [
    ({"bbox_2d": [0, 0, 10], "label": "x"}, "list of 4 numbers"),
    ({"bbox_2d": [0, 0, "10", 10], "label": "x"}, "list of 4 numbers"),
    ({"bbox_2d": [0, 0, True, 10], "label": "x"}, "list of 4 numbers"),
    ({"bbox_2d": [0, 0, float("nan"), 10], "label": "x"}, "list of 4 numbers"),
    ({"bbox_2d": [0, 0, 10**400, 10], "label": "x"}, "list of 4 numbers"),  # too large for a float
    ({"bbox_2d": "0 0 10 10", "label": "x"}, "list of 4 numbers"),
    ({"bbox_2d": [10, 0, 10, 10], "label": "x"}, "x1 < x2 and y1 < y2"),
    ({"bbox_2d": [0, 20, 10, 10], "label": "x"}, "x1 < x2 and y1 < y2"),
    ({"bbox_2d": [1100, 0, 1200, 10], "label": "x"}, "outside the image"),
    ({"bbox_2d": [0, 0, 10, 10], "label": "x", "img_idx": 1}, "img_idx 1 is out of range"),
    ({"bbox_2d": [0, 0, 10, 10], "label": "x", "img_idx": -1}, "out of range"),
    ({"bbox_2d": [0, 0, 10, 10], "label": "x", "img_idx": 0.0}, "img_idx must be an integer"),
    ({"bbox_2d": [0, 0, 10, 10], "label": 3}, "label must be a string"),
])
def test_bad_arguments_are_rejected_with_a_clear_message(arguments, fragment):
    with pytest.raises(ToolFailure) as failure:
        ImageZoomIn()(arguments, context(scene()))
    assert failure.value.status == BAD_ARGUMENTS
    assert fragment in str(failure.value)
