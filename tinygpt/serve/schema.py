"""The requests of `/v1/chat/completions` and `/v1/completions` (pydantic) and how they map onto the engine's
`GenerationSettings`.

Contract:
* the fields OpenAI's APIs define that this server honours: ``model``, ``stream``, ``stream_options.include_usage``,
  ``max_tokens``, ``temperature``, ``top_p``, ``stop`` (a string or a list), ``seed``, ``n`` (only 1); plus
  ``repetition_penalty`` and ``top_k`` (extensions, vLLM's and llama.cpp's names; ``top_k`` 0 or -1 is off); chat
  adds ``messages`` and ``max_completion_tokens`` (which wins over ``max_tokens``), text completion ``prompt`` (a
  string, or a list holding exactly one string);
* a wrong type or a value out of range is a validation error (a 400 naming the field, tinygpt.serve.errors); the
  types are strict: ``"10"`` or ``true`` is not an integer, ``"yes"`` is not a boolean, ``Infinity`` / ``NaN`` are
  not numbers (what the `openai` client sends, ints for floats and null for what is optional, is accepted);
* ``stop``, as OpenAI's: at most `MAX_STOP` strings of 1 to `MAX_STOP_CHARS` characters (a long or numerous stop
  list makes every generated token slow to check); ``seed`` is checked by GenerationSettings (0 .. 2**64 - 1);
  ``stop`` strings and the text-completion ``prompt`` holding an unpaired UTF-16 surrogate (``"\\ud83d"``, valid JSON
  that no tokenizer takes) are a 400 naming the field, before the queue (message texts: parse_messages);
* fields that would change what an answer means and that this server cannot do are refused with a 400, code
  ``unsupported_parameter``, naming the field (`check_supported`, one check for both endpoints): ``tools``,
  ``functions``, ``logprobs``, ``top_logprobs``, a non-empty ``logit_bias``, a ``tool_choice`` other than "none" /
  "auto" (there are no tools), ``modalities`` other than ["text"], ``audio``, ``best_of`` > 1, ``echo: true``, a
  non-text ``response_format``, ``n`` > 1 (code none); text completion also ``suffix``; ``stream_options`` without
  ``stream: true`` is a 400 too (as OpenAI's); other OpenAI fields (``user``, ``presence_penalty``,
  ``frequency_penalty``, ``metadata``...) are accepted and ignored;
* ``messages`` is checked by the chat engine (tinygpt.chat.parse_messages), which names the field at fault;
* settings the request leaves out come from the launch config's ``generation`` section, except ``seed``: a sampled
  request (temperature > 0) without one gets a fresh seed (`fresh_seed`, below 2**53 so that any JSON client can
  send it back exactly), so that it samples afresh as OpenAI's API does; the server reports it (``x-tinygpt-seed``).
"""

from __future__ import annotations

import secrets
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

from ..chat.messages import check_unicode
from ..chat.settings import MAX_REPETITION_PENALTY, MIN_REPETITION_PENALTY, GenerationSettings
from ..errors import UserError
from .errors import APIError

FRESH_SEED_BITS = 53  # a drawn seed is exact as a JSON number in every client (JavaScript's doubles included)
MAX_STOP = 4  # stop strings per request (OpenAI's limit)
MAX_STOP_CHARS = 64  # characters per stop string


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool = Field(False, strict=True)


class _Request(BaseModel):
    """What both endpoints' requests share."""

    model_config = ConfigDict(extra="allow")
    refused: ClassVar[tuple[str, ...]] = ("tools", "functions", "logprobs", "top_logprobs")  # when truthy

    model: str
    stream: bool | None = Field(False, strict=True)  # null is accepted (some clients send it) and means false
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1, strict=True)
    temperature: float | None = Field(None, ge=0, strict=True, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0, le=1, strict=True, allow_inf_nan=False)
    top_k: int | None = Field(None, ge=-1, strict=True)  # an extension (vLLM's, llama.cpp's): 0 or -1 off
    stop: Any = None  # a string or a list of strings (checked in settings(): one message for both shapes)
    seed: int | None = Field(None, strict=True)  # its range: GenerationSettings (one check for every front end)
    n: int | None = Field(1, strict=True)
    repetition_penalty: float | None = Field(None, ge=MIN_REPETITION_PENALTY, le=MAX_REPETITION_PENALTY, strict=True,
                                             allow_inf_nan=False)

    def check_supported(self) -> None:
        if self.n not in (1, None):
            raise APIError(400, f"n: this server returns one choice per request (n=1), got {self.n}", "n")
        extra = self.model_extra or {}
        for key in self.refused:
            if extra.get(key):
                raise APIError(400, f"{key}: not supported by this server", key, "unsupported_parameter")
        refusal = _unsupported(extra)
        if refusal:
            key, why = refusal
            shown = repr(extra[key])
            shown = shown if len(shown) <= 60 else shown[:57] + "..."
            raise APIError(400, f"{key}: {why}, got {shown}", key, "unsupported_parameter")
        if self.stream_options is not None and not self.stream:
            raise APIError(400, "stream_options: only allowed with stream: true", "stream_options", "invalid_request")

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def budget(self) -> int | None:
        """The tokens the request asks for (None: the config's)."""
        return self.max_tokens

    def settings(self, defaults: GenerationSettings) -> GenerationSettings:
        """`defaults` with what the request sets (validated again by GenerationSettings: a UserError is a 400); a
        fresh seed when it samples without one."""
        changes: dict[str, Any] = {}
        max_new = self.budget()
        if max_new is not None:
            changes["max_new_tokens"] = max_new
        for name in ("temperature", "top_p", "seed", "repetition_penalty"):
            if getattr(self, name) is not None:
                changes[name] = getattr(self, name)
        if self.top_k is not None:
            changes["top_k"] = max(0, self.top_k)  # vLLM's -1 is off, as 0 is
        if self.stop is not None:
            changes["stop"] = self._stop()
        settings = defaults.with_(**changes)
        if self.seed is None and not settings.greedy:
            settings = settings.with_(seed=fresh_seed())
        return settings

    def _stop(self) -> tuple[str, ...]:
        stop = [self.stop] if isinstance(self.stop, str) else self.stop
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise APIError(400, f"stop: expected a string or a list of strings, got {self.stop!r}", "stop")
        if len(stop) > MAX_STOP:
            raise APIError(400, f"stop: at most {MAX_STOP} stop strings, got {len(stop)}", "stop")
        too_long = [s for s in stop if len(s) > MAX_STOP_CHARS]
        if too_long:
            raise APIError(400, f"stop: each stop string may hold at most {MAX_STOP_CHARS} characters, got one of "
                                f"{len(too_long[0])}", "stop")
        for i, text in enumerate(stop):
            _check_unicode(text, f"stop[{i}]" if isinstance(self.stop, list) else "stop", "stop")
        return tuple(stop)  # empty strings: GenerationSettings refuses them ("stop: expected non-empty strings")


