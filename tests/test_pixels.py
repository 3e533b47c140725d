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


# --- EXIF orientation: a user's photo as its viewer shows it; datasets and benchmarks as stored -------------------
STORED = np.zeros((30, 60, 3), np.uint8)  # 60 wide, 30 high as stored: left half white
STORED[:, :30] = 255
SHOWN = np.asarray(Image.fromarray(STORED).transpose(Image.Transpose.ROTATE_270))  # orientation 6: 30 x 60


@pytest.fixture
def phone_photo(tmp_path):
    """A PNG stored sideways with EXIF orientation 6, as a phone saves a portrait photo (PNG: exact pixels)."""
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "portrait.png"
    Image.fromarray(STORED).save(path, exif=exif.tobytes())
    return path


def test_user_images_are_turned_upright_and_dataset_images_are_not(phone_photo, tmp_path):
    from tinygpt.chat.cli import TerminalChat
    from tinygpt.chat.messages import image_from_path
    from tinygpt.data.image import load_image
    from tinygpt.pixels import upright, upright_size

    with Image.open(phone_photo) as image:
        assert image.size == (60, 30) and upright_size(image) == (30, 60)
        np.testing.assert_array_equal(np.asarray(to_rgb(upright(image))), SHOWN)
    turned, stored = image_from_path(phone_photo, "image", turn=True), image_from_path(phone_photo, "image")
    np.testing.assert_array_equal(np.asarray(turned.open()), SHOWN)  # chat, server, demo
    np.testing.assert_array_equal(np.asarray(stored.open()), STORED)  # evaluation: boxes are in the stored frame
    assert turned.key != stored.key  # one engine's image cache holds both apart
    np.testing.assert_array_equal(np.asarray(load_image(phone_photo.parent, phone_photo.name)), STORED)  # training

    class Engine:  # the terminal chat's /image and --image: the upright image is what gets prepared
        def prepare(self, messages):
            pass

    chat = TerminalChat(Engine())
    try:
        chat.attach(str(phone_photo))
        assert chat.pending[0].open().size == (30, 60)
    finally:
        chat.close()


def test_the_server_and_the_demo_see_and_size_it_upright(phone_photo, tmp_path):
    from quantize.vision_runtime import load_image as runtime_image
    from tinygpt.chat.launch import Limits
    from tinygpt.demo.handlers import _open, turned
    from tinygpt.demo.uploads import check_image_file
    from tinygpt.serve.images import image_size

    data = phone_photo.read_bytes()
    assert image_size(data, "messages[0].content[0].image_url.url", 10**6) == (30, 60)  # the answer's boxes' frame
    limits = Limits(max_images=4, max_image_pixels=10**6, max_upload_bytes=10**6, queue_size=4)
    assert check_image_file(phone_photo, limits) == (30, 60)  # the demo's region and box frame
    np.testing.assert_array_equal(np.asarray(_open(str(phone_photo), 10**6)), SHOWN)  # the demo's view
    [message] = turned([{"role": "user", "content": [{"type": "image", "image": str(phone_photo)},
                                                     {"type": "text", "text": "hi"}]}])
    np.testing.assert_array_equal(np.asarray(message["content"][0]["image"].open()), SHOWN)  # what the demo sends
    assert message["content"][1] == {"type": "text", "text": "hi"}
    pixels = runtime_image(phone_photo, 60, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))[0, 0].numpy()  # python -m quantize chat
    assert pixels[:20].mean() > 0.9 and pixels[40:].mean() < 0.1  # upright: white on top (it was the left half)
