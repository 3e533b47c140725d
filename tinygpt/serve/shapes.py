"""The JSON objects the server answers with, in OpenAI's shapes, plus the boxes extension.

* `completion`: a ``chat.completion`` (one choice; ``message`` = {role, content, boxes}; ``finish_reason`` "stop" or
  "length"; ``usage`` when known);
* `chunk`: a ``chat.completion.chunk`` of a stream; the first carries ``delta.role``, the middle ones
  ``delta.content``, the last one ``finish_reason`` and ``delta.boxes``; with ``stream_options.include_usage`` each of
  them has ``"usage": null`` (as OpenAI's) and one more chunk has empty ``choices`` and the ``usage``;
* `boxes_json`: the boxes the answer names (``<p>phrase</p> {<x1><y1><x2><y2>}`` on the 0-100 grid) as
  ``[{"phrase": str | None, "box": [x1, y1, x2, y2]}]`` in pixels of the conversation's last image
  (tinygpt.chat.answer_boxes); ``[]`` when the answer has none or the conversation has no image;
* `TextReply`: ``/v1/completions``' objects: a ``text_completion`` (``choices[0].text``, ``finish_reason``,
  ``usage``), and in a stream ``text_completion`` objects whose choices carry the pieces (the last one ``"text": ""``
  and the ``finish_reason``), the usage chunk as chat's;
* both replies answer the same calls (tinygpt.serve.respond): `whole` (the JSON answer), `opening` (the chunks
  before the first piece), `piece`, `closing` (the chunk after the last piece) and `usage_chunk`;
* `models`: the ``/v1/models`` list (one model);
* `backend_kind`: what ``/health`` says of the backend: its kind and device (``torch:cpu``, ``gguf``), never the
  model's location on disk (the start-up log line has it).
"""

from __future__ import annotations

import re
import time
import uuid
from dataclasses import dataclass, field

from ..chat.boxes import answer_boxes
from .usage import Usage


def boxes_json(answer: str, sizes: list[tuple[int, int]]) -> list[dict]:
    if not sizes:
        return []
    width, height = sizes[-1]
    return [{"phrase": phrase, "box": [round(v, 2) for v in box]}
            for phrase, box in answer_boxes(answer, width, height)]


@dataclass(frozen=True)
class Reply:
    """The identity every object of one chat answer shares (`sizes`: the conversation's images, for the boxes)."""

    model: str
    include_usage: bool = False  # a stream asked for a usage chunk: every other chunk says "usage": null
    sizes: tuple[tuple[int, int], ...] = ()
    id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    created: int = field(default_factory=lambda: int(time.time()))

    def whole(self, text: str, finish_reason: str, usage: Usage | None) -> dict:
        return self.completion(text, finish_reason, boxes_json(text, list(self.sizes)), usage)

    def opening(self) -> list[dict]:
        return [self.chunk({"role": "assistant", "content": ""})]

    def piece(self, text: str) -> dict:
        return self.chunk({"content": text})

    def closing(self, text: str, finish_reason: str) -> dict:
        return self.chunk({"boxes": boxes_json(text, list(self.sizes))}, finish_reason)

    def _head(self, kind: str) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model,
                "system_fingerprint": None}

    def completion(self, text: str, finish_reason: str, boxes: list[dict], usage: Usage | None) -> dict:
        body = self._head("chat.completion")
        body["choices"] = [{"index": 0, "message": {"role": "assistant", "content": text, "boxes": boxes},
                            "logprobs": None, "finish_reason": finish_reason}]
        if usage is not None:
            body["usage"] = usage.as_json()
        return body

    def chunk(self, delta: dict, finish_reason: str | None = None) -> dict:
        body = self._head("chat.completion.chunk")
        body["choices"] = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]
        if self.include_usage:
            body["usage"] = None
        return body

    def usage_chunk(self, usage: Usage | None) -> dict:
        body = self._head("chat.completion.chunk")
        body["choices"] = []
        body["usage"] = usage.as_json() if usage is not None else None
        return body


@dataclass(frozen=True)
class TextReply:
    """The identity every object of one text completion shares."""

    model: str
    include_usage: bool = False  # as Reply's
    id: str = field(default_factory=lambda: f"cmpl-{uuid.uuid4().hex}")
    created: int = field(default_factory=lambda: int(time.time()))

    def _body(self, choices: list[dict]) -> dict:
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "system_fingerprint": None, "choices": choices}

    def _chunk(self, text: str, finish_reason: str | None) -> dict:
        body = self._body([{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}])
        if self.include_usage:
            body["usage"] = None
        return body

    def whole(self, text: str, finish_reason: str, usage: Usage | None) -> dict:
        body = self._body([{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}])
        if usage is not None:
            body["usage"] = usage.as_json()
        return body

    def opening(self) -> list[dict]:
        return []

    def piece(self, text: str) -> dict:
        return self._chunk(text, None)

    def closing(self, text: str, finish_reason: str) -> dict:
        return self._chunk("", finish_reason)

    def usage_chunk(self, usage: Usage | None) -> dict:
        body = self._body([])
        body["usage"] = usage.as_json() if usage is not None else None
        return body


def models(name: str, created: int) -> dict:
    return {"object": "list", "data": [model(name, created)]}


def model(name: str, created: int) -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": "tinygpt"}


_DEVICE_NAME = re.compile(r"torch(?::\w+)*")  # TorchBackend's names: torch:cpu, torch:cuda:int8 (no path in them)


def backend_kind(name: str) -> str:
    """``torch:cpu`` and ``torch:cuda:int8`` as they are; any other name up to its first colon: ``gguf:/models/x
    (GgmlLLM)`` -> ``gguf``."""
    return name if _DEVICE_NAME.fullmatch(name) else name.split(":", 1)[0]
