"""The server's image policy: which images a request may carry, checked before anything is decoded.

`check_images(messages, limits, allow_local)` walks the request's messages and returns a copy in which every
``image_url`` (and ``image``) part is replaced by an ``image`` part holding a checked `ImageRef`, plus the
(width, height) of each image in conversation order (the last one is the image boxes are given in).

* more than ``limits.max_images`` images in the request: 400, before any image is read;
* ``data:`` URIs must be ``data:<type>;base64,<data>`` with valid base64 (else 400);
* a local path or ``file://`` URL is read only when the server runs with ``--allow-local-images`` (else 400); any
  other URL (http, https, ftp, s3 ...) is refused with 400: the server never fetches;
* the image's size is read from its header (PIL opens lazily): more than ``limits.max_image_pixels`` pixels is a 413
  without decoding; PIL's own decompression-bomb guard is a 413 too; bytes that are not an image are a 400;
* a local file larger than ``limits.max_upload_bytes`` is a 413 (a request body is already bounded by that size).
Anything that is not an image part is left for `tinygpt.chat.parse_messages`, which names the field at fault.
"""

from __future__ import annotations

import base64
import binascii
import io
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from PIL import Image, UnidentifiedImageError

from ..chat.launch import Limits
from ..chat.messages import ImageRef, image_from_bytes
from .errors import APIError

IMAGE_TYPES = ("image_url", "image")


def _image_parts(messages: Any):
    """(field, message index, part index) of every image part, in conversation order."""
    if not isinstance(messages, list):
        return
    for i, msg in enumerate(messages):
        content = msg.get("content") if isinstance(msg, dict) else None
        if isinstance(content, list):
            for j, part in enumerate(content):
                if isinstance(part, dict) and part.get("type") in IMAGE_TYPES:
                    yield f"messages[{i}].content[{j}]", i, j


def _url_of(part: dict, where: str) -> tuple[str, str]:
    if part["type"] == "image":
        value, field = part.get("image"), f"{where}.image"
    else:
        value = part.get("image_url")
        field = f"{where}.image_url.url" if isinstance(value, dict) else f"{where}.image_url"
        value = value.get("url") if isinstance(value, dict) else value
    if not isinstance(value, str) or not value:
        raise APIError(400, f"{field}: expected an image URL string (a data: URI)", field)
    return value, field


def _decode_data_uri(url: str, field: str) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep or not header.endswith(";base64"):
        raise APIError(400, f"{field}: a data URI must look like data:image/png;base64,<data>", field)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise APIError(400, f"{field}: the data URI is not valid base64", field) from None


def _read_local(url: str, field: str, limits: Limits, allow_local: bool) -> bytes:
    if not allow_local:
        raise APIError(400, f"{field}: local image paths are refused (start the server with --allow-local-images "
                            "to allow them); send the image as a data: URI", field)
    path = Path(unquote(urlparse(url).path) if url.lower().startswith("file:") else url)
    if not path.is_file():
        raise APIError(400, f"{field}: image file not found: {path}", field)
    if path.stat().st_size > limits.max_upload_bytes:
        raise APIError(413, f"{field}: the file is {path.stat().st_size} bytes; this server takes at most "
                            f"{limits.max_upload_bytes} (limits.max_upload_bytes)", field, "image_too_large")
    return path.read_bytes()


def image_bytes(url: str, field: str, limits: Limits, allow_local: bool) -> bytes:
    """The bytes an image URL stands for, by the policy above (never fetched from the network)."""
    if url.startswith("data:"):
        return _decode_data_uri(url, field)
    scheme = urlparse(url).scheme.lower()
    if scheme and scheme != "file" and len(scheme) > 1:  # one letter: a Windows drive, i.e. a local path
        raise APIError(400, f"{field}: remote image URLs ({scheme}://) are not fetched; send the image as a data: "
                            "URI", field, "remote_image_url")
    return _read_local(url, field, limits, allow_local)


def image_size(data: bytes, field: str, max_pixels: int) -> tuple[int, int]:
    """(width, height) from the image's header, refused when larger than `max_pixels`; nothing is decoded."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
    except Image.DecompressionBombError:
        raise APIError(413, f"{field}: the image has more pixels than this server decodes (at most {max_pixels}, "
                            "limits.max_image_pixels)", field, "image_too_large") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise APIError(400, f"{field}: not a readable image ({type(exc).__name__})", field, "invalid_image") from None
    if width * height > max_pixels:
        raise APIError(413, f"{field}: the image is {width} x {height} = {width * height} pixels; this server takes "
                            f"at most {max_pixels} (limits.max_image_pixels)", field, "image_too_large")
    return width, height


def check_images(messages: Any, limits: Limits, allow_local: bool) -> tuple[Any, list[tuple[int, int]]]:
    found = list(_image_parts(messages))
    if len(found) > limits.max_images:
        raise APIError(400, f"messages: the request holds {len(found)} images; this server takes at most "
                            f"{limits.max_images} per request (limits.max_images)", "messages", "too_many_images")
    if not found:
        return messages, []
    messages = [dict(m) if isinstance(m, dict) else m for m in messages]
    sizes = []
    for where, i, j in found:
        content = messages[i]["content"] = list(messages[i]["content"])
        url, field = _url_of(content[j], where)
        data = image_bytes(url, field, limits, allow_local)
        sizes.append(image_size(data, field, limits.max_image_pixels))
        ref: ImageRef = image_from_bytes(data, field)
        content[j] = {"type": "image", "image": ref}
    return messages, sizes
