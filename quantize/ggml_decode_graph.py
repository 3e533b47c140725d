"""The cached single-token (n = 1) forward graph of quantize.ggml_llm.GgmlLLM.

Nothing in the graph depends on n_past: the token, its position, the causal mask and the cache rows that receive the
new K/V are all input tensors. Attention reads a fixed bucket of P cache positions (n_past + 1 rounded up to a
multiple of BUCKET, at most n_ctx); positions past n_past are masked with -inf and add exact zeros. So one graph
serves every step whose n_past falls in its bucket, including after reset / truncate / prefill, and is rebuilt only
when the bucket or the input kind (token id / embedding row) changes.

The graph has its own gallocr, so the prefill graphs (GgmlLLM._galloc) never overwrite its tensors.
"""
from __future__ import annotations

import ctypes

import numpy as np

import ggml  # ggml-python: optional, so only quantize.ggml_llm (itself imported lazily) imports this module

from .mmca_masks import additive, mmca_masks

# Cache positions per bucket: each masked position costs a little compute (its K and V rows in every layer) and each
# bucket one graph rebuild in Python; 16 and 32 come out even, 64 costs more (docs/gguf-runtime.md, "Cached decode
# graph").
BUCKET = 32


def decode_graph_key(llm, token_input: bool) -> tuple[int, bool]:
    """(P, token_input): the graph a step at llm.n_past needs."""
    n_kv = -(-(llm.n_past + 1) // BUCKET) * BUCKET
    return min(n_kv, llm.n_ctx), token_input


class DecodeGraph:
    """The graph for one key, its own metadata context and gallocr buffer, and host copies of its inputs. It keeps no
    reference to the GgmlLLM (no cycle: dropping the model frees it at once)."""

    def __init__(self, llm, key: tuple[int, bool]):
        self.key = key
        self.n_kv, token_input = key
        hidden = llm.hp.hidden_size
        self._galloc = None
        self._meta, self.gf = llm.new_graph()
        try:
            inputs, out = llm.build_graph(self._meta, self.gf, 1, self.n_kv, token_input, True, False, True)
            self._galloc = ggml.ggml_gallocr_new(ggml.ggml_backend_get_default_buffer_type(llm.cpu_backend))
            if not ggml.ggml_gallocr_alloc_graph(self._galloc, self.gf):
                raise RuntimeError("ggml could not allocate the decode graph")
        except BaseException:
            self.close()
            raise
        # host buffers for the inputs, and the addresses they go to (fixed while the gallocr lives)
        self._x = np.zeros(1, np.int32) if token_input else np.zeros((1, hidden), np.float32)
        self._pos = np.zeros(1, np.int32)
        self._mask = np.zeros(self.n_kv, np.float16)
        self._kv_idx = np.zeros(1, np.int64)
        pairs = [(inputs["x"], self._x), (inputs["pos"], self._pos), (inputs["mask"], self._mask),
                 (inputs["kv_idx"], self._kv_idx)]
        self._mask2 = self._scale = None
        if "mask2" in inputs:  # mmca
            self._mask2, self._scale = np.zeros(self.n_kv, np.float16), np.zeros(1, np.float32)
            pairs += [(inputs["mask2"], self._mask2), (inputs["scale"], self._scale)]
        self._copies = [(t.contents.data, a.ctypes.data, a.nbytes) for t, a in pairs]
        vocab = llm.hp.vocab_size
        self._logits = np.ctypeslib.as_array((ctypes.c_float * vocab).from_address(out.contents.data))

    def run(self, llm, value) -> np.ndarray:
        """One step at llm.n_past (whose key must be this graph's): the logits row; advances llm.n_past."""
        n_past = llm.n_past
        self._x[...] = np.reshape(value, self._x.shape)
        self._pos[0] = n_past
        if self._mask2 is None:
            self._mask[:n_past + 1] = 0.0
            self._mask[n_past + 1:] = -np.inf
        else:
            same, cross, has = mmca_masks(llm.image_flags, n_past, 1, self.n_kv)
            self._mask[:], self._mask2[:], self._scale[0] = additive(same[0]), additive(cross[0]), float(has[0])
        self._kv_idx[0] = n_past
        self.load_inputs()
        status = ggml.ggml_backend_graph_compute(llm.cpu_backend, self.gf)
        if status != 0:
            raise RuntimeError(f"ggml graph compute failed with status {status}")
        llm.n_past = n_past + 1
        return self._logits.copy()

    def load_inputs(self) -> None:
        """Copy the last step's inputs into the graph's input tensors (again): computing the same step a second time,
        e.g. node by node in quantize.profile_ops, then cannot depend on what the first compute left there."""
        for dst, src, nbytes in self._copies:
            ctypes.memmove(dst, src, nbytes)

    def close(self) -> None:
        if self._galloc is not None:
            ggml.ggml_gallocr_free(self._galloc)
            self._galloc = None
        if self._meta is not None:
            ggml.ggml_free(self._meta)
            self._meta = None
