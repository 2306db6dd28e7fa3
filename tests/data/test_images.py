"""Image decoding: EXIF orientation, 16-bit grayscale, transparency, as the processor's own loading does it."""

import io

import numpy as np
import pytest
from PIL import ExifTags, Image

from axpo_jax.data.images import load_image, to_rgb
from axpo_jax.data.tasks import load_image as tasks_load_image
from axpo_jax.eval.benchmarks.base import ImageSource

RED, BLUE = (255, 0, 0), (0, 0, 255)


def _rotated_jpeg(path, orientation: int = 6) -> None:
    """A 64x32 JPEG stored red left, blue right, tagged to be shown rotated (6: 90 degrees clockwise)."""
    pixels = np.zeros((32, 64, 3), np.uint8)
    pixels[:, :32] = RED
    pixels[:, 32:] = BLUE
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = orientation
    Image.fromarray(pixels).save(path, exif=exif, quality=95)


def _half_transparent(mode: str) -> Image.Image:
    """Left half fully transparent (over a dark colour), right half opaque."""
    colour = (200, 50, 0) if mode == "RGBA" else (90,)
    pixels = np.zeros((4, 8, len(colour) + 1), np.uint8)
    pixels[:, :4, :-1] = 30  # what a bare convert("RGB") would show where nothing should be seen
    pixels[:, 4:, :-1] = colour
    pixels[:, 4:, -1] = 255
    return Image.fromarray(pixels, mode)


def test_exif_orientation_gives_the_displayed_image(tmp_path):
    path = tmp_path / "phone.jpg"
    _rotated_jpeg(path)
    image = load_image(path)
    assert image.size == (32, 64)  # displayed size, not the stored 64x32
    pixels = np.asarray(image).astype(int)
    # turned clockwise, the stored left (red) is now on top and the right (blue) at the bottom
    assert np.abs(pixels[:28] - RED).max() < 40 and np.abs(pixels[36:] - BLUE).max() < 40
    assert tasks_load_image(path).size == (32, 64)  # the path RL task files and SFT conversations use
    assert ImageSource(data=path.read_bytes()).open().size == (32, 64)  # and benchmark images
    assert ImageSource(path=str(path)).open().size == (32, 64)


@pytest.mark.parametrize("orientation", [6, 8])
def test_orientation_matches_transformers_loading(tmp_path, orientation):
    from transformers.image_utils import load_image as transformers_load_image

    path = tmp_path / "phone.jpg"
    _rotated_jpeg(path, orientation)
    np.testing.assert_array_equal(np.asarray(load_image(path)), np.asarray(transformers_load_image(str(path))))


def test_sixteen_bit_grayscale_is_scaled_not_clipped(tmp_path):
    path = tmp_path / "depth.png"
    Image.fromarray(np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (4, 1))).save(path)
    assert Image.open(path).mode == "I;16"  # the case PIL clips: nearly every sample is over 255
    pixels = np.asarray(load_image(path))
    assert pixels.shape == (4, 64, 3) and abs(pixels.mean() - 127.5) < 2  # a bare convert gave ~254
    assert pixels[0, 0, 0] == 0 and pixels[0, -1, 0] == 255 and np.all(np.diff(pixels[0, :, 0].astype(int)) >= 0)


@pytest.mark.parametrize("mode,samples", [("I", np.linspace(-1000, 70000, 64)), ("F", np.linspace(0, 1, 64))])
def test_other_high_depth_modes_are_scaled_by_their_range(mode, samples):
    image = Image.fromarray(np.tile(samples.astype(np.int32 if mode == "I" else np.float32), (2, 1)), mode)
    pixels = np.asarray(to_rgb(image))[0, :, 0]
    assert (pixels[0], pixels[-1]) == (0, 255) and abs(pixels.mean() - 127.5) < 2


def test_uniform_high_depth_image_does_not_divide_by_zero():
    image = Image.fromarray(np.full((2, 3), 4000, np.uint16))
    assert np.asarray(to_rgb(image)).shape == (2, 3, 3)


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_transparent_pixels_are_white_and_opaque_keep_their_colour(tmp_path, mode):
    path = tmp_path / "overlay.png"
    _half_transparent(mode).save(path)
    pixels = np.asarray(load_image(path))
    assert np.all(pixels[:, :4] == 255)
    assert np.all(pixels[:, 4:] == ((200, 50, 0) if mode == "RGBA" else (90, 90, 90)))


def test_palette_transparent_index_is_white(tmp_path):
    path = tmp_path / "icon.png"
    image = Image.fromarray(np.array([[0, 1, 1], [1, 0, 0]], np.uint8), "P")
    image.putpalette([0, 0, 0, *RED])  # index 0, the transparent one, is black underneath
    image.save(path, transparency=0)
    pixels = np.asarray(load_image(path))
    np.testing.assert_array_equal(pixels[0], [(255, 255, 255), RED, RED])
    np.testing.assert_array_equal(pixels[1], [RED, (255, 255, 255), (255, 255, 255)])


def test_transparency_matches_transformers_convert_to_rgb():
    from transformers.image_transforms import convert_to_rgb

    image = _half_transparent("RGBA")
    image.putpixel((0, 0), (200, 50, 0, 128))  # half transparent: a blend, not just white or the colour
    ours = np.asarray(to_rgb(image))
    assert np.abs(ours[0, 0].astype(int) - (228, 152, 128)).max() <= 1  # (200, 50, 0) halfway toward white
    np.testing.assert_array_equal(ours, convert_to_rgb(image, return_numpy=True))


def test_plain_rgb_is_unchanged_and_a_copy(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    path = tmp_path / "plain.png"
    Image.fromarray(pixels).save(path)
    np.testing.assert_array_equal(np.asarray(load_image(path)), pixels)
    original = Image.fromarray(pixels)
    converted = ImageSource(image=original).open()
    np.testing.assert_array_equal(np.asarray(converted), pixels)
    converted.paste((0, 0, 0), (0, 0, 7, 5))  # the agent loop may draw on what it opened
    np.testing.assert_array_equal(np.asarray(original), pixels)


def test_truncated_file_fails_at_load_time(tmp_path):
    encoded = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(encoded, "PNG")
    path = tmp_path / "cut.png"
    path.write_bytes(encoded.getvalue()[: len(encoded.getvalue()) // 2])
    with pytest.raises(OSError):
        load_image(path)
