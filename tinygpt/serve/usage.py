"""Token counts and the finish reason of one answer, for the response's ``usage`` and ``finish_reason``.

Both backends keep a `tinygpt.chat.backend.GenerationStats` of the generation that just ended (``last_stats``): the
positions of its prompt (image vectors included), the ids it generated (the end token included) and why it stopped.
The GGUF backend takes them from the runtime (`quantize.session.ChatSession.last_stats`), the PyTorch backend from
the ids `generate` returned or streamed. Nothing is re-tokenized: an answer of 1008 ``<`` tokens counts 1008, though
its text re-tokenizes to 504 ``<<``. ``finish_reason`` is "length" when the token budget or the context ended the
answer, else "stop". A backend without ``last_stats``: no usage (None) and finish_reason "stop".
Call it on the worker thread right after the generation, before the engine runs anything else.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..chat.backend import GenerationStats
from ..chat.messages import Conversation
from ..chat.settings import GenerationSettings


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    def as_json(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


def measure(engine, conversation: Conversation | str, answer: str,
            settings: GenerationSettings) -> tuple[Usage | None, str]:
    """(usage or None, finish reason "stop" | "length") of the generation that just answered `conversation` (or
    continued a raw prompt; `conversation`, `answer` and `settings` are the call's; the counts come from the
    backend's `last_stats`)."""
    stats = getattr(engine.backend, "last_stats", None)
    if not isinstance(stats, GenerationStats):
        return None, "stop"
    return Usage(stats.prompt_tokens, stats.generated_tokens), stats.finish_reason
