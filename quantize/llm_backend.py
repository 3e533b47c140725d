"""The interface a chat session needs from a language-model backend, declared once.

Three backends implement it: quantize.ggml_llm.GgmlLLM (ggml graph, the default), quantize.torch_llm.TorchLLM
(pure-PyTorch fallback) and quantize.llama_cpp_backend.LlamaCppLLM (stock llama.cpp, plain-phi2 files only). Each
subclasses `LLMBackend` to say so; quantize.session and quantize.bench use nothing beyond these members
(tests/test_llm_backend.py checks both).

A backend is stateful: it owns a KV cache of `n_past` positions out of `n_ctx`. `eval_tokens` / `eval_embeddings`
append positions and return logits; `truncate` cuts the cache back so a conversation can reuse its common prefix.
"""
from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

import numpy as np


@runtime_checkable
class ModelShape(Protocol):
    """The two sizes of the decoder a session needs (GgmlLLM / TorchLLM carry a full gguf_file.LLMHyperParams)."""

    hidden_size: int  # width of one input embedding row (an image vector has this width too)
    vocab_size: int  # number of token ids; logits rows have this length


@runtime_checkable
class LLMBackend(Protocol):
    """A stateful decoder over one LLM GGUF file."""

    hp: ModelShape
    """hidden_size and vocab_size of the loaded model."""

    n_ctx: int
    """Positions the KV cache holds; evaluating past it raises UserError."""

    n_past: int
    """Positions currently in the KV cache (0 after reset)."""

    def eval_tokens(self, ids: Sequence[int], all_logits: bool = False) -> np.ndarray:
        """Append token ids after the cache. Returns the logits after the last one ([vocab_size] float32), or one row
        per id ([n, vocab_size]) with all_logits. UserError for an id outside the vocabulary or a full context."""
        ...

    def eval_embeddings(self, rows: np.ndarray, all_logits: bool = False) -> np.ndarray:
        """Append input embedding rows ([n, hidden_size], e.g. image vectors) after the cache; logits as eval_tokens.
        An mmca file (tinygptv.attention) treats these positions as image tokens, eval_tokens' as text."""
        ...

    def truncate(self, n_keep: int) -> None:
        """Forget every cached position from n_keep on (0 <= n_keep <= n_past, else ValueError)."""
        ...

    def reset(self) -> None:
        """Forget the whole cache (n_past = 0)."""
        ...

    def close(self) -> None:
        """Free the weights and cache now instead of at garbage collection; safe to call twice."""
        ...
