"""16-bit grayscale images (PNG, TIFF) are scaled to 8 bits on every path into the model: PIL's convert("RGB") clipped
them to 255, so all but the darkest values became white (the training loader, the chat engine's images, the demo's
view and the GGUF runtime's image loader all read them that way)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from tinygpt.pixels import to_rgb

RAMP = np.linspace(0, 65535, 256).astype(np.uint16)[None].repeat(4, 0)  # 4 x 256, black to white
WANT = np.rint(RAMP / 257.0).astype(np.uint8)  # 0, 1, ..., 255


@pytest.fixture
def gray16(tmp_path):
    path = tmp_path / "ramp16.png"
    Image.fromarray(RAMP).save(path)
    with Image.open(path) as image:
        assert image.mode == "I;16"  # what PIL makes of a 16-bit grayscale PNG
    return path


def _channels_equal_ramp(image: Image.Image) -> None:
    pixels = np.asarray(image)
    assert image.mode == "RGB" and pixels.shape == (4, 256, 3)
    for channel in range(3):
        np.testing.assert_array_equal(pixels[..., channel], WANT)


def test_to_rgb_scales_16_bit_grayscale(gray16):
    with Image.open(gray16) as image:
        _channels_equal_ramp(to_rgb(image))
    _channels_equal_ramp(to_rgb(Image.fromarray(RAMP.astype(np.int32), "I")))  # mode I: 32-bit ints in 16-bit range
    eight = Image.fromarray(WANT[..., None].repeat(3, 2), "RGB")
    assert to_rgb(eight).tobytes() == eight.tobytes()  # 8-bit images as before


def test_every_reader_scales_it(gray16):
    from quantize.vision_runtime import load_image as runtime_image
    from tinygpt.chat.messages import image_from_path
    from tinygpt.data.image import load_image
    from tinygpt.demo.handlers import _open

    _channels_equal_ramp(load_image(gray16.parent, gray16.name))  # training and evaluation datasets
    _channels_equal_ramp(image_from_path(gray16, "image").open())  # chat, server, evaluation through the engine
    _channels_equal_ramp(_open(str(gray16), 10**6))  # the demo's view
    pixels = runtime_image(gray16, 256, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))  # the GGUF runtime: [1, 3, S, S] in 0..1
    assert pixels.shape == (1, 3, 256, 256) and float(pixels.max()) > 0.99 and float(pixels.min()) < 0.01
    assert abs(float(pixels.mean()) - 0.5) < 0.01  # a ramp: about half grey (it was ~1.0, white)
