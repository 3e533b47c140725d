"""The PyTorch side of CPU inference on each x86 level: the int8 vision tower (fbgemm's dynamic-int8 Linears) and the
PyTorch LLM fallback give the same numbers with PyTorch held to AVX2 as with this CPU's best level (AVX-512 where it
has it). PyTorch lets a process pick its kernels (ATEN_CPU_CAPABILITY, FBGEMM_ENABLE_INSTRUCTIONS) before it imports
torch, so each level runs in its own child process. ggml-python builds one native variant and has no such switch:
its AVX2 path is measured with experiments/ggml_variant.sh instead (docs/benchmarks.md), and AMX per load in
tests/test_ggml_amx.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from quantize.bench_roofline import cpu_flags
from quantize.random_model import write_random_model

ROOT = Path(__file__).resolve().parents[1]

# the child: report the level PyTorch runs at, encode a fixed image with the int8 vision tower, evaluate a fixed prompt
# with the PyTorch LLM, save both
CHILD = """
import json, sys
import numpy as np, torch
from quantize import gguf_names as names
from quantize.gguf_file import find_llm_file, find_vision_file, open_gguf
from quantize.torch_llm import TorchLLM
from quantize.vision_runtime import VisionEncoder

pair, out = sys.argv[1], sys.argv[2]
encoder = VisionEncoder(open_gguf(find_vision_file(pair), names.ARCH_VISION), int8=True, n_threads=2)
side = encoder.image_size
pixels = torch.linspace(-1, 1, 3 * side * side).reshape(1, 3, side, side)
rows = encoder.encode_pixels(pixels)
llm = TorchLLM(open_gguf(find_llm_file(pair), names.ARCH_LLM), n_ctx=64, n_threads=2)
llm.eval_tokens([1, 5, 9, 13])
logits = llm.eval_embeddings(np.asarray(rows, np.float32).reshape(-1, llm.hp.hidden_size))
np.savez(out, rows=np.asarray(rows), logits=logits)
print(json.dumps({"capability": torch.backends.cpu.get_cpu_capability()}))
"""


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    out = tmp_path_factory.mktemp("pair")
    write_random_model(out, size="tiny", qtype="q4_k", seed=11, progress=False)
    return out


def _run(pair: Path, out: Path, level: str | None) -> tuple[str, dict]:
    env = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "FBGEMM_ENABLE_INSTRUCTIONS")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    if level is not None:
        env.update(ATEN_CPU_CAPABILITY=level.lower(), FBGEMM_ENABLE_INSTRUCTIONS=level.upper())
    done = subprocess.run([sys.executable, "-c", CHILD, str(pair), str(out)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    capability = json.loads(done.stdout.strip().splitlines()[-1])["capability"]
    with np.load(out) as saved:
        return capability, {k: saved[k] for k in saved.files}


@pytest.mark.skipif("avx2" not in cpu_flags()[1], reason="this CPU has no AVX2")
@pytest.mark.skipif("avx512f" not in cpu_flags()[1],
                    reason="this CPU has AVX2 but no AVX-512: its best level is AVX2 itself, so the two children would "
                           "run the same kernels and the comparison could not fail (it runs on AVX-512 CPUs)")
def test_avx2_kernels_give_the_numbers_of_the_best_level(pair, tmp_path):
    best_level, best = _run(pair, tmp_path / "best.npz", None)
    avx2_level, avx2 = _run(pair, tmp_path / "avx2.npz", "avx2")
    assert avx2_level == "AVX2", f"PyTorch ran at {avx2_level} although held to AVX2"
    assert best_level in ("AVX2", "AVX512"), best_level
    for name in ("rows", "logits"):
        assert np.isfinite(avx2[name]).all() and avx2[name].shape == best[name].shape
        scale = float(np.abs(best[name]).max())
        assert scale > 0, f"{name}: all zero"
        err = float(np.abs(avx2[name] - best[name]).max())
        assert err <= 1e-4 * scale, f"{name}: AVX2 ({avx2_level}) differs from {best_level} by {err} (scale {scale})"
