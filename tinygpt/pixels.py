"""Decoded images to the 8-bit RGB pixels every model input is made of (training, evaluation, chat, demo, server).

    from tinygpt.pixels import to_rgb, upright, upright_size
    rgb = to_rgb(Image.open(path))                 # datasets and benchmarks: the pixels as stored
    rgb = to_rgb(upright(Image.open(path)))        # a user's image (chat, demo, server): as a phone shows it

* PIL's ``convert("RGB")`` clips 16-bit grayscale (PNG, TIFF: modes ``I;16*`` and ``I``) to 255 instead of scaling
  it, so all but the darkest of its 65,536 values became white; `to_rgb` scales it (value / 257, rounded).
* A phone stores a photo as the sensor saw it and an EXIF orientation saying how to turn it; browsers, phones and
  gradio's thumbnails turn it, PIL does not. `upright` turns a user's image the way its viewer sees it (and
  `upright_size` gives that size from the header alone, for the boxes in an answer). Training and benchmark images
  are not turned: their annotations (COCO's boxes among them) are in the stored pixels' frame, as the original read
  them.
Needs NumPy and PIL only (the chat engine and the server import it without torch).
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps

SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
ORIENTATION = 0x0112  # the EXIF tag; 1 is upright, 5-8 turn the image a quarter (width and height swap)


def to_rgb(image: Image.Image) -> Image.Image:
    """``image`` as 8-bit RGB, 16-bit grayscale scaled to 8 bits."""
    if image.mode in SIXTEEN_BIT_MODES:
        values = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8), "L")
    return image.convert("RGB")


def _orientation(image: Image.Image) -> int:
    try:
        value = image.getexif().get(ORIENTATION, 1)
    except Exception:  # a damaged EXIF block is no reason to refuse the pixels: as stored
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def upright(image: Image.Image) -> Image.Image:
    """``image`` turned as its EXIF orientation says (decodes it); without one, ``image`` itself."""
    return ImageOps.exif_transpose(image) if _orientation(image) != 1 else image


def upright_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) of ``upright(image)``, from the header (nothing is decoded)."""
    width, height = image.size
    return (height, width) if _orientation(image) >= 5 else (width, height)
