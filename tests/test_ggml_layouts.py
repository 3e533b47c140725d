"""Where the ggml backend keeps weights and cache, and which kernels this machine's ggml build runs.

* Huge pages: the repacked weights are advised MADV_HUGEPAGE before they are written (quantize.ggml_weights); the
  advice is taken where Linux transparent huge pages are not "never", and TINYGPT_GGML_HUGE_PAGES=0 turns it off.
* The head-major F32 KV cache with flash attention gives the same logits as before: a step-by-step decode through
  the cached graph equals a full prefill, for F32 and F16 caches.
* ISA levels: ggml-python builds one native CPU variant (GGML_NATIVE, no GGML_BACKEND_DL), so the AVX2 / AVX-512 /
  AMX kernels cannot be forced in one process: the test below records which ones this build has and checks that the
  repack layout ggml picks for an AVX2-or-better CPU is in use. The AMX buffer type (compiled in on AMX machines) is
  exercised directly for a single-token matmul here, in every build; its multi-row tile path works only in builds
  that are not miscompiled (GCC 12 without -fno-dse faults), which tests/test_ggml_amx.py probes and tests
  (docs/gguf-runtime.md, "AMX"). AMX is the one level that can be forced per load (GgmlLLM(amx=True/False)).
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ggml = pytest.importorskip("ggml")

from quantize import ggml_weights, memory  # noqa: E402


def _thp_mode() -> str | None:
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return None
    return text.split("[")[1].split("]")[0] if "[" in text else None


@pytest.mark.skipif(_thp_mode() in (None, "never"), reason="no transparent huge pages on this machine")
def test_huge_page_advice_is_taken_and_can_be_turned_off(monkeypatch):
    buf = np.zeros(8 << 20, np.uint8)  # untouched pages (calloc)
    assert memory.advise_huge_pages(buf.ctypes.data, buf.nbytes)
    assert not memory.advise_huge_pages(buf.ctypes.data, 1 << 20)  # no whole 2 MiB page inside
    monkeypatch.setenv("TINYGPT_GGML_HUGE_PAGES", "0")
    assert not memory.advise_huge_pages(buf.ctypes.data, buf.nbytes)


@pytest.mark.parametrize("kv_type", ["f32", "f16"])
def test_cached_decode_through_the_head_major_cache_equals_a_full_prefill(tmp_path, kv_type):
    from quantize.ggml_llm import GgmlLLM
    from quantize.gguf_file import find_llm_file, open_gguf
    from quantize.random_model import write_random_model

    write_random_model(tmp_path, size="tiny", qtype="q8_0", seed=3, progress=False)
    f = open_gguf(find_llm_file(tmp_path, "q8_0"), "phi2")
    ids = list(range(200, 240))
    full = GgmlLLM(f, n_ctx=64, kv_type=kv_type).eval_tokens(ids, all_logits=True)
    step = GgmlLLM(f, n_ctx=64, kv_type=kv_type)
    step.eval_tokens(ids[:5])
    got = np.stack([step.eval_tokens([i]) for i in ids[5:]])
    tol = 2e-3 if kv_type == "f32" else 3e-2  # F16: flash attention accumulates V in F16
    assert np.abs(got - full[5:]).max() < tol * np.abs(full).max()


def test_this_build_reports_its_isa_levels_and_repacks_q4_for_avx2():
    levels = {name: bool(getattr(ggml, f"ggml_cpu_has_{name}")()) for name in
              ("avx2", "avx512", "avx512_vnni", "amx_int8")}
    print("ggml build on this CPU:", levels)  # shown with -s: which x86 level the logit tests ran on
    backend = ggml.ggml_backend_cpu_init()
    try:
        names = ggml_weights.extra_buffer_types(backend)
    finally:
        ggml.ggml_backend_free(backend)
    if levels["avx2"]:
        assert "CPU_REPACK" in names
    assert ("AMX" in names) == levels["amx_int8"]


_AMX_SCRIPT = """
import ctypes, sys
import numpy as np
import ggml
from quantize import ggml_weights
from quantize.gguf_file import find_llm_file, open_gguf
path, rows = sys.argv[1], int(sys.argv[2])
t = open_gguf(path, "phi2").tensors["blk.0.ffn_down.weight"]
ne = [int(x) for x in t.shape.tolist()]
backend = ggml.ggml_backend_cpu_init()
out = []
for name in ("CPU_REPACK", "AMX"):
    wctx = ggml.ggml_init(ggml.ggml_init_params(mem_size=4 * ggml.ggml_tensor_overhead(), mem_buffer=None,
                                                no_alloc=True))
    w = ggml.ggml_new_tensor(wctx, int(t.tensor_type), 2, (ctypes.c_int64 * 2)(*ne))
    buf = ggml.ggml_backend_alloc_ctx_tensors_from_buft(wctx, ggml_weights.extra_buffer_types(backend)[name])
    ggml.ggml_backend_tensor_set(w, t.data.ctypes.data, 0, t.data.nbytes)
    ctx = ggml.ggml_init(ggml.ggml_init_params(mem_size=16 * ggml.ggml_tensor_overhead() + ggml.ggml_graph_overhead(),
                                               mem_buffer=None, no_alloc=True))
    x = ggml.ggml_new_tensor_2d(ctx, ggml.GGML_TYPE_F32, ne[0], rows)
    y = ggml.ggml_mul_mat(ctx, w, x)
    gf = ggml.ggml_new_graph(ctx)
    ggml.ggml_build_forward_expand(gf, y)
    galloc = ggml.ggml_gallocr_new(ggml.ggml_backend_get_default_buffer_type(backend))
    ggml.ggml_gallocr_alloc_graph(galloc, gf)
    xs = np.random.default_rng(0).standard_normal((rows, ne[0])).astype(np.float32)
    ctypes.memmove(x.contents.data, xs.ctypes.data, xs.nbytes)
    ggml.ggml_backend_graph_compute(backend, gf)
    out.append(np.ctypeslib.as_array((ctypes.c_float * (ne[1] * rows)).from_address(y.contents.data)).copy())
