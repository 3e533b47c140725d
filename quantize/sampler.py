"""Next-token choice from a logits vector: greedy or temperature + top-k + top-p (in transformers' order), with
repetition penalty; seeded.

Stop strings are matched on the decoded text (a stop string may span several tokens), see StopMatcher.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

from tinygpt.errors import UserError

from .cli_checks import check_finite


GREEDY_BELOW = 1e-5  # a temperature under this is greedy: dividing the logits by it overflows (inf, then NaN)
# the repetition penalty divides (or multiplies) logits: outside this range they overflow to inf (float32 logits on
# PyTorch: 1e-38 already; 1e-320 here in float64) and sampling fails on NaN probabilities
REPETITION_PENALTY_RANGE = (0.01, 100.0)


@dataclass
class SamplingParams:
    """temperature 0 (or under GREEDY_BELOW) means greedy. Defaults follow the original demo (top-p 0.9, repetition
    penalty 1.05). top_k 0: off (every token may be drawn), else only the k likeliest. seed None (or -1, as llama.cpp
    spells it): a fresh random seed."""

    temperature: float = 0.0
    top_p: float = 0.9
    top_k: int = 0
    repetition_penalty: float = 1.05
    max_new_tokens: int = 300
    seed: int | None = 0

    def validate(self) -> "SamplingParams":
        for flag, value in (("--temperature", self.temperature), ("--top-p", self.top_p),
                            ("--repetition-penalty", self.repetition_penalty)):
            check_finite(flag, value)
        if self.temperature < 0:
            raise UserError(f"--temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"--top-p must be in (0, 1], got {self.top_p}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise UserError(f"--top-k must be an integer >= 0 (0: off), got {self.top_k!r}")
        low, high = REPETITION_PENALTY_RANGE
        if not low <= self.repetition_penalty <= high:
            raise UserError(f"--repetition-penalty must be in {low} .. {high} (1: none), got {self.repetition_penalty}")
        if self.max_new_tokens < 1:
            raise UserError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        if self.seed == -1:
            self.seed = None
        if self.seed is not None and not (isinstance(self.seed, int) and 0 <= self.seed < 2**64):
            raise UserError(f"--seed must be an integer in 0 .. 2**64-1 (or -1: a fresh random seed), got {self.seed}")
        return self


class Sampler:
    """Stateful only through its random generator, so a fixed seed reproduces a whole conversation."""

    def __init__(self, params: SamplingParams):
        self.params = params.validate()
        self.rng = np.random.default_rng(params.seed)

    def __call__(self, logits: np.ndarray, previous: Sequence[int] = ()) -> int:
        logits = np.asarray(logits, dtype=np.float64).copy()
        p = self.params
        if p.repetition_penalty != 1.0 and len(previous):
            seen = np.unique(np.asarray(previous, dtype=np.int64))
            seen = seen[(seen >= 0) & (seen < logits.size)]
            vals = logits[seen]
            # CTRL / HF rule: divide positive logits, multiply negative ones
            logits[seen] = np.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        if p.temperature < GREEDY_BELOW:
            return int(np.argmax(logits))
        logits /= p.temperature
        if 0 < p.top_k < logits.size:  # the k likeliest (ties at the k-th all kept, as transformers' TopK does)
            logits[logits < np.partition(logits, -p.top_k)[-p.top_k]] = -np.inf
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        if p.top_p < 1.0:
            order = np.argsort(-probs, kind="stable")
            cumulative = np.cumsum(probs[order])
            keep = order[: int(np.searchsorted(cumulative, p.top_p) + 1)]  # smallest set reaching top_p
            mask = np.zeros_like(probs)
            mask[keep] = probs[keep]
            probs = mask / mask.sum()
        return int(self.rng.choice(probs.size, p=probs))


class StopMatcher:
    """Finds the first stop string in generated text and says how much text is safe to show while streaming."""

    def __init__(self, stop_strings: Iterable[str]):
        self.stops = [s for s in stop_strings if s]

    def find(self, text: str) -> int:
        """Index where the earliest stop string starts, or -1."""
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        return min(hits) if hits else -1

    def safe_prefix_length(self, text: str) -> int:
        """Length of text that cannot be the start of a stop string still being generated."""
        keep = len(text)
        for s in self.stops:
            for k in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:k]):
                    keep = min(keep, len(text) - k)
                    break
        return keep
