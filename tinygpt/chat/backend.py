"""The one interface every model runtime offers the chat engine (`ChatBackend`), and the helpers they share.

A backend is stateless towards its callers: each call gets the whole `Conversation` (turns whose images are already
encoded handles from `encode_image`) and must give the same answer for the same conversation and settings. It may
keep caches (the GGUF runtime keeps its KV cache and reuses the common prefix). Backends are not thread-safe; the
engine runs one call at a time.

* `generate` -> the answer text, cut before the first stop string (the model's own + `settings.stop`), with its
  leading whitespace dropped; the whitespace before the model's own end (its stop strings, its end symbol, the end
  token, the token budget) is dropped too, but a stop string of the caller's (`settings.stop`) cuts exactly: the
  answer is all the text before it (as OpenAI's API does; `AnswerCutter`); with `cancel` (a threading.Event, passed
  only when the caller has one: the server's beam search) the generation stops at the next step once it is set;
* `stream` -> pieces of that same answer, token by token (their join equals `generate`'s result for the same seed);
  the generation stops early when `cancel` is set or the iterator is closed;
* `score` -> for each candidate answer to the last turn, the summed log-probability of its tokens (tokenized alone,
  as training tokenizes answers; no end symbol), each <= 0;
* `prompt_length` -> the positions the prompt takes (text tokens + image vectors), for the context check.

Optional: `last_stats`, a `GenerationStats` of the last generation (of a batch: its last conversation), read by
the server for `usage` and `finish_reason` (tinygpt.serve.usage); None before the first.

Optional methods that make batches cheaper; the engine falls back to the ones above when a backend lacks them:

* `encode_images(images)` -> one handle per image, in order, as `encode_image` gives them (the PyTorch backend runs
  the vision tower once over the stack);
* `generate_batch(conversations, settings)` -> one answer per conversation (each a list of EncodedTurn), in order;
  with greedy settings each the answer `generate` gives (the PyTorch backend: one left-padded `generate` over the
  batch; the GGUF runtime: one conversation after another, reusing its KV cache). The engine has already cut
  `settings.max_new_tokens` to the room every conversation of the batch leaves;
* `prefill_images(turns)` -> nothing; evaluates the prompt of `turns` up to its last image ahead of the question, so
  that a later call on the same conversation plus a question only evaluates the question (the GGUF runtime's KV
  cache; `ChatEngine.prepare`).

Optional, for a raw prompt continued as it is (`ChatEngine.complete`, the server's /v1/completions; without them
that is a UserError): `text_length(prompt)`, `generate_text(prompt, settings, cancel=None)` and
`stream_text(prompt, settings, cancel=None)`, the counterparts of `prompt_length`, `generate` and `stream`. The
prompt is laid out as a conversation starts, [BOS] then its tokens, without the template; text only. The generation
stops at the end token, the budget, the caller's stop strings or `cancel` (the model's own stop strings belong to
its chat template), and the text comes back exactly as generated (`AnswerCutter(..., continuation=True)`). Both
backends have them.
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

    def generate(self, turns: Sequence[EncodedTurn], settings: GenerationSettings,
                 cancel: threading.Event | None = None) -> str: ...

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


@dataclass(frozen=True)
class GenerationStats:
    """What one generation did: positions in its prompt (image vectors included), tokens generated (the end token
    included) and why it stopped: "eos", "stop string", "max_new_tokens", "context full" or "cancelled".
    "context full": the answer ran until the prompt and it filled the context window (also when the caller's budget
    ended at that same position, and whoever cut the budget to the room left: ChatEngine does), so the conversation
    cannot go on; "max_new_tokens": the caller's budget ended it with room left in the context."""

    prompt_tokens: int
    generated_tokens: int
    stopped_by: str

    @property
    def finish_reason(self) -> str:
        """OpenAI's finish_reason: "length" when the token budget or the context ended the answer, else "stop"."""
        return "length" if self.stopped_by in ("max_new_tokens", "context full") else "stop"


class AnswerCutter:
    """Turns the raw text of a generation into the final answer (`answer`) or, while it grows, into the pieces of
    that answer (`update`, for streaming).

    The answer is the raw text before the first stop string (the model's own `prompt.stop_strings` + the caller's
    `stops`) without its leading whitespace. The whitespace before the model's own end (one of its stop strings or
    its end symbol, or no stop string at all: the end token or the token budget) is the model's formatting and is
    dropped too; a stop string of the caller's cuts exactly (OpenAI's `stop`), so the text before it is kept whole.
    While generating, text that could still be the start of a stop string and trailing whitespace are held back, so
    the pieces' join always equals `answer` of the whole raw text.

    `continuation`: the text continues a raw prompt (`ChatEngine.complete`): the model's own stop strings and end
    symbol belong to its chat template and do not apply, only the caller's cut, and no whitespace is dropped."""

    def __init__(self, prompt: PromptInfo, stops: Sequence[str] = (), continuation: bool = False):
        own = () if continuation else prompt.stop_strings
        self.matcher = StopMatcher([*own, *stops])
        self.own = () if continuation else tuple(s for s in (*own, prompt.end_sym) if s)
        self.continuation = continuation
        self.shown = ""
        self.stopped = False

    def _cut(self, raw: str) -> tuple[str, bool, bool]:
        """(text before the first stop string, whether one was found, whether it was the caller's)."""
        cut = self.matcher.find(raw)
        if cut < 0:
            return raw, False, False
        return raw[:cut], True, not any(raw.startswith(s, cut) for s in self.own)

    def _visible(self, text: str, exact: bool) -> str:
        return text if self.continuation else text.lstrip() if exact else text.strip()

    def answer(self, raw: str) -> str:
        text, _, exact = self._cut(raw)
        return self._visible(text, exact)

    def update(self, raw: str, final: bool = False) -> str:
        """The new piece for the raw text so far ("" if none); sets `stopped` once a stop string appeared."""
        raw, found, exact = self._cut(raw)
        if found:
            final, self.stopped = True, True
        if not final:
            raw = raw[: self.matcher.safe_prefix_length(raw)]
            raw = raw if self.continuation else raw.rstrip()
        visible = self._visible(raw, exact)
        if not visible.startswith(self.shown):  # cannot happen for appended text; never emit a contradiction
            return ""
        piece, self.shown = visible[len(self.shown):], visible
        return piece
