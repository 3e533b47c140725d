"""The attention masks of multi-modal causal attention (an LLM file with ``tinygptv.attention = mmca``) for the
runtimes, as plain numpy (quantize.ggml_llm, quantize.ggml_decode_graph and quantize.torch_llm build on them).

Which positions are image tokens: the positions a session feeds through ``eval_embeddings`` (image rows); those fed
through ``eval_tokens`` are text. Each backend keeps one flag per cache position.

For queries at positions q_start .. q_start+n-1 over keys 0 .. n_kv-1 (causal: key <= query):

* ``same``: keys of the query's own kind (image -> image, text -> text); never empty (the query itself is there);
* ``cross``: for a text query, the image keys; a row without any is the causal row instead (finite), and ``has`` is
  False there, so the runtime multiplies that part by 0: a text token with no image before it gets nothing from it.
The runtime adds softmax(same)·V and has · softmax(cross)·V, as tinygpt.model.mmca does.
"""
from __future__ import annotations

import numpy as np


def mmca_masks(is_image: np.ndarray, q_start: int, n: int, n_kv: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(same [n, n_kv] bool, cross [n, n_kv] bool, has [n] bool); ``is_image`` covers at least positions 0..n_kv-1
    (positions past the last query are masked by causality whatever their flag)."""
    q_pos = np.arange(q_start, q_start + n)[:, None]
    k_pos = np.arange(n_kv)[None, :]
    causal = k_pos <= q_pos
    keys = np.asarray(is_image[:n_kv], dtype=bool)[None, :]
    queries = np.asarray(is_image[q_start:q_start + n], dtype=bool)[:, None]
    same = causal & (keys == queries)
    cross = causal & keys & ~queries
    has = cross.any(axis=1)
    cross = np.where(has[:, None], cross, causal)
    return same, cross, has


def additive(mask: np.ndarray) -> np.ndarray:
    """A boolean mask as ggml's additive F16 mask: 0 where True, -inf where False."""
    return np.where(mask, 0.0, -np.inf).astype(np.float16)