class ChatCompletionRequest(_Request):
    messages: list[Any]
    max_completion_tokens: int | None = Field(None, ge=1, strict=True)

    def budget(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_Request):
    refused: ClassVar[tuple[str, ...]] = _Request.refused + ("suffix",)

    prompt: Any  # a string or a list holding one string: `text()` (one message for every other shape)

    def check_supported(self) -> None:
        """As chat's, and ``logprobs`` refused whenever it is set: here it is a count, and 0 asks for the chosen
        tokens' log-probabilities too."""
        if (self.model_extra or {}).get("logprobs") is not None:
            raise APIError(400, "logprobs: not supported by this server", "logprobs", "unsupported_parameter")
        super().check_supported()

    def text(self) -> str:
        """The prompt; a 400 naming ``prompt`` unless it is a string or a list holding exactly one string."""
        items = self.prompt if isinstance(self.prompt, list) else [self.prompt]
        if len(items) == 1 and isinstance(items[0], str):
            return _check_unicode(items[0], "prompt" if items is not self.prompt else "prompt[0]", "prompt")
        if not isinstance(self.prompt, list):
            why = json_kind(self.prompt)
        elif not items:
            why = "an empty list"
        elif all(isinstance(p, str) for p in items):
            why = f"{len(items)} prompts (this server answers one prompt per request)"
        elif all(isinstance(p, (int, list)) and not isinstance(p, bool) for p in items):
            why = "token ids (send the text instead)"
        else:
            why = "a list holding " + " and ".join(sorted({json_kind(p) for p in items}))
        raise APIError(400, f"prompt: expected a string or a list holding one string, got {why}", "prompt",
                       "invalid_request")


def _check_unicode(text: str, where: str, param: str) -> str:
    """`text`, or a 400 naming the field when it holds an unpaired UTF-16 surrogate (``"\\ud83d"``: valid JSON, but
    no tokenizer takes it), refused here, before the queue."""
    try:
        return check_unicode(text, where)
    except UserError as exc:
        raise APIError(400, str(exc), param, "invalid_request") from None


def json_kind(value: Any) -> str:
    """What a JSON value is, in words ("an array", "null")."""
    kinds = {list: "an array", dict: "an object", str: "a string", bool: "a boolean", int: "a number",
             float: "a number", type(None): "null"}
    return kinds.get(type(value), type(value).__name__)


def fresh_seed() -> int:
    return secrets.randbits(FRESH_SEED_BITS)


def _unsupported(extra: dict[str, Any]) -> tuple[str, str] | None:
    """(field, why) of the first field in `extra` that asks for what this server cannot do, or None."""
    response_format = extra.get("response_format")
    if response_format and (not isinstance(response_format, dict) or response_format.get("type") != "text"):
        return "response_format", "only plain text answers are supported"
    if extra.get("logit_bias"):
        return "logit_bias", "not supported by this server (send {} or leave it out)"
    if extra.get("tool_choice") not in (None, "none", "auto"):
        return "tool_choice", "this server has no tools; only 'none' or 'auto' are accepted"
    modalities = extra.get("modalities")
    if modalities is not None and modalities != ["text"] and modalities != []:
        return "modalities", "this server answers with text only (['text'])"
    if extra.get("audio") is not None:
        return "audio", "this server answers with text only"
    if extra.get("best_of") not in (None, 1):
        return "best_of", "this server returns the one answer it generates (best_of 1)"
    if extra.get("echo") not in (None, False):
        return "echo", "not supported by this server"
    return None