err = np.abs(out[0] - out[1]).max() / np.abs(out[0]).max()
print("relative difference", err)
sys.exit(0 if err < 1e-3 else 1)
"""


def _amx_matmul(tmp_path, rows: int) -> subprocess.CompletedProcess:
    from quantize.gguf_file import find_llm_file
    from quantize.random_model import write_random_model

    write_random_model(tmp_path, size="tiny", qtype="q4_k", seed=4, progress=False)
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root))
    return subprocess.run([sys.executable, "-c", _AMX_SCRIPT, str(find_llm_file(tmp_path, "q4_k")), str(rows)],
                          capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.skipif(not ggml.ggml_cpu_has_amx_int8(), reason="this ggml build has no AMX buffer type")
def test_amx_buffer_single_token_matmul_matches_the_repacked_layout(tmp_path):
    result = _amx_matmul(tmp_path, rows=1)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "relative difference" in result.stdout


def test_biases_and_norm_weights_are_packed_into_one_array(tmp_path):
    from quantize.ggml_llm import GgmlLLM
    from quantize.gguf_file import find_llm_file, open_gguf
    from quantize.random_model import write_random_model

    write_random_model(tmp_path, size="tiny", qtype="q4_k", seed=6, progress=False)
    f = open_gguf(find_llm_file(tmp_path, "q4_k"), "phi2")
    small = [n for n, t in f.tensors.items() if int(t.tensor_type) == ggml.GGML_TYPE_F32 and len(t.shape) == 1]
    assert any(n.endswith(".bias") for n in small) and any(n.endswith("norm.weight") for n in small)
    llm = GgmlLLM(f, n_ctx=32)
    packed = llm.weights._small
    assert llm.weights.packed == len(small)
    start, end = packed.ctypes.data, packed.ctypes.data + packed.nbytes
    for name in small:
        t, data = llm.w[name], f.tensors[name].data
        assert start <= t.contents.data < end and (t.contents.data - start) % 64 == 0, name
        got = np.ctypeslib.as_array((ctypes.c_uint8 * data.nbytes).from_address(t.contents.data))
        assert np.array_equal(got, np.frombuffer(data, np.uint8)), name
    # everything else is where it was: matmul weights repacked, the embedding table in the file's map
    embd = "token_embd.weight"
    assert llm.repacked > 0 and llm.w[embd].contents.data == f.tensors[embd].data.ctypes.data
    llm.close()
