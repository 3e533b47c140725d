"""ggml's AVX2 kernels, forced: ggml-python builds one native variant (AVX-512 on an AVX-512 CPU) and cannot load
another at run time, so this test builds the lock's ggml-python a second time for AVX2 only
(experiments/ggml_variant.sh avx2 --build-only; about half a minute on two cores) and runs the GGUF runtime on both
builds in child processes: the AVX2 build reports AVX2 without AVX-512, and prefill, a cached decode step and image
rows give the native build's logits, on repacked and on plain weights, Q4_K and Q4_0. It needs the ggml-python sdist
(.whl/ or PyPI) and skips where neither can be had or the CPU has no AVX2, and on a CPU without AVX-512, whose
native build is the AVX2 level already."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("ggml")

from quantize.bench_roofline import cpu_flags  # noqa: E402
from quantize.random_model import write_random_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import json, sys
import numpy as np
from quantize import gguf_names as names
from quantize.bench_roofline import ggml_features
from quantize.gguf_file import find_llm_file, open_gguf
from quantize.ggml_llm import GgmlLLM

pairs, out = sys.argv[1:-1], sys.argv[-1]
saved, info = {}, {"features": ggml_features()}
for pair in pairs:
    for repack in (True, False):
        llm = GgmlLLM(open_gguf(find_llm_file(pair), names.ARCH_LLM), n_ctx=64, repack=repack, amx=False)
        prompt = llm.eval_tokens(list(range(1, 40, 3)))                      # prefill: the GEMM kernels
        step = llm.eval_tokens([7])                                          # the cached decode graph: GEMV
        rows = np.linspace(-1, 1, 4 * llm.hp.hidden_size, dtype=np.float32).reshape(4, -1)
        image = llm.eval_embeddings(rows)
        key = pair.rsplit("/", 1)[-1] + ("-repacked" if repack else "-plain")
        saved[key] = np.stack([prompt, step, image])
        info[key] = llm.repacked
        llm.close()
np.savez(out, **saved)
print(json.dumps(info))
"""


def _lock_pin() -> str:
    line = next(x for x in (ROOT / "requirements.lock").read_text().splitlines() if x.startswith("ggml-python=="))
    return line.split()[0]


@pytest.fixture(scope="module")
def avx2_build(tmp_path_factory) -> Path:
    flags = cpu_flags()[1]
    if "avx2" not in flags:
        pytest.skip("this CPU has no AVX2")
    if "avx512f" not in flags:  # the build takes 1-1.5 min of a slow 2-core CI machine for a comparison that can't fail
        pytest.skip("this CPU has AVX2 but no AVX-512: the native build runs the AVX2 kernels already (the whole "
                    "suite exercises them); forcing AVX2 below the native level needs an AVX-512 CPU")
    work = tmp_path_factory.mktemp("ggml-avx2")
    pin = _lock_pin()
    sdist = ROOT / ".whl" / f"ggml_python-{pin.split('==')[1]}.tar.gz"
    if not sdist.exists():
        got = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                              "-d", str(work / "sdist"), pin], capture_output=True, text=True, timeout=300)
        found = sorted((work / "sdist").glob("ggml_python-*.tar.gz"))
        if got.returncode != 0 or not found:
            pytest.skip(f"cannot download the {pin} sdist (offline?): {got.stderr.strip()[-300:]}")
        sdist = found[0]
    env = dict(os.environ, DIR=str(work / "ggml"), SDIST=str(sdist), PY=sys.executable)
    built = subprocess.run(["bash", str(ROOT / "experiments" / "ggml_variant.sh"), "avx2", "--build-only"],
                           env=env, capture_output=True, text=True, timeout=900)
    assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-4000:]
    return work / "ggml"


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("pairs")
    for qtype in ("q4_k", "q4_0"):
        write_random_model(root / qtype, size="tiny", qtype=qtype, seed=5, progress=False)
    return [root / "q4_k", root / "q4_0"]


def _run(pairs: list[Path], out: Path, ggml_dir: Path | None) -> tuple[dict, dict]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(([str(ggml_dir)] if ggml_dir else []) + [str(ROOT)]
                                        + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    done = subprocess.run([sys.executable, "-c", CHILD, *map(str, pairs), str(out)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    info = json.loads(done.stdout.strip().splitlines()[-1])
    with np.load(out) as saved:
        return info, {k: saved[k] for k in saved.files}


def test_the_avx2_build_gives_the_native_builds_logits(avx2_build, pairs, tmp_path):
    native_info, native = _run(pairs, tmp_path / "native.npz", None)
    avx2_info, avx2 = _run(pairs, tmp_path / "avx2.npz", avx2_build)
    features = avx2_info["features"].split(":", 1)[1].split()
    assert "avx2" in features and not any(f.startswith("avx512") or f == "amx_int8" for f in features), \
        avx2_info["features"]
    assert sorted(avx2) == sorted(native) == sorted(f"{q}-{lay}" for q in ("q4_k", "q4_0")
                                                    for lay in ("repacked", "plain"))
    for key in native:
        # the repacked layout is the one decode uses; both builds must have taken it
        assert avx2_info[key] == native_info[key] and (native_info[key] > 0) == key.endswith("repacked"), key
        scale = float(np.abs(native[key]).max())
        assert np.isfinite(avx2[key]).all() and scale > 0, key
        err = float(np.abs(avx2[key] - native[key]).max())
        assert err <= 1e-4 * scale, f"{key}: AVX2 differs from {native_info['features']} by {err} (scale {scale})"
