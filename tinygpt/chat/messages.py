"""Chat messages in the OpenAI content-part shape -> a `Conversation` of turns with image placeholders.

Accepted input (a list of dicts, as `/v1/chat/completions`, gradio 6 and evaluation harnesses send them)::

    {"role": "system" | "developer" | "user" | "assistant",
     "content": "text" | [{"type": "text", "text": "..."},
                          {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}},   # or a str url
                          {"type": "image", "image": PIL.Image | "path/to/file.png"}]}

Rules:
* every image part becomes ``<Img><ImageHere></Img>`` at its position; the parts of a message are joined with one
  space, so ``[image, "What is it?"]`` reads ``"<Img><ImageHere></Img> What is it?"`` (the training wording);
* any number of images per message and across turns; images are only allowed in user messages;
* a system message may only come first; its text is put in front of the first user text (the prompt templates of
  TinyGPT-V have no system slot); ``developer`` (OpenAI's newer name for it) is the same as ``system``;
* an assistant message's content may be null or missing (as a client echoes a reply that called a tool or refused),
  and may hold ``{"type": "refusal", "refusal": ...}`` parts: both count as empty text;
* consecutive user messages are merged (one space); user and assistant must otherwise alternate, and the first
  non-system message is a user message;
* image URLs may be ``data:`` URIs, ``file://`` URLs or local paths; ``http(s)`` is refused (no downloads); a data URI
  is read by `decode_data_uri` (the one parser, the server's too): ``data:image/<type>;base64,<data>``, scheme and
  ``;base64`` in any case, whitespace in the data ignored, a media type other than ``image/*`` refused;
* a text that already contains ``<ImageHere>`` is refused (it would desynchronise images and placeholders), and so
  is a text holding an unpaired UTF-16 surrogate (JSON may escape half of a pair, ``"\\ud83d"``: valid JSON, but no
  Unicode text and no tokenizer takes it; `check_unicode`, also used for prompts and stop strings);
* image bytes are opened only as one of `IMAGE_FORMATS` (PNG, JPEG, WebP, GIF, BMP: `open_image`, the server's and
  the demo's too), so bytes in another format (EPS, which PIL would hand to Ghostscript, TIFF ...) never reach a
  decoder: an `UnreadableImage` naming the format.
Every violation is a `UserError` naming the field, e.g. ``messages[2].content[1].image_url.url: ...``; an image
that does not decode when it is used (`ImageRef.open`) is an `UnreadableImage`, a UserError (the server: code
``invalid_image``).

An image is carried as an `ImageRef`: a content key (sha256 of the file bytes, the data-URI bytes or the decoded
pixels) and a way to open it, so a cached image is never decoded twice.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence
from urllib.parse import unquote, urlparse

from PIL import Image, UnidentifiedImageError

from ..errors import UserError
from ..pixels import to_rgb, upright
from ..tasks import IMAGE_PLACEHOLDER, IMAGE_TAG

ROLES = ("system", "developer", "user", "assistant")
SYSTEM_ROLES = ("system", "developer")
DATA_URI_SHAPE = "data:image/png;base64,<data>"
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")  # what client and user image bytes may be opened as (PIL names)
IMAGE_FORMAT_NAMES = "PNG, JPEG, WebP, GIF or BMP"


class UnreadableImage(UserError):
    """An image whose bytes do not decode (not an image, truncated, damaged, too large for PIL's guard)."""


def check_unicode(text: str, where: str) -> str:
    """`text`, or a UserError naming `where` when it holds an unpaired UTF-16 surrogate (``"\\ud83d"`` in JSON: half
    of an escaped pair, e.g. an emoji cut in two), which is no Unicode text and which no tokenizer takes."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise UserError(f"{where}: text holds an unpaired UTF-16 surrogate (\\u{ord(text[exc.start]):04x}) at "
                        f"character {exc.start}") from None
    return text


def sniff_format(head: bytes) -> str | None:
    """The PIL format name whose signature `head` (the first bytes of a file) carries, or None; only the plugins'
    signature checks run, nothing is parsed."""
    Image.init()
    for name, (_, accept) in Image.OPEN.items():
        try:
            if accept is not None and accept(head[:16]):
                return name
        except Exception:  # a plugin's check that does not take this prefix: not that format
            continue
    return None


def format_refusal(head: bytes, where: str, what: str = "tinygpt") -> str:
    """The message for bytes that do not open as one of `IMAGE_FORMATS`, naming their format when it is known."""
    found = sniff_format(head)
    if found is not None and found not in IMAGE_FORMATS:
        return f"{where}: {found} images are not accepted; send {IMAGE_FORMAT_NAMES}"
    return f"{where}: not a readable image (not an image format {what} knows: {IMAGE_FORMAT_NAMES})"


def open_image(data: bytes, where: str) -> Image.Image:
    """`data` opened lazily (header only) as one of `IMAGE_FORMATS`; an `UnreadableImage` naming the format
    otherwise. Every image from a client or a user file is opened here (or with ``formats=IMAGE_FORMATS``)."""
    try:
        return Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except UnidentifiedImageError:
        raise UnreadableImage(format_refusal(data[:16], where)) from None


@dataclass(frozen=True)
class ImageRef:
    """One image of a conversation: `key` identifies its content, `open()` decodes it (RGB)."""

    key: str
    where: str = field(default="image", compare=False)  # the field it came from, for error messages
    _load: Callable[[], Image.Image] | None = field(default=None, compare=False, repr=False)

    def open(self) -> Image.Image:
        try:
            image = self._load()
            image.load()
        except Image.DecompressionBombError as exc:  # PIL's guard: over 2 x Image.MAX_IMAGE_PIXELS
            raise UnreadableImage(f"{self.where}: the image is too large to decode ({exc})") from None
        except UnidentifiedImageError:
            raise UnreadableImage(f"{self.where}: not a readable image (not an image format PIL knows)") from None
        except (OSError, ValueError, SyntaxError) as exc:
            raise UnreadableImage(f"{self.where}: not a readable image: it is truncated or damaged ({exc})") from None
        return to_rgb(image)  # 16-bit grayscale scaled, as the training loader does


@dataclass(frozen=True)
class ChatTurn:
    """One user prompt (placeholders at the image positions), its images in order, and the answer (None: to ask)."""

    user: str
    images: tuple[ImageRef, ...] = ()
    assistant: str | None = None


@dataclass(frozen=True)
class Conversation:
    turns: tuple[ChatTurn, ...]

    @property
    def images(self) -> tuple[ImageRef, ...]:
        return tuple(im for t in self.turns for im in t.images)

    def as_model_turns(self) -> list[dict]:
        """tinygpt.model's shape: [{"user": ..., "assistant": ...}, ...]."""
        return [{"user": t.user, "assistant": t.assistant} for t in self.turns]


def image_from_bytes(data: bytes, where: str, turn: bool = False) -> ImageRef:
    """``turn``: a user's image, turned as its EXIF orientation says (`tinygpt.pixels.upright`)."""
    key = hashlib.sha256(data).hexdigest()
    if turn:
        return ImageRef(f"upright:{key}", where, lambda: upright(open_image(data, where)))
    return ImageRef(key, where, lambda: open_image(data, where))


def image_from_path(path: str | os.PathLike, where: str, turn: bool = False) -> ImageRef:
    path = Path(path)
    if not path.is_file():  # where may be the path itself (the terminal chat): not named twice
        raise UserError(f"{where}: image file not found" + ("" if where == str(path) else f": {path}"))
    return image_from_bytes(path.read_bytes(), where, turn)


def image_from_pil(image: Image.Image, where: str = "image") -> ImageRef:
    rgb = to_rgb(image)
    digest = hashlib.sha256(f"{rgb.width}x{rgb.height}:".encode() + rgb.tobytes()).hexdigest()
    return ImageRef(digest, where, lambda: rgb)


def image_ref(value: Any, where: str = "image", turn: bool = False) -> ImageRef:
    """An ImageRef from a PIL image, a path, a data URI / file URL string, or an ImageRef (``turn``: files and
    URIs turned upright as their EXIF orientation says; a PIL image or an ImageRef is taken as it is)."""
    if isinstance(value, ImageRef):
        return value
    if isinstance(value, Image.Image):
        return image_from_pil(value, where)
    if isinstance(value, os.PathLike):
        return image_from_path(value, where, turn)
    if isinstance(value, str):
        return _image_from_url(value, where, turn)
    raise UserError(f"{where}: expected a PIL image, a path or a data URI, got {type(value).__name__}")


def is_data_uri(url: str) -> bool:
    return url[:5].lower() == "data:"


def data_uri_payload(url: str, where: str) -> str:
    """The base64 text of a ``data:image/<type>[;params];base64,<data>`` URI, its header checked (scheme and
    ``;base64`` in any case; the media type must be an image); a UserError naming `where` otherwise."""
    header, sep, payload = url[5:].partition(",")
    params = [p.strip() for p in header.split(";")]
    if not sep or len(params) < 2 or params[-1].lower() != "base64":
        raise UserError(f"{where}: a data URI must look like {DATA_URI_SHAPE}")
    media = params[0].lower()
    if not media:
        raise UserError(f"{where}: the data URI names no media type; it must look like {DATA_URI_SHAPE}")
    if not media.startswith("image/"):
        shown = media.encode("ascii", "backslashreplace").decode()  # escaped: it may hold a lone surrogate
        raise UserError(f"{where}: media type {shown} is not an image; a data URI must look like {DATA_URI_SHAPE}")
    return payload


def decode_data_uri(url: str, where: str) -> bytes:
    """The bytes of a data URI (`data_uri_payload`); spaces and line breaks in the base64 text (wrapped `base64`
    output) are ignored, anything else that is not base64 is a UserError."""
    payload = "".join(data_uri_payload(url, where).split())
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise UserError(f"{where}: the data URI is not valid base64") from None


def _image_from_url(url: str, where: str, turn: bool = False) -> ImageRef:
    if is_data_uri(url):
        return image_from_bytes(decode_data_uri(url, where), where, turn)
    scheme = urlparse(url).scheme.lower()
    if scheme in ("http", "https", "ftp"):
        raise UserError(f"{where}: remote image URLs are not fetched; send the image as a data: URI")
    if scheme == "file":
        return image_from_path(unquote(urlparse(url).path), where, turn)
    return image_from_path(url, where, turn)


def _check_text(text: Any, where: str) -> str:
    if not isinstance(text, str):
        raise UserError(f"{where}: expected a string, got {type(text).__name__}")
    if IMAGE_PLACEHOLDER in text:
        raise UserError(f"{where}: text may not contain {IMAGE_PLACEHOLDER}; send images as image parts")
    return check_unicode(text, where)


def _parse_part(part: Any, where: str, assistant: bool) -> str | ImageRef:
    if not isinstance(part, dict):
        raise UserError(f"{where}: expected an object with a 'type', got {type(part).__name__}")
    kind = part.get("type")
    if kind == "text":
        return _check_text(part.get("text"), f"{where}.text")
    if kind == "refusal" and assistant:  # an OpenAI model's refusal, echoed back: no text of the conversation
        _check_text(part.get("refusal"), f"{where}.refusal")
        return ""
    if kind == "image_url":
        value = part.get("image_url")
        url = value.get("url") if isinstance(value, dict) else value
        field = f"{where}.image_url.url" if isinstance(value, dict) else f"{where}.image_url"
        if not isinstance(url, str):
            raise UserError(f"{field}: expected a URL string")
        return _image_from_url(url, field)
    if kind == "image":
        if "image" not in part:
            raise UserError(f"{where}.image: missing")
        return image_ref(part["image"], f"{where}.image")
    kinds = "'text', 'refusal', 'image_url' or 'image'" if assistant else "'text', 'image_url' or 'image'"
    raise UserError(f"{where}.type: expected {kinds}, got {kind!r}")


def _parse_content(content: Any, where: str, assistant: bool = False) -> list[str | ImageRef]:
    if isinstance(content, str):
        return [_check_text(content, where)]
    if content is None and assistant:  # {"role": "assistant", "content": null, "refusal": ...} or "tool_calls"
        return []
    if isinstance(content, (list, tuple)):
        return [_parse_part(p, f"{where}[{i}]", assistant) for i, p in enumerate(content)]
    raise UserError(f"{where}: expected a string or a list of parts, got {type(content).__name__}")


def _join(parts: Sequence[str | ImageRef]) -> tuple[str, tuple[ImageRef, ...]]:
    words = [IMAGE_TAG if isinstance(p, ImageRef) else p.strip() for p in parts]
    return " ".join(w for w in words if w), tuple(p for p in parts if isinstance(p, ImageRef))


def parse_messages(messages: Any, *, answered: bool = False) -> Conversation:
    """OpenAI-style messages -> Conversation. The last message must be a user message unless `answered`
    (then it must be an assistant message: a finished conversation, e.g. for scoring with the answer given)."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise UserError("messages: expected a non-empty list of {role, content} objects")
    system = ""
    turns: list[ChatTurn] = []
    pending: list[str | ImageRef] | None = None  # parts of the user turn being collected
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise UserError(f"{where}: expected an object with 'role' and 'content', got {type(msg).__name__}")
        role = msg.get("role")
        if role not in ROLES:
            raise UserError(f"{where}.role: expected one of {', '.join(ROLES)}, got {role!r}")
        if "content" not in msg and role != "assistant":
            raise UserError(f"{where}.content: missing")
        parts = _parse_content(msg.get("content"), f"{where}.content", assistant=role == "assistant")
        if role in SYSTEM_ROLES:
            if i != 0:
                raise UserError(f"{where}.role: a {role} message may only come first")
            if any(isinstance(p, ImageRef) for p in parts):
                raise UserError(f"{where}.content: a {role} message may not hold images")
            system = _join(parts)[0]
        elif role == "user":
            pending = (pending or []) + parts
        else:
            if pending is None:
                raise UserError(f"{where}.role: an assistant message must follow a user message")
            if any(isinstance(p, ImageRef) for p in parts):
                raise UserError(f"{where}.content: images are only allowed in user messages")
            text, images = _join(pending)
            turns.append(ChatTurn(text, images, _join(parts)[0]))
            pending = None
    if pending is not None:
        if answered:
            raise UserError(f"messages[{len(messages) - 1}].role: expected the last message to be the assistant's")
        text, images = _join(pending)
        turns.append(ChatTurn(text, images, None))
    elif not answered:
        raise UserError(f"messages[{len(messages) - 1}].role: the last message must be a user message")
    if not turns:
        raise UserError("messages: no user message")
    if system:
        first = turns[0]
        turns[0] = ChatTurn(f"{system} {first.user}".strip(), first.images, first.assistant)
    return Conversation(tuple(turns))
