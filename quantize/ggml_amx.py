"""Whether ggml's AMX buffer can hold the LLM's matmul weights on this machine, with this ggml build.

On a CPU with AMX (Intel Xeon 4th generation and later) ggml's native build has an extra buffer type, "AMX", whose
one-token matmul is an AVX-512 VNNI GEMV that streams Q4_0 weights at close to the memory bandwidth (full-size
decode 57 ms per token against 141 ms with the repacked Q4_0 layout, docs/gguf-runtime.md "AMX"), and whose
multi-token matmul (prefill) runs on the AMX tiles. The tile path needs a build that is not miscompiled: GCC 12's
`_tile_loadconfig` tells the compiler that it reads 8 bytes of the 64-byte tile configuration, so dead-store
elimination drops the stores of the tile shapes and `ldtilecfg` loads stack garbage: a general-protection fault
(SIGSEGV) on the first prefill. A build made with `-fno-dse` (how requirements.lock builds ggml-python) or by a
compiler without that bug is fine.

A fault cannot be caught in-process, so `amx_tiles_work()` runs one multi-token matmul on the AMX buffer in a child
process and compares it with the plain layout; the answer is cached per ggml library file (path, size, mtime) under
the tinygpt cache. TINYGPT_GGML_AMX=0 never uses the AMX buffer, =1 uses it without asking (where it exists).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import ggml

from tinygpt.paths import cache_root

from .ggml_weights import extra_buffer_types

ENV = "TINYGPT_GGML_AMX"

_PROBE = r"""
import ctypes, sys
import numpy as np
import ggml
from quantize.ggml_weights import extra_buffer_types

k, n, rows = 256, 64, 32
rng = np.random.default_rng(0)
w_f32 = rng.standard_normal((n, k)).astype(np.float32)
w_q = np.zeros(ggml.ggml_row_size(ggml.GGML_TYPE_Q4_0, k) * n, np.uint8)
ggml.ggml_quantize_chunk(ggml.GGML_TYPE_Q4_0, w_f32.ctypes.data_as(ctypes.POINTER(ctypes.c_float)),
                         w_q.ctypes.data_as(ctypes.c_void_p), 0, n, k, None)
backend = ggml.ggml_backend_cpu_init()
xs = rng.standard_normal((rows, k)).astype(np.float32)
out = []
for buft in (ggml.ggml_backend_get_default_buffer_type(backend), extra_buffer_types(backend)["AMX"]):
    params = ggml.ggml_init_params(mem_size=4 * ggml.ggml_tensor_overhead(), mem_buffer=None, no_alloc=True)
    wctx = ggml.ggml_init(params)
    w = ggml.ggml_new_tensor_2d(wctx, ggml.GGML_TYPE_Q4_0, k, n)
    ggml.ggml_backend_alloc_ctx_tensors_from_buft(wctx, buft)
    ggml.ggml_backend_tensor_set(w, w_q.ctypes.data, 0, w_q.nbytes)
    params = ggml.ggml_init_params(mem_size=16 * ggml.ggml_tensor_overhead() + ggml.ggml_graph_overhead(),
                                   mem_buffer=None, no_alloc=True)
    ctx = ggml.ggml_init(params)
    x = ggml.ggml_new_tensor_2d(ctx, ggml.GGML_TYPE_F32, k, rows)
    y = ggml.ggml_mul_mat(ctx, w, x)
    gf = ggml.ggml_new_graph(ctx)
    ggml.ggml_build_forward_expand(gf, y)
    ggml.ggml_gallocr_alloc_graph(ggml.ggml_gallocr_new(ggml.ggml_backend_get_default_buffer_type(backend)), gf)
    ctypes.memmove(x.contents.data, xs.ctypes.data, xs.nbytes)
    ggml.ggml_backend_graph_compute(backend, gf)
    out.append(np.ctypeslib.as_array((ctypes.c_float * (n * rows)).from_address(y.contents.data)).copy())
err = float(np.abs(out[0] - out[1]).max() / np.abs(out[0]).max())
print("relative difference", err)
sys.exit(0 if err < 1e-3 else 3)
"""


def has_amx_buffer() -> bool:
    return "AMX" in extra_buffer_types(ggml.ggml_backend_cpu_init())


def _library_key() -> str:
    lib = Path(ggml.__file__).parent / "lib"
    files = sorted(lib.glob("*ggml-cpu*")) or sorted(lib.glob("*ggml*"))
    return ";".join(f"{f.resolve()}:{f.stat().st_size}:{int(f.stat().st_mtime)}" for f in files)


def _cache_file() -> Path:
    return cache_root() / "ggml-amx-probe.json"  # the tinygpt cache, as the vision cache's (~ expanded)


def probe_amx_tiles(timeout: float = 120.0) -> tuple[bool, str]:
    """Run the multi-token AMX matmul in a child process: (works, what happened)."""
    root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, *sys.path]))
    try:
        result = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=timeout,
                                env=env)
    except subprocess.TimeoutExpired:
        return False, f"the probe did not finish in {timeout:.0f} s"
    if result.returncode == 0:
        return True, result.stdout.strip()
    if result.returncode < 0:
        return False, f"the probe died with signal {-result.returncode} (a miscompiled AMX tile path)"
    return False, f"the probe exited {result.returncode}: {(result.stdout + result.stderr).strip()[-200:]}"


def amx_tiles_work() -> bool:
    """Whether the AMX buffer may be used here: TINYGPT_GGML_AMX, else the cached (or a fresh) probe's answer."""
    setting = os.environ.get(ENV, "").strip()
    if setting in ("0", "1"):
        return setting == "1" and has_amx_buffer()
    if not has_amx_buffer():
        return False
    key, cache = _library_key(), _cache_file()
    try:
        known = json.loads(cache.read_text())
    except (OSError, ValueError):
        known = {}
    if key in known:
        return bool(known[key]["works"])
    works, detail = probe_amx_tiles()
    if not works:
        print(f"ggml's AMX buffer is not used: {detail}; rebuild ggml-python with -fno-dse to use it "
              "(docs/gguf-runtime.md, \"AMX\")", file=sys.stderr)
    known[key] = {"works": works, "detail": detail}
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(known, indent=1))
        tmp.replace(cache)
    except OSError:
        pass  # a read-only cache only costs the probe next time
    return works


def preferred_qtype(available: list[str], quiet: bool = False) -> str | None:
    """Which of the exported LLM types (`available`, e.g. ["q4_k", "q4_0"]) to load when none was asked for: "q4_0"
    where ggml's AMX buffer works (Q4_0 streams at the memory bandwidth through it, Q4_K does not: 54.8 against 89.8 ms
    per full-size token on a 2-core AMX Xeon, docs/benchmarks.md), else None (the usual order, Q4_K first). On such a
    CPU with a Q4_K file and no Q4_0 one, says once (unless quiet) that a Q4_0 export would be faster."""
    if not has_amx_buffer() or not amx_tiles_work():
        return None
    if "q4_0" in available:
        return "q4_0"
    if "q4_k" in available and not quiet:
        print("notice: this CPU runs Q4_0 through ggml's AMX buffer about 1.6x faster than Q4_K; export with "
              "--qtype q4_0 into the same directory and the runtime picks it", file=sys.stderr)
    return None
