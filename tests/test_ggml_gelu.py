"""quantize.ggml_gelu: GELU (tanh approximation) from ggml ops, against PyTorch's F.gelu(approximate="tanh")."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("ggml")
import ggml.utils  # noqa: E402

from quantize.ggml_gelu import gelu_tanh  # noqa: E402


def _run(values: np.ndarray, n_threads: int) -> tuple[np.ndarray, list[str], tuple]:
    """gelu_tanh over a tensor of values' shape (reversed into ggml's ne order) on n_threads; its output, the graph's
    op names and the shape its SILU ran on (ne0, rows)."""
    ctx = ggml.ggml_init(ggml.ggml_init_params(mem_size=64 * 2**20, mem_buffer=None, no_alloc=False))
    try:
        x = ggml.ggml_new_tensor(ctx, ggml.GGML_TYPE_F32, values.ndim,
                                 (ggml.ctypes.c_int64 * values.ndim)(*values.shape[::-1]))
        ggml.utils.to_numpy(x)[...] = values
        y = gelu_tanh(ctx, x, n_threads)
        gf = ggml.ggml_new_graph(ctx)
        ggml.ggml_build_forward_expand(gf, y)
        ggml.ggml_graph_compute_with_ctx(ctx, gf, n_threads)
        nodes = [ggml.ggml_graph_node(gf, i) for i in range(ggml.ggml_graph_n_nodes(gf))]
        ops = [ggml.ggml_op_desc(t).decode() for t in nodes]
        ne = next(t.contents.ne for t, op in zip(nodes, ops) if op == "SILU")
        silu = (ne[0], ne[1] * ne[2] * ne[3])
        assert tuple(y.contents.ne[:values.ndim]) == values.shape[::-1]
        return ggml.utils.to_numpy(y).copy().reshape(values.shape), ops, silu
    finally:
        ggml.ggml_free(ctx)


def test_gelu_equals_torch_tanh_gelu_over_the_whole_range():
    """Within 1e-6 (relative to max(1, |x|)) of the exact function from -1e12 to 1e12: 0 and x far out, no NaN or
    inf (ggml_gelu's F16 table is 4e-3 off near |x| = 8)."""
    rng = np.random.default_rng(0)
    x = np.concatenate([np.linspace(-60, 60, 4001), rng.standard_normal(4000) * 3,
                        [0.0, -0.0, 1e-30, -1e-30, 1e4, -1e4, 1e12, -1e12]]).astype(np.float32)
    x = x[: len(x) // 2 * 2].reshape(2, -1)
    got, ops, _ = _run(x, 2)
    want = F.gelu(torch.from_numpy(x).double(), approximate="tanh").numpy()
    assert np.isfinite(got).all()
    assert (np.abs(got - want) / np.maximum(1.0, np.abs(want))).max() < 1e-6
    assert "GELU" not in ops and ops.count("SILU") == 1
    assert got[x <= -20].max() <= 0.0 and got[x <= -20].min() > -1e-30  # the negative tail is (-)0
    np.testing.assert_allclose(got[x >= 20], x[x >= 20], rtol=1e-6)  # and the positive one is x


@pytest.mark.parametrize("shape,threads,silu_shape", [
    ((1, 512), 2, (256, 2)),       # a decode step's one row: split over the threads
    ((1, 512), 3, (256, 2)),       # 3 does not divide 512: the largest count below that does
    ((1, 510), 4, (170, 3)),
    ((5, 512), 2, (512, 5)),       # enough rows already
    ((3, 2, 512), 4, (512, 6)),    # the MoE layout [n_ff, k, n]
])
def test_gelu_spreads_a_single_row_over_the_threads(shape, threads, silu_shape):
    x = (np.random.default_rng(1).standard_normal(shape) * 4).astype(np.float32)
    got, _, silu = _run(x, threads)
    assert silu == silu_shape
    want = F.gelu(torch.from_numpy(x).double(), approximate="tanh").numpy()
    assert np.abs(got - want).max() < 1e-5
