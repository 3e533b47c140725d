"""What the server tests share (tests/test_server.py, tests/test_server_refusals.py): the limits and settings the
app is served with, request builders (images as data: URIs, user messages), clients, and `Wrapped`, an engine with
some entry points replaced. Importing it skips the importing module when the `openai` package is absent."""

from __future__ import annotations

import base64
import io
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tinygpt.chat import ChatEngine, GenerationSettings
from tinygpt.chat.launch import Limits

openai = pytest.importorskip("openai")

REPO = Path(__file__).resolve().parents[1]
NAME = "tiny"
LIMITS = Limits(max_images=4, max_image_pixels=16_000_000, max_upload_bytes=2_000_000, queue_size=4)
SETTINGS = GenerationSettings(max_new_tokens=12)


def png(seed: int, size=(90, 130)) -> Image.Image:
    return Image.fromarray((np.random.default_rng(seed).random((*size, 3)) * 255).astype(np.uint8))


def data_uri(image: Image.Image | bytes) -> str:
    if isinstance(image, Image.Image):
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        image = buf.getvalue()
    return "data:image/png;base64," + base64.b64encode(image).decode()


def blank_png(width: int, height: int) -> bytes:
    """A real, tiny PNG of a huge 1-bit image (50 megapixels fit in a few kB)."""
    buf = io.BytesIO()
    Image.new("1", (width, height)).save(buf, format="PNG")
    return buf.getvalue()


def image_url(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def user(*parts) -> dict:
    """Strings are text parts, PIL images data-URI image parts, dicts parts as they are (`image_url`)."""
    return {"role": "user", "content": [{"type": "text", "text": p} if isinstance(p, str) else
                                        image_url(data_uri(p)) if isinstance(p, Image.Image) else p for p in parts]}


def gguf_engine(chat_model) -> ChatEngine:
    """The engine the tests serve: conftest's tiny model through its F16 GGUF export."""
    from tinygpt.chat.gguf_backend import GGUFBackend

    return ChatEngine(GGUFBackend.load(chat_model[1], vision_int8=False), SETTINGS)


def openai_client(server, key: str = "unused") -> "openai.OpenAI":
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=60)


def post(server, body, **kw) -> httpx.Response:
    if not isinstance(body, (dict, list)):  # raw bytes, or a generator of them (sent without a Content-Length)
        return httpx.post(server.url + "/v1/chat/completions", content=body, timeout=60,
                          headers={"content-type": "application/json"}, **kw)
    return httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60, **kw)


class Wrapped:
    """An engine with some entry points replaced (slow, canned or failing answers); the rest is the real one."""

    def __init__(self, engine, chat=None, stream=None):
        self._engine, self._chat, self._stream = engine, chat, stream

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def chat(self, messages, settings=None, cancel=None):  # the server passes `cancel` (beam search only)
        if self._chat is None:
            return self._engine.chat(messages, settings, cancel)
        return self._chat(messages, settings) if cancel is None else self._chat(messages, settings, cancel)

    def stream(self, messages, settings=None, cancel=None):
        return (self._stream or self._engine.stream)(messages, settings, cancel)


def stream_text(client, messages, **kw) -> tuple[str, list]:
    chunks = list(client.chat.completions.create(model=NAME, messages=messages, stream=True, **kw))
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), chunks


def wait_for(condition, seconds: float = 10) -> bool:
    """Poll ``condition`` until it holds (True) or ``seconds`` pass (False)."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True
