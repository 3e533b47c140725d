"""Decoded images to the 8-bit RGB pixels every model input is made of (training, evaluation, chat, demo, server).

    from tinygpt.pixels import to_rgb
    rgb = to_rgb(Image.open(path))

PIL's ``convert("RGB")`` clips 16-bit grayscale (PNG, TIFF: modes ``I;16*`` and ``I``) to 255 instead of scaling it,
so all but the darkest of its 65,536 values became white; here it is scaled (value / 257, rounded). Needs NumPy and
PIL only (the chat engine and the server import it without torch).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def to_rgb(image: Image.Image) -> Image.Image:
    """``image`` as 8-bit RGB, 16-bit grayscale scaled to 8 bits."""
    if image.mode in SIXTEEN_BIT_MODES:
        values = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8), "L")
    return image.convert("RGB")
