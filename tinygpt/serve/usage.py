"""Token counts and the finish reason of one answer, for the response's ``usage`` and ``finish_reason``.

* GGUF backend: exact, from the runtime's own statistics of the call that just ended
  (`quantize.session.ChatSession.last_stats`: positions in the prompt, tokens generated, why it stopped);
* PyTorch backend: counted with the model's tokenizer (the answer re-tokenized; the prompt laid out as
  tinygpt.model.sequence lays it out: BOS, the wrapped user text, the image vectors, answers with their end symbol),
  so a count may differ by a token or two from what the model saw; ``finish_reason`` is "length" when the answer's
  count reaches the token budget;
* another backend without a tokenizer: no usage (None) and finish_reason "stop".
Call it on the worker thread right after the generation, before the engine runs anything else.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..chat.gguf_backend import GGUFBackend
from ..chat.messages import Conversation
from ..chat.settings import GenerationSettings
from ..tasks import IMAGE_PLACEHOLDER


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    def as_json(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


def _gguf(backend: GGUFBackend) -> tuple[Usage, str]:
    stats = backend.session.last_stats
    usage = Usage(stats.reused_tokens + stats.prompt_tokens, stats.generated_tokens)
    return usage, "length" if stats.stopped_by in ("max_new_tokens", "context full") else "stop"


def _counted(engine, tokenizer, conversation: Conversation, answer: str, settings: GenerationSettings):
    prompt = engine.backend.prompt

    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else 0

    n_prompt = 0
    for turn in conversation.turns:
        pieces = prompt.template.replace("{}", turn.user).split(IMAGE_PLACEHOLDER)
        n_prompt += 1 + sum(count(p) for p in pieces) + prompt.image_tokens * (len(pieces) - 1)
        if turn.assistant is not None:
            n_prompt += count(turn.assistant + prompt.end_sym)
    n_answer = count(answer)
    budget = min(settings.max_new_tokens, engine.context_length - n_prompt)
    return Usage(n_prompt, n_answer), "length" if n_answer >= budget else "stop"


def measure(engine, conversation: Conversation, answer: str, settings: GenerationSettings) -> tuple[Usage | None, str]:
    """(usage or None, finish reason "stop" | "length") of the generation that just answered `conversation`."""
    backend = engine.backend
    if isinstance(backend, GGUFBackend):
        return _gguf(backend)
    tokenizer = getattr(backend, "tokenizer", None)
    if tokenizer is None:
        return None, "stop"
    return _counted(engine, tokenizer, conversation, answer, settings)
