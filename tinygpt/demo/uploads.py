"""Checks on the files a user attaches, before anything reaches the model.

Contract (limits come from the launch config's ``limits`` section, tinygpt.chat.launch.Limits):
* at most ``max_images`` files in one message;
* each file at most ``max_upload_bytes`` (gradio refuses bigger uploads itself when the demo is launched with
  ``max_file_size``; this check also covers files that arrive another way, e.g. an example or an API call);
* each file must decode as an image (a text file named ``.png`` does not) of at most ``max_image_pixels`` pixels
  (the size is read from the header before the pixels are decoded), in one of the formats the chat engine opens
  (tinygpt.chat.messages.IMAGE_FORMATS: PNG, JPEG, WebP, GIF, BMP; an EPS file never reaches Ghostscript);
* every refusal is one UserError naming the file, which the UI shows as a message.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from PIL import Image, UnidentifiedImageError

from ..chat.launch import Limits
from ..chat.messages import IMAGE_FORMAT_NAMES, IMAGE_FORMATS, sniff_format
from ..errors import UserError
from ..pixels import upright_size

ATTACH = f"attach a {IMAGE_FORMAT_NAMES} picture"  # the formats uploads open as (IMAGE_FORMATS)


def _megabytes(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def check_image_file(path: str | os.PathLike, limits: Limits) -> tuple[int, int]:
    """(width, height) of an acceptable image file, upright (tinygpt.pixels.upright_size), else UserError."""
    path = Path(path)
    name = path.name
    try:
        size = path.stat().st_size
    except OSError:
        raise UserError(f"{name}: the uploaded file is gone; attach it again") from None
    if size > limits.max_upload_bytes:
        raise UserError(f"{name}: {_megabytes(size)} is over this demo's upload limit of "
                        f"{_megabytes(limits.max_upload_bytes)} per image")
    try:
        with Image.open(path, formats=IMAGE_FORMATS) as image:
            width, height = image.size
            if width * height > limits.max_image_pixels:
                raise UserError(f"{name}: {width}x{height} pixels is over this demo's limit of "
                                f"{limits.max_image_pixels:,} pixels per image")
            image.load()
            width, height = upright_size(image)  # as the model sees it: turned as its EXIF orientation says
    except Image.DecompressionBombError:  # Image.open's own guard, before the size can be read: "damaged" misled
        most = min(limits.max_image_pixels, 2 * (Image.MAX_IMAGE_PIXELS or 0) or limits.max_image_pixels)
        raise UserError(f"{name}: the image has more pixels than this demo's limit of {most:,} pixels per "
                        "image") from None
    except UnidentifiedImageError:
        try:
            with open(path, "rb") as file:
                found = sniff_format(file.read(16))
        except OSError:
            found = None
        if found is not None and found not in IMAGE_FORMATS:
            raise UserError(f"{name}: {found} images are not accepted; {ATTACH}") from None
        raise UserError(f"{name}: not a readable image (not an image format this demo knows); {ATTACH}") from None
    except (OSError, ValueError):
        raise UserError(f"{name}: not a readable image (it is truncated or damaged); {ATTACH}") from None
    return width, height


def check_message_files(paths: Sequence[str], limits: Limits) -> list[tuple[int, int]]:
    """Sizes of the images of one message, after the count and per-file checks."""
    if len(paths) > limits.max_images:
        raise UserError(f"{len(paths)} images in one message; this demo takes at most {limits.max_images} "
                        "(limits.max_images in the launch config)")
    return [check_image_file(p, limits) for p in paths]
