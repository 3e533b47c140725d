"""The one interface every model runtime offers the chat engine (`ChatBackend`), and the helpers they share.

A backend is stateless towards its callers: each call gets the whole `Conversation` (turns whose images are already
encoded handles from `encode_image`) and must give the same answer for the same conversation and settings. It may
keep caches (the GGUF runtime keeps its KV cache and reuses the common prefix). Backends are not thread-safe; the
engine runs one call at a time.

* `generate` -> the answer text, cut before the first stop string (the model's own + `settings.stop`), stripped;
* `stream` -> pieces of that same answer (their join equals `generate`'s result for the same seed); the
  generation stops early when `cancel` is set or the iterator is closed;
* `score` -> for each candidate answer to the last turn, the summed log-probability of its tokens (tokenized alone,
  as training tokenizes answers; no end symbol), each <= 0;
* `prompt_length` -> the positions the prompt takes (text tokens + image vectors), for the context check.

Two optional methods make batches cheaper; the engine falls back to the ones above when a backend lacks them:

* `encode_images(images)` -> one handle per image, in order, as `encode_image` gives them (the PyTorch backend runs
  the vision tower once over the stack);
* `generate_batch(conversations, settings)` -> one answer per conversation (each a list of EncodedTurn), in order;
  with greedy settings each the answer `generate` gives (the PyTorch backend: one left-padded `generate` over the
  batch; the GGUF runtime: one conversation after another, reusing its KV cache). The engine has already cut
  `settings.max_new_tokens` to the room every conversation of the batch leaves;
* `prefill_images(turns)` -> nothing; evaluates the prompt of `turns` up to its last image ahead of the question, so
  that a later call on the same conversation plus a question only evaluates the question (the GGUF runtime's KV
  cache; `ChatEngine.prepare`).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Iterator, Protocol, Sequence, runtime_checkable

from PIL import Image

from quantize.sampler import StopMatcher

from .messages import ChatTurn
from .settings import GenerationSettings


@dataclass(frozen=True)
class PromptInfo:
    """How the model writes a conversation (from its config or GGUF)."""

    template: str  # wraps each user turn; "{}" is the user text
    end_sym: str  # ends each answer
    stop_strings: tuple[str, ...]  # generation stops at these
    image_tokens: int  # vectors one image takes in the prompt
    image_size: int  # pixels per side the vision tower expects


@dataclass(frozen=True)
class EncodedTurn:
    """A ChatTurn with its images replaced by the backend's encoded handles."""

    user: str
    images: tuple[Any, ...]
    assistant: str | None


@runtime_checkable
class ChatBackend(Protocol):
    name: str  # e.g. "torch:cpu" or "gguf:llm-f16.gguf (ggml)"
    prompt: PromptInfo
    context_length: int

    def encode_image(self, image: Image.Image) -> Any:
        """RGB image -> an opaque handle the backend accepts in EncodedTurn.images (the engine caches it)."""
        ...

    def release_image(self, handle: Any) -> None:
        """The engine dropped `handle` from its cache; free what it holds."""
        ...

    def prompt_length(self, turns: Sequence[EncodedTurn]) -> int: ...

    def generate(self, turns: Sequence[EncodedTurn], settings: GenerationSettings) -> str: ...

    def stream(self, turns: Sequence[EncodedTurn], settings: GenerationSettings,
               cancel: threading.Event | None = None) -> Iterator[str]: ...

    def score(self, turns: Sequence[EncodedTurn], candidates: Sequence[str]) -> list[float]: ...


@runtime_checkable
class BatchingBackend(ChatBackend, Protocol):
    """A ChatBackend with the optional batch methods (see the module docstring)."""

    def encode_images(self, images: Sequence[Image.Image]) -> list[Any]: ...

    def generate_batch(self, conversations: Sequence[Sequence[EncodedTurn]],
                       settings: GenerationSettings) -> list[str]: ...


def encoded_turns(turns: Sequence[ChatTurn], handles: Sequence[Any]) -> list[EncodedTurn]:
    """Attach encoded image handles (in conversation order) to the turns."""
    out, k = [], 0
    for t in turns:
        out.append(EncodedTurn(t.user, tuple(handles[k:k + len(t.images)]), t.assistant))
        k += len(t.images)
    return out


class AnswerCutter:
    """Turns the growing raw text of a generation into the pieces of the final answer, for streaming.

    The answer is the raw text before the first stop string, stripped. While generating, text that could still be
    the start of a stop string and trailing whitespace are held back, so the pieces' join always equals the answer
    the non-streaming path returns."""

    def __init__(self, stops: Sequence[str]):
        self.matcher = StopMatcher(stops)
        self.shown = ""
        self.stopped = False

    def answer(self, raw: str) -> str:
        cut = self.matcher.find(raw)
        return (raw if cut < 0 else raw[:cut]).strip()

    def update(self, raw: str, final: bool = False) -> str:
        """The new piece for the raw text so far ("" if none); sets `stopped` once a stop string appeared."""
        cut = self.matcher.find(raw)
        if cut >= 0:
            raw, final, self.stopped = raw[:cut], True, True
        if not final:
            raw = raw[: self.matcher.safe_prefix_length(raw)].rstrip()
        visible = raw.strip()
        if not visible.startswith(self.shown):  # cannot happen for appended text; never emit a contradiction
            return ""
        piece, self.shown = visible[len(self.shown):], visible
        return piece
