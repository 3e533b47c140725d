"""quantize.ggml_gelu against ggml's own ggml_gelu (its F16 lookup table), on this machine's CPU, 2 threads.

    PYTHONPATH=. python experiments/gelu_ab.py                          # a full-size step's 32 GELUs, ops alone
    PYTHONPATH=. python experiments/gelu_ab.py gguf-full/llm-q4_k.gguf  # and whole decode steps, A/B rounds

The first part times a graph of 32 GELUs over [10240] rows (a full-size decode step's FFN activations, one row per
thread) and prints each one's largest error against the exact float64 function. The second opens the file twice,
one GgmlLLM per GELU, and alternates rounds: prefill 100 random ids (timed), then the median of 40 single-token
steps. Prints each round and the medians. On a shared host read the rounds: the bench's "moved" readings (the host
moving the guest's CPUs) show up here as jumps of a few ms in both columns.
"""
from __future__ import annotations

import ctypes
import math
import sys
import time

import ggml
import ggml.utils
import numpy as np

import quantize.ggml_llm as ggml_llm
from quantize import gguf_names as names
from quantize.bench_child import random_ids
from quantize.ggml_gelu import gelu_tanh
from quantize.gguf_file import open_gguf


def table_gelu(ctx, x, n_threads: int = 1):
    """What the runtime did before: ggml_gelu, one row per thread when a step has a single row."""
    ne0, ne1 = x.contents.ne[0], x.contents.ne[1]
    parts = next((p for p in range(n_threads, 1, -1) if ne0 % p == 0), 1) if ne1 < n_threads else 1
    if parts == 1:
        return ggml.ggml_gelu(ctx, x)
    y = ggml.ggml_gelu(ctx, ggml.ggml_reshape_2d(ctx, x, ne0 // parts, ne1 * parts))
    return ggml.ggml_reshape_2d(ctx, y, ne0, ne1)


def ops_alone(gelu, data: list[np.ndarray]) -> tuple[float, float]:
    """(best of 7 x 200 computes in us, largest error against float64) of 32 GELUs in one graph."""
    ctx = ggml.ggml_init(ggml.ggml_init_params(mem_size=256 * 2**20, mem_buffer=None, no_alloc=False))
    gf = ggml.ggml_new_graph_custom(ctx, 2048, False)
    pairs = []
    for d in data:
        x = ggml.ggml_new_tensor_2d(ctx, ggml.GGML_TYPE_F32, d.size, 1)
        ggml.utils.to_numpy(x)[...] = d.reshape(1, -1)
        y = gelu(ctx, x, 2)
        ggml.ggml_build_forward_expand(gf, y)
        pairs.append((d, y))
    plan = ggml.ggml_graph_plan(gf, 2, None)
    work = (ctypes.c_uint8 * max(plan.work_size, 1))()
    plan.work_data = ctypes.cast(work, ctypes.POINTER(ctypes.c_uint8))
    times = []
    for _ in range(8):
        t0 = time.perf_counter()
        for _ in range(200):
            ggml.ggml_graph_compute(gf, ctypes.pointer(plan))
        times.append((time.perf_counter() - t0) / 200 * 1e6)
    err = 0.0
    for d, y in pairs:
        x = d.astype(np.float64)
        want = 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))
        err = max(err, float(np.abs(ggml.utils.to_numpy(y).reshape(-1) - want).max()))
    ggml.ggml_free(ctx)
    return min(times[1:]), err


def decode_rounds(path: str, rounds: int = 8) -> None:
    contents = open_gguf(path, names.ARCH_LLM)
    engines = {"ggml_gelu": ggml_llm.GgmlLLM(contents, n_ctx=512, n_threads=2),
               "ggml_gelu.py": ggml_llm.GgmlLLM(contents, n_ctx=512, n_threads=2)}
    ids = random_ids(100, engines["ggml_gelu"].hp.vocab_size)
    times: dict[str, list[float]] = {name: [] for name in engines}
    prefill: dict[str, list[float]] = {name: [] for name in engines}
    for r in range(rounds):
        order = list(engines) if r % 2 == 0 else list(engines)[::-1]
        for name in order:
            ggml_llm.gelu_tanh = table_gelu if name == "ggml_gelu" else gelu_tanh  # read when a graph is built
            llm = engines[name]
            llm.reset()
            t0 = time.perf_counter()
            logits, steps = llm.eval_tokens(ids), []
            prefill[name].append(time.perf_counter() - t0)
            for _ in range(40):
                token = int(np.argmax(logits)) % 50000
                t0 = time.perf_counter()
                logits = llm.eval_tokens([token])
                steps.append(time.perf_counter() - t0)
            times[name].append(float(np.median(steps)) * 1e3)
        print(f"round {r + 1}/{rounds}: " + ", ".join(f"{n} {t[-1]:.2f} ms (prefill {prefill[n][-1]:.2f} s)"
                                                       for n, t in times.items()), flush=True)
    ggml_llm.gelu_tanh = gelu_tanh
    print("median: " + ", ".join(f"{n} {np.median(t):.2f} ms/token, prefill {np.median(prefill[n]):.2f} s"
                                 for n, t in times.items()))


def main() -> None:
    rng = np.random.default_rng(0)
    data = [(rng.standard_normal(10240) * 2).astype(np.float32) for _ in range(32)]
    for _ in range(2):
        for name, gelu in (("ggml_gelu", table_gelu), ("ggml_gelu.py", gelu_tanh)):
            us, err = ops_alone(gelu, data)
            print(f"32 x [10240] GELU, {name:13s} {us:6.1f} us, largest error {err:.1e}", flush=True)
    if len(sys.argv) > 1:
        decode_rounds(sys.argv[1])


if __name__ == "__main__":
    main()
