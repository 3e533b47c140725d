"""quantize.bench_kernel: the kernel floor's probe times the one-token matmul in the layout our runtime uses."""

from __future__ import annotations

import pytest

ggml = pytest.importorskip("ggml")

from quantize.bench_kernel import SIDE, kernel_floor_ms, kernel_rate, matmul_type  # noqa: E402
from quantize.ggml_weights import extra_buffer_types  # noqa: E402


@pytest.mark.parametrize("qtype, repack, layout", [
    (ggml.GGML_TYPE_Q4_K, True, "repacked"), (ggml.GGML_TYPE_Q4_K, False, "plain"),
    (ggml.GGML_TYPE_Q4_0, True, "repacked"), (ggml.GGML_TYPE_Q8_0, True, "plain")])
def test_kernel_rate_uses_the_runtimes_layout_and_measures_a_rate(qtype, repack, layout):
    if repack and layout == "repacked" and "CPU_REPACK" not in extra_buffer_types(ggml.ggml_backend_cpu_init()):
        pytest.skip("this ggml build has no CPU_REPACK buffer")
    rate, used = kernel_rate(qtype, threads=1, repack=repack, amx=False)
    assert used == layout
    assert 0.1 < rate < 10_000  # GB/s of weights: a measured rate, not a constant


def test_kernel_floor_is_weight_bytes_over_the_rate():
    assert kernel_floor_ms(1_500_000_000, 30.0) == pytest.approx(50.0)
    assert SIDE % 256 == 0  # whole Q4_K super-blocks per row


def test_matmul_type_reads_the_files_attention_projection(random_gguf_pairs):
    path = next((random_gguf_pairs / "modified").glob("llm-*.gguf"))
    assert matmul_type(path) == ggml.GGML_TYPE_Q8_0  # the fixture's files are Q8_0
