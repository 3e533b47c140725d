"""GELU (tanh approximation, Phi-2's gelu_new) as ggml ops, for quantize.ggml_llm's dense FFN and quantize.ggml_moe.

    gelu(x) = x * sigmoid(k (x + c x^3))         k = 2 sqrt(2 / pi), c = 0.044715
            = silu(z) / w    with  w = k (1 + c x^2),  z = x w          (w >= k > 0: no division by zero)

Why not ggml_gelu: ggml's CPU kernel rounds every input to F16 and looks the result up in a 64K-entry table, one
element at a time. That is 4e-3 off the exact function at |x| near 8 (PyTorch's F.gelu(approximate="tanh") is the
reference), and on a 2-core Zen 4 EPYC 32 layers' [10240] activations took 410-420 us per decode step. The five ops
here (sqr, scale_bias, mul, silu, div; ggml_silu is vectorised with an exact exp) are within 1e-6 of the exact
function and took 200 us; whole decode steps changed by less than this host's noise (docs/gguf-runtime.md, "Per-op
profile"; experiments/gelu_ab.py).

ggml splits an elementwise op by rows, so a decode step's single [ffn_size] row would run on one thread: with fewer
rows than threads the activation is reshaped to [ffn_size / p, rows * p] for the largest p <= n_threads that divides
the width (2.0 -> 1.0 ms per full-size step on the EPYC with ggml_gelu).
"""
from __future__ import annotations

import math

import ggml  # ggml-python: only quantize.ggml_llm (itself imported lazily) and quantize.ggml_moe import this module

K = 2.0 * math.sqrt(2.0 / math.pi)
C = 0.044715
NAME = b"gelu"


def gelu_tanh(ctx, x, n_threads: int = 1):
    """GELU (tanh approximation) of x, any shape with contiguous rows; the result has x's shape."""
    ne = tuple(x.contents.ne[:4])
    rows = ne[1] * ne[2] * ne[3]
    parts = next((p for p in range(n_threads, 1, -1) if ne[0] % p == 0), 1) if rows < n_threads else 1
    if parts > 1:
        x = ggml.ggml_reshape_2d(ctx, x, ne[0] // parts, rows * parts)
    sq = ggml.ggml_sqr(ctx, x)
    w = ggml.ggml_scale_bias(ctx, sq, K * C, K)
    z = ggml.ggml_mul(ctx, x, w)
    s = ggml.ggml_silu(ctx, z)
    y = ggml.ggml_div(ctx, s, w)
    for t in (sq, w, z, s, y):
        ggml.ggml_set_name(t, NAME)  # quantize.profile_ops counts the five as one GELU
    return ggml.ggml_reshape_4d(ctx, y, *ne) if parts > 1 else y
