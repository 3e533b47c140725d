"""ggml's repacked (interleaved) Q4 weights: used for every matmul weight, and as accurate as the file's own blocks.

Both ggml paths quantise activations to 8 bits inside the matmul, in a different blocking, so they are compared with
the exact float computation over the same dequantised weights (the PyTorch fallback), not with each other.
"""

from __future__ import annotations

import numpy as np
import pytest

ggml = pytest.importorskip("ggml")


@pytest.mark.parametrize("qtype", ["q4_k", "q4_0"])
def test_repacked_weights_are_as_accurate_as_the_plain_blocks(tmp_path, qtype):
    from quantize.ggml_amx import amx_tiles_work
    from quantize.ggml_llm import GgmlLLM
    from quantize.gguf_file import find_llm_file, open_gguf
    from quantize.random_model import write_random_model
    from quantize.torch_llm import TorchLLM

    write_random_model(tmp_path, size="tiny", qtype=qtype, seed=1, progress=False)
    path = find_llm_file(tmp_path, qtype)
    ids = list(range(100, 140))
    exact = TorchLLM(open_gguf(path, "phi2"), n_ctx=64, dtype="fp32")
    reference = (exact.eval_tokens(ids), exact.eval_tokens([7]))
    scale = np.abs(reference[0]).max()
    layouts = {"repacked": dict(repack=True, amx=False), "plain": dict(repack=False)}
    if qtype == "q4_0" and amx_tiles_work():  # ggml's AMX buffer (tests/test_ggml_amx.py) where it runs here
        layouts["amx"] = dict(amx=True)
    errors, copied = {}, {}
    for name, switches in layouts.items():
        llm = GgmlLLM(open_gguf(path, "phi2"), n_ctx=64, **switches)
        got = (llm.eval_tokens(ids), llm.eval_tokens([7]))
        copied[name] = (llm.repacked, llm.in_amx)
        errors[name] = max(np.abs(g - r).max() for g, r in zip(got, reference)) / scale
        llm.close()
    assert copied["repacked"] == (4 * 4 + 1, 0) and copied["plain"] == (0, 0)  # 4 matmul weights a layer + head
    assert errors["repacked"] < 0.03 and errors["plain"] < 0.03
    assert errors["repacked"] < 2 * errors["plain"] + 1e-3
    if "amx" in layouts:
        assert copied["amx"] == (0, 4 * 4 + 1)
        assert errors["amx"] < 2 * errors["plain"] + 1e-3
