"""The server's image policy: which images a request may carry, checked in two steps.

    found = find_images(messages, limits, allow_local)    # before the queue: count, URLs, policy; nothing read
    parse_messages(with_images(messages, found))            # the messages' structure, images as placeholders
    messages, sizes = read_images(messages, found, limits, allow_local)   # after admission, on a worker thread

`find_images` walks the request's messages (cheap: nothing is decoded or read):
* more than ``limits.max_images`` images in the request: 400;
* an image part without a URL string: 400; a ``data:`` URI whose header is not ``data:image/<type>;base64,``
  (scheme and ``;base64`` in any case; tinygpt.chat.data_uri_payload, the parser the chat engine uses): 400;
* a local path or ``file://`` URL is taken only when the server runs with ``--allow-local-images`` (else 400); any
  other URL (http, https, ftp, s3 ...) is refused with 400: the server never fetches.
`read_images` returns a copy of the messages in which every ``image_url`` (and ``image``) part is an ``image`` part
holding a checked `ImageRef`, plus the (width, height) of each image in conversation order (the last one is the
image boxes are given in):
* base64 that does not decode (spaces and line breaks in it are ignored): 400;
* the image's size is read from its header (PIL opens lazily): more than ``limits.max_image_pixels`` pixels is a 413
  without decoding; PIL's own decompression-bomb guard is a 413 too; bytes that are not an image are a 400, and so
  are bytes in a format other than PNG, JPEG, WebP, GIF and BMP (tinygpt.chat.messages.IMAGE_FORMATS: no other plugin,
  e.g. EPS's Ghostscript, ever sees client bytes), the message naming the format;
* a local file that does not exist is a 400; one larger than ``limits.max_upload_bytes`` a 413 (a request body is
  already bounded by that size).
Anything that is not an image part is left for `tinygpt.chat.parse_messages`, which names the field at fault.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable
from urllib.parse import unquote, urlparse

from PIL import Image, UnidentifiedImageError

from ..chat.launch import Limits
from ..chat.messages import (
    IMAGE_FORMATS, ImageRef, data_uri_payload, decode_data_uri, format_refusal, image_from_bytes, is_data_uri,
)
from ..pixels import upright_size
from .errors import APIError

IMAGE_TYPES = ("image_url", "image")


@dataclass(frozen=True)
class ImagePart:
    message: int  # index in messages
    part: int  # index in that message's content
    url: str
    field: str  # e.g. messages[0].content[1].image_url.url


def _image_parts(messages: Any):
    """(where, message index, part index) of every image part, in conversation order."""
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


def _check_url(url: str, field: str, allow_local: bool) -> None:
    if is_data_uri(url):
        data_uri_payload(url, field)  # the header (a UserError: a 400 naming the field)
        return
    scheme = urlparse(url).scheme.lower()
    if scheme and scheme != "file" and len(scheme) > 1:  # one letter: a Windows drive, i.e. a local path
        raise APIError(400, f"{field}: remote image URLs ({scheme}://) are not fetched; send the image as a data: "
                            "URI", field, "remote_image_url")
    if not allow_local:
        raise APIError(400, f"{field}: local image paths are refused (start the server with --allow-local-images "
                            "to allow them); send the image as a data: URI", field)


def find_images(messages: Any, limits: Limits, allow_local: bool) -> list[ImagePart]:
    """The request's image parts, counted and their URLs checked by the policy above; nothing is read."""
    found = list(_image_parts(messages))
    if len(found) > limits.max_images:
        raise APIError(400, f"messages: the request holds {len(found)} images; this server takes at most "
                            f"{limits.max_images} per request (limits.max_images)", "messages", "too_many_images")
    parts = []
    for where, i, j in found:
        url, field = _url_of(messages[i]["content"][j], where)
        _check_url(url, field, allow_local)
        parts.append(ImagePart(i, j, url, field))
    return parts


def with_images(messages: Any, found: list[ImagePart], image: Callable[[ImagePart], ImageRef] | None = None) -> Any:
    """A copy of `messages` whose image parts are ``{"type": "image", "image": image(part)}`` (default: a
    placeholder that is never opened, to check the messages' structure before anything is read)."""
    if not found:
        return messages
    image = image or (lambda part: ImageRef("unread", part.field))
    messages = [dict(m) if isinstance(m, dict) else m for m in messages]
    for part in found:
        content = messages[part.message]["content"] = list(messages[part.message]["content"])
        content[part.part] = {"type": "image", "image": image(part)}
    return messages


def _read_local(url: str, field: str, limits: Limits) -> bytes:
    path = Path(unquote(urlparse(url).path) if url.lower().startswith("file:") else url)
    if not path.is_file():
        raise APIError(400, f"{field}: image file not found: {path}", field)
    if path.stat().st_size > limits.max_upload_bytes:
        raise APIError(413, f"{field}: the file is {path.stat().st_size} bytes; this server takes at most "
                            f"{limits.max_upload_bytes} (limits.max_upload_bytes)", field, "image_too_large")
    return path.read_bytes()


def image_bytes(url: str, field: str, limits: Limits, allow_local: bool) -> bytes:
    """The bytes an image URL stands for, by the policy above (never fetched from the network)."""
    _check_url(url, field, allow_local)
    return decode_data_uri(url, field) if is_data_uri(url) else _read_local(url, field, limits)


def image_size(data: bytes, field: str, max_pixels: int) -> tuple[int, int]:
    """(width, height) from the image's header, refused when larger than `max_pixels`; nothing is decoded."""
    try:
        with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as image:  # never EPS (Ghostscript), TIFF ...
            width, height = upright_size(image)  # turned as its EXIF orientation says, as the model sees it
    except Image.DecompressionBombError:
        raise APIError(413, f"{field}: the image has more pixels than this server decodes (at most {max_pixels}, "
                            "limits.max_image_pixels)", field, "image_too_large") from None
    except UnidentifiedImageError:
        raise APIError(400, format_refusal(data[:16], field), field, "invalid_image") from None
    except (OSError, ValueError, SyntaxError):
        raise APIError(400, f"{field}: not a readable image: its header is truncated or damaged", field,
                       "invalid_image") from None
    if width * height > max_pixels:
        raise APIError(413, f"{field}: the image is {width} x {height} = {width * height} pixels; this server takes "
                            f"at most {max_pixels} (limits.max_image_pixels)", field, "image_too_large")
    return width, height


def read_images(messages: Any, found: list[ImagePart], limits: Limits,
                allow_local: bool) -> tuple[Any, list[tuple[int, int]]]:
    """`messages` with each image part found an `ImageRef` of its bytes (checked), and the images' sizes."""
    sizes = []

    def read(part: ImagePart) -> ImageRef:
        data = image_bytes(part.url, part.field, limits, allow_local)
        sizes.append(image_size(data, part.field, limits.max_image_pixels))
        return image_from_bytes(data, part.field, turn=True)  # a client's photo, as its viewer shows it

    return with_images(messages, found, read), sizes
