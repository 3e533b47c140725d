"""The KV cache of quantize.ggml_llm.GgmlLLM, which grows with the positions used.

Contract:
  * `KVCache(n_layers, head_dim, n_heads, n_ctx, ggml_type)`: per layer a K and a V ggml tensor, `k[il]` / `v[il]`,
    [head_dim, capacity, n_heads] (head-major: one head's positions are contiguous, so flash attention streams each
    head's keys and values), in one zero-filled buffer. `capacity` starts at min(n_ctx, START) positions.
  * `reserve(n)`: make room for positions 0..n-1 (n <= n_ctx). When the capacity is short it doubles (or more, to a
    multiple of START; at most n_ctx): new tensors in a new buffer, the old positions copied layer by layer, the old
    pages given back as each layer is copied (so growing never holds both caches whole). Returns True when the tensors
    were replaced: graphs built on the old ones must be rebuilt. `nbytes`: the buffer's size; `close()`.
  * Why it grows instead of holding n_ctx positions from the start: the buffer sits on 2 MiB pages (NumPy advises them
    for large arrays too). A huge page is faulted in whole and the first position touches every head's region, so a
    cache sized for n_ctx was resident at once: 1.34 GB for the full size's 2,048 positions (F32), most of it never
    used by a short chat. On 4 KiB pages instead, a full-size step at 900 positions takes 1.7 ms longer (flash
    attention's TLB misses). Growing keeps the huge pages and holds at most twice the positions used (at least START).
"""
from __future__ import annotations

import ggml  # ggml-python: only quantize.ggml_llm (itself imported lazily) imports this module

from .memory import huge_page_array, release_pages

START = 256  # positions: 168 MB at full size (F32), what a first question with an image needs
_ALIGN = 4096


class KVCache:
    """Per-layer K and V tensors whose capacity grows on demand (see the module docstring)."""

    def __init__(self, n_layers: int, head_dim: int, n_heads: int, n_ctx: int, ggml_type: int):
        self.n_layers, self.head_dim, self.n_heads, self.n_ctx = n_layers, head_dim, n_heads, n_ctx
        self.ggml_type = ggml_type
        self._row = head_dim * ggml.ggml_type_size(ggml_type)  # bytes of one head at one position
        self._ctx = None
        self._buf = None
        self.k: list = []
        self.v: list = []
        self.capacity = 0
        self._ctx, self._buf, self.k, self.v, self.capacity = self._allocate(min(n_ctx, START))

    @property
    def bytes_per_position(self) -> int:
        """K and V of one position in every layer: what a decode step reads per cached position."""
        return 2 * self.n_layers * self.n_heads * self._row

    @property
    def nbytes(self) -> int:
        return 0 if self._buf is None else int(self._buf.nbytes)

    def _stride(self, capacity: int) -> int:
        """Bytes between two layers' tensors: one tensor rounded up to whole pages."""
        return -(-self._row * capacity * self.n_heads // _ALIGN) * _ALIGN

    def _allocate(self, capacity: int) -> tuple:
        """(ggml context, buffer, K tensors, V tensors, capacity) of a new, zero-filled cache."""
        stride = self._stride(capacity)
        buf, _ = huge_page_array(2 * self.n_layers * stride)
        ctx = ggml.ggml_init(ggml.ggml_init_params(mem_size=(2 * self.n_layers + 4) * ggml.ggml_tensor_overhead(),
                                                   mem_buffer=None, no_alloc=True))
        k, v = [], []
        for i in range(2 * self.n_layers):
            t = ggml.ggml_new_tensor_3d(ctx, self.ggml_type, self.head_dim, capacity, self.n_heads)
            t.contents.data = buf.ctypes.data + i * stride
            (k if i % 2 == 0 else v).append(t)
        return ctx, buf, k, v, capacity

    def reserve(self, n_positions: int) -> bool:
        if n_positions <= self.capacity:
            return False
        if n_positions > self.n_ctx:
            raise ValueError(f"reserve({n_positions}) past n_ctx {self.n_ctx}")
        old_ctx, old_buf, old_capacity = self._ctx, self._buf, self.capacity
        old_stride = self._stride(old_capacity)
        wanted = max(2 * old_capacity, -(-n_positions // START) * START)
        new = self._allocate(min(self.n_ctx, wanted))
        new_buf, capacity = new[1], new[4]
        stride, used = self._stride(capacity), self._row * old_capacity

        def copy(i: int) -> None:
            src = old_buf[i * old_stride:i * old_stride + used * self.n_heads].reshape(self.n_heads, used)
            dst = new_buf[i * stride:i * stride + self._row * capacity * self.n_heads]
            dst.reshape(self.n_heads, -1)[:, :used] = src

        copied = 0
        try:
            for i in range(2 * self.n_layers):
                copy(i)
                copied = i + 1
                release_pages(old_buf[i * old_stride:(i + 1) * old_stride])
        finally:  # interrupted (Ctrl-C) half-way: the rest is copied too, so the cache never holds half its layers
            for i in range(copied, 2 * self.n_layers):
                copy(i)
            self._ctx, self._buf, self.k, self.v, self.capacity = new
            ggml.ggml_free(old_ctx)
        return True

    def close(self) -> None:
        if self._ctx is not None:
            ggml.ggml_free(self._ctx)
            self._ctx = None
        self._buf, self.k, self.v = None, [], []
