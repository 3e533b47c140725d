"""Generation settings shared by every backend: one frozen dataclass, validated once.

Defaults are greedy (temperature 0), so an answer is reproducible; a temperature below `MIN_TEMPERATURE` (1e-5) is
greedy too (it is stored as 0): dividing the logits by a tinier one overflows them (1e-40 on PyTorch, 1e-310 in
the GGUF runtime), and sampling that cold is greedy in effect; the original demo sampled (top-p 0.9,
temperature 0.6-1.0, repetition penalty 1.05), which users can ask for. `stop` adds to the model's own stop strings
(read from its config or GGUF). `seed` makes sampling repeat: each call reseeds; it is an integer in
0 .. 2**64 - 1 (what torch.manual_seed and numpy's generators both take) or None. `num_beams` > 1 is PyTorch only.
The repetition penalty is applied over the generated tokens by the PyTorch backend (transformers' rule for
`inputs_embeds` prompts) and over the conversation's text tokens plus the generated ones by the GGUF runtime, so
the two agree only at 1.0 (the default); it lies in 0.01 .. 100 (further out the logits overflow and sampling fails).
`top_k` 0 (the default) is off on both backends: transformers' own default of 50 is not applied.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from quantize.sampler import GREEDY_BELOW as MIN_TEMPERATURE  # below it (and above 0): greedy, stored as 0.0
from quantize.sampler import REPETITION_PENALTY_RANGE

from ..errors import UserError
from .messages import check_unicode

MAX_SEED = 2**64 - 1
# outside it the logits overflow and sampling fails on NaN probabilities (the runtime sampler's range)
MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY = REPETITION_PENALTY_RANGE


@dataclass(frozen=True)
class GenerationSettings:
    max_new_tokens: int = 300
    temperature: float = 0.0
    top_p: float = 0.9
    top_k: int = 0  # 0: off; k: sample among the k likeliest tokens only (with top_p after it, transformers' order)
    num_beams: int = 1
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = 0

    def __post_init__(self):
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop))
        if isinstance(self.temperature, (int, float)) and 0 < self.temperature < MIN_TEMPERATURE:
            object.__setattr__(self, "temperature", 0.0)  # the logits / temperature would overflow: greedy
        self.validate()

    def validate(self) -> "GenerationSettings":
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise UserError(f"max_new_tokens: must be an integer >= 1, got {self.max_new_tokens!r}")
        if self.temperature < 0:
            raise UserError(f"temperature: must be >= 0, got {self.temperature}")
        if not math.isfinite(self.temperature):
            raise UserError(f"temperature: must be a finite number, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"top_p: must be in (0, 1], got {self.top_p}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise UserError(f"top_k: must be an integer >= 0 (0: off), got {self.top_k!r}")
        if not isinstance(self.num_beams, int) or self.num_beams < 1:
            raise UserError(f"num_beams: must be an integer >= 1, got {self.num_beams!r}")
        if not MIN_REPETITION_PENALTY <= self.repetition_penalty <= MAX_REPETITION_PENALTY:
            raise UserError(f"repetition_penalty: must be in {MIN_REPETITION_PENALTY} .. {MAX_REPETITION_PENALTY} "
                            f"(1: none), got {self.repetition_penalty}")
        if not all(isinstance(s, str) and s for s in self.stop):
            raise UserError(f"stop: expected non-empty strings, got {list(self.stop)!r}")
        for i, text in enumerate(self.stop):
            check_unicode(text, f"stop[{i}]")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not 0 <= self.seed <= MAX_SEED):
            raise UserError(f"seed: must be an integer in 0 .. {MAX_SEED} (2**64 - 1) or null, got {self.seed!r}")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def with_(self, **changes) -> "GenerationSettings":
        """A copy with some fields changed (validated)."""
        return replace(self, **changes)
