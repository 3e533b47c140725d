"""The compute side of the decode roofline: how fast our ggml build's one-token matmul runs when memory is no limit.

A decode step reads every weight once, so it cannot beat weight bytes / read bandwidth (quantize.bench_roofline). Nor
can it beat weight bytes / the rate at which the matmul kernel consumes weights that are already in cache: on a CPU
whose memory is faster than two cores can dequantise (a 2-core AMD EPYC measured 35 to 67 GB/s of read bandwidth
within minutes, while its Q4_K kernel consumes ~35 GB/s), that second floor is the higher one, and no engine reaches
the memory roofline there.

Contract:
  * `matmul_type(path)`: the ggml type of the LLM file's matmul weights (the attention output projection's).
  * `kernel_rate(ggml_type, threads, repack, amx)` -> (GB of weights per second, layout name): a 2560 x 2560 weight of
    that type (3.7 MB in Q4_K: in cache) in the layout our runtime gives it (ggml's AMX buffer, CPU_REPACK, or the
    file's blocks; quantize.ggml_weights), times a graph of 32 one-token matmuls of it, best of 20 runs.
  * `kernel_floor_ms(weight_bytes, rate_gb_s)`: weight bytes / that rate, in ms.
"""
from __future__ import annotations

import ctypes
import time
from pathlib import Path

import numpy as np

from .bench_roofline import roofline_ms

SIDE, MATMULS, RUNS = 2560, 32, 20


def matmul_type(path: str | Path) -> int:
    from . import gguf_names as names
    from .gguf_file import open_gguf

    f = open_gguf(Path(path), names.ARCH_LLM)
    t = f.tensors.get("blk.0.attn_output.weight")
    if t is None:
        raise ValueError(f"{path}: no blk.0.attn_output.weight to take the matmul type from")
    return int(t.tensor_type)


def _layout(ggml_type: int, backend, repack: bool, amx: bool | None):
    """(buffer type, name) our runtime would put a 2560 x 2560 matmul weight of this type in."""
    import ggml

    from .ggml_amx import amx_tiles_work
    from .ggml_weights import AMX_TYPES, pick_layout, weight_layouts

    if amx is None:  # as GgmlLLM decides: the probe only where the type could go to the AMX buffer
        amx = ggml_type in AMX_TYPES and amx_tiles_work()
    layouts = weight_layouts(backend, repack, amx)
    layout = pick_layout(layouts, "blk.0.attn_output.weight", ggml_type, [SIDE, SIDE])
    if layout is None:
        return ggml.ggml_backend_get_default_buffer_type(backend), "plain"
    return layouts[layout][0], {"AMX": "AMX", "CPU_REPACK": "repacked"}[layout]


def kernel_rate(ggml_type: int, threads: int, repack: bool = True, amx: bool | None = None) -> tuple[float, str]:
    import ggml

    backend = ggml.ggml_backend_cpu_init()
    ggml.ggml_backend_cpu_set_n_threads(backend, int(threads))
    buft, layout = _layout(ggml_type, backend, repack, amx)
    rng = np.random.default_rng(0)
    w_f32 = (rng.standard_normal((SIDE, SIDE)) * 0.02).astype(np.float32)
    w_bytes = int(ggml.ggml_row_size(ggml_type, SIDE)) * SIDE
    w_q = np.zeros(w_bytes, np.uint8)
    ggml.ggml_quantize_chunk(ggml_type, w_f32.ctypes.data_as(ctypes.POINTER(ctypes.c_float)),
                             w_q.ctypes.data_as(ctypes.c_void_p), 0, SIDE, SIDE, None)
    wctx = ggml.ggml_init(ggml.ggml_init_params(mem_size=4 * ggml.ggml_tensor_overhead(), mem_buffer=None,
                                                no_alloc=True))
    w = ggml.ggml_new_tensor_2d(wctx, ggml_type, SIDE, SIDE)
    wbuf = ggml.ggml_backend_alloc_ctx_tensors_from_buft(wctx, buft)
    ggml.ggml_backend_tensor_set(w, w_q.ctypes.data, 0, w_bytes)
    ctx = ggml.ggml_init(ggml.ggml_init_params(
        mem_size=(2 * MATMULS + 8) * ggml.ggml_tensor_overhead() + ggml.ggml_graph_overhead(), mem_buffer=None,
        no_alloc=True))
    x = ggml.ggml_new_tensor_2d(ctx, ggml.GGML_TYPE_F32, SIDE, 1)
    gf = ggml.ggml_new_graph(ctx)
    for _ in range(MATMULS):  # independent products of the same cached weight: the kernel, not memory, sets the pace
        ggml.ggml_build_forward_expand(gf, ggml.ggml_mul_mat(ctx, w, x))
    allocator = ggml.ggml_gallocr_new(ggml.ggml_backend_get_default_buffer_type(backend))
    ggml.ggml_gallocr_alloc_graph(allocator, gf)
    xs = rng.standard_normal(SIDE).astype(np.float32)
    ctypes.memmove(x.contents.data, xs.ctypes.data, xs.nbytes)
    times = []
    for _ in range(RUNS + 2):  # two warm-ups: thread pool up, weight in cache
        t0 = time.perf_counter()
        ggml.ggml_backend_graph_compute(backend, gf)
        times.append(time.perf_counter() - t0)
    best = min(times[2:])
    ggml.ggml_gallocr_free(allocator)
    ggml.ggml_free(ctx)
    ggml.ggml_backend_buffer_free(wbuf)
    ggml.ggml_free(wctx)
    ggml.ggml_backend_free(backend)
    return MATMULS * w_bytes / best / 1e9, layout


# the kernel floor is the roofline's arithmetic with the kernel's rate in place of the memory's
kernel_floor_ms = roofline_ms
