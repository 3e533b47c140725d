"""The part of transformers' KV-cache contract that the modified Phi relies on, owned here in one place.

transformers renames and reshapes its generation internals from release to release: 5.23 hands the cache to
``forward`` as ``past_key_values`` and reads it back from ``outputs.past_key_values``; 5.25 hands it over as
``cache`` and reads ``outputs["cache"]`` (the old name still arrives, with a deprecation warning, but a model that
keeps reading only the old keyword silently decodes every step without its past). So the model

* takes the cache under whichever name the installed release uses (:func:`take_cache`);
* touches it through two methods only, ``update(k, v, layer_idx)`` and ``get_seq_length()``, which every 5.x
  ``Cache`` has (:func:`cache_update`, :func:`cache_length`); when no cache is handed in it makes its own
  :class:`KVCache`, which has just these two (and ``reorder_cache`` for beams);
* returns it under both names (:class:`DecoderOutput`, :class:`CausalLMOutput`), so every release finds it.

``tests/test_phi.py`` checks greedy, sampling and beam decoding with and without the cache against a full forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers.utils import ModelOutput

CACHE_NAMES = ("cache", "past_key_values", "cache_params")


class KVCache:
    """Keys and values per layer, concatenated along the sequence: the cache a caller gets when it brings none."""

    def __init__(self) -> None:
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.image_keys: torch.Tensor | None = None  # [B, T] which cached positions are image tokens (mmca only)

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        if layer_idx == len(self.keys):
            self.keys.append(key)
            self.values.append(value)
        else:
            self.keys[layer_idx] = torch.cat([self.keys[layer_idx], key], dim=-2)
            self.values[layer_idx] = torch.cat([self.values[layer_idx], value], dim=-2)
        return self.keys[layer_idx], self.values[layer_idx]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.keys[layer_idx].shape[-2] if layer_idx < len(self.keys) else 0

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Keep the rows of the surviving beams (beam search)."""
        self.keys = [k.index_select(0, beam_idx.to(k.device)) for k in self.keys]
        self.values = [v.index_select(0, beam_idx.to(v.device)) for v in self.values]
        if self.image_keys is not None:
            self.image_keys = self.image_keys.index_select(0, beam_idx.to(self.image_keys.device))


def take_cache(explicit: Any, kwargs: dict) -> Any:
    """The cache object the caller passed, under any of the names transformers has used; None when there is none.

    Two different objects under two names is a caller error (which one would be updated?)."""
    found = [kwargs.pop(name) for name in CACHE_NAMES if kwargs.get(name) is not None]
    if explicit is not None:
        found.insert(0, explicit)
    distinct = {id(c): c for c in found}
    if len(distinct) > 1:
        raise ValueError(f"two different KV caches were passed (as {', '.join(CACHE_NAMES)}); pass one")
    return found[0] if found else None


def cache_length(cache: Any) -> int:
    """Tokens already held by the cache (0 for none)."""
    return int(cache.get_seq_length()) if cache is not None else 0


def cache_update(cache: Any, key: torch.Tensor, value: torch.Tensor, layer_idx: int):
    """Append this step's keys/values for one layer; returns the keys/values of the whole sequence so far."""
    return cache.update(key, value, layer_idx)


def cache_image_keys(cache: Any, new: torch.Tensor, past: int) -> torch.Tensor:
    """Which of all keys (``past`` cached, then ``new`` [B, S]) are image tokens, [B, past + S] boolean; the cache
    remembers it for the next step (mmca). It is kept as an attribute, ``image_keys``, so transformers' own cache
    classes carry it too; cached positions it does not cover (a cache filled without it) count as text."""
    new = new.bool()
    if cache is None:
        return new
    old = getattr(cache, "image_keys", None)
    if old is None or old.shape[0] != new.shape[0]:
        old = new.new_zeros((new.shape[0], 0))
    old = old[:, :past].to(new.device)
    if old.shape[1] < past:
        old = torch.cat([old, new.new_zeros((new.shape[0], past - old.shape[1]))], dim=1)
    cache.image_keys = torch.cat([old, new], dim=1)
    return cache.image_keys


# Both names are declared fields, so ModelOutput's own renaming (5.25+) leaves them alone and `"cache" in outputs`,
# `outputs["past_key_values"]` and attribute access all work on every release.
@dataclass
class DecoderOutput(ModelOutput):
    last_hidden_state: torch.Tensor | None = None
    cache: Any = None
    past_key_values: Any = None


@dataclass
class CausalLMOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    cache: Any = None
    past_key_values: Any = None


def with_cache(output_class, cache: Any, **fields) -> ModelOutput:
    """An output carrying ``cache`` under both names (or neither, when there is no cache)."""
    return output_class(**fields, cache=cache, past_key_values=cache)
