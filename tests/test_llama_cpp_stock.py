"""Stock llama.cpp (via the optional llama-cpp-python) refuses the modified LLM file and runs the plain one.

llama-cpp-python is an optional extra (a ~10-minute source build), so these tests skip where it is not installed.
"""

from __future__ import annotations

import numpy as np
import pytest

llama_cpp = pytest.importorskip("llama_cpp")


def test_stock_llama_cpp_refuses_the_modified_file(random_gguf_pairs):
    from quantize.gguf_file import find_llm_file
    from quantize.llama_cpp_backend import LlamaCppLLM
    from tinygpt.errors import UserError

    with pytest.raises(UserError, match="stock llama.cpp cannot load this file"):
        LlamaCppLLM(find_llm_file(random_gguf_pairs / "modified"), n_ctx=64)
    with pytest.raises(ValueError):  # the library's own loader, not just our wrapper
        llama_cpp.Llama(model_path=str(find_llm_file(random_gguf_pairs / "modified")), n_ctx=64, verbose=False)


def test_plain_file_runs_on_stock_llama_cpp_with_image_vectors_like_our_graph(random_gguf_pairs):
    from quantize.gguf_file import find_llm_file, open_gguf
    from quantize.engine_choice import load_language_model

    path = find_llm_file(random_gguf_pairs / "plain")
    vectors = np.random.default_rng(0).standard_normal((32, 256)).astype(np.float32)
    results = {}
    for backend in ("ggml", "llama-cpp"):
        llm = load_language_model(open_gguf(path, "phi2"), backend=backend, n_ctx=128, quiet=True)
        results[backend] = [llm.eval_tokens(list(range(300, 310))), llm.eval_embeddings(vectors),
                            llm.eval_tokens(list(range(400, 405)))]
    for ours, stock in zip(results["ggml"], results["llama-cpp"]):
        # both quantise activations to 8 bits inside Q8_0 matmuls, in different blockings: ~1% of the logit scale
        assert np.abs(ours - stock).max() < 0.03 * np.abs(ours).max()
