"""What the bench prints about the machine and the memory roofline of a decode step.

Contract:
  * `weight_bytes_per_token(path)`: bytes of weights one single-token step must read from memory: every tensor of the
    LLM file except the token embedding table (a step reads one row of it). At R bytes/s of read bandwidth a step
    cannot take less than weight_bytes / R: the roofline.
  * `cpu_flags()`: the x86 SIMD levels the kernel reports in /proc/cpuinfo (avx2, avx512f, avx512_vnni, amx_int8, ...)
    and the CPU's model name; `ggml_features()`: the same levels as our ggml build reports them (compiled in and
    present), `stock_features()`: llama.cpp's system-info line when llama-cpp-python is importable.
  * `roofline_ms(weight_bytes, bandwidth_gb_s)` and `share(roofline_ms, decode_ms)`: the floor and an engine's share of
    it (1.0 = decoding at the bandwidth limit).
  * `BandwidthProbe(n_bytes, threads).read()`: read bandwidth in GB/s over one array that stays put between readings;
    `finish()` takes the last reading, frees the array and returns every reading.
  * `steady(before, after)`: whether two reads of the bandwidth, taken on either side of a measurement, agree within
    STEADY; where they do not, the host moved the process's CPUs (or its memory) while it ran, and a share computed
    from either reading would be a mix of two machines. `beside(readings)`: the table's text for such a pair and the
    bandwidth to use (None where it moved).
"""
from __future__ import annotations

import os
import time
from pathlib import Path

# the levels that pick ggml's x86 kernels, in /proc/cpuinfo spelling
X86_LEVELS = ("avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
              "avx512vbmi", "amx_tile", "amx_int8", "amx_bf16")
_GGML_FEATURES = ("avx2", "avx_vnni", "avx512", "avx512_vbmi", "avx512_vnni", "avx512_bf16", "amx_int8")


def weight_bytes_per_token(path: str | os.PathLike) -> int:
    from . import gguf_names as names
    from .gguf_file import open_gguf

    f = open_gguf(Path(path), names.ARCH_LLM)
    return sum(int(t.data.nbytes) for name, t in f.tensors.items() if name != "token_embd.weight")


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> tuple[str, list[str]]:
    """(model name, the X86_LEVELS present) of the first CPU in cpuinfo; ("unknown", []) where it cannot be read."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return "unknown", []
    model, flags = "unknown", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and model == "unknown":
            model = value.strip()
        elif key.strip() == "flags" and not flags:
            flags = set(value.split())
    return model, [f for f in X86_LEVELS if f in flags]


def ggml_features() -> str:
    """Our ggml-python build: version and the x86 features it was compiled with and finds on this CPU."""
    try:
        import ggml
    except Exception as exc:
        return f"ggml-python not importable ({type(exc).__name__})"
    have = [f for f in _GGML_FEATURES if getattr(ggml, f"ggml_cpu_has_{f}", lambda: 0)()]
    version = ggml.ggml_version().decode() if hasattr(ggml, "ggml_version") else "?"
    return f"ggml-python {ggml.__version__} (ggml {version}): {' '.join(have) or 'no x86 SIMD'}"


def stock_features() -> str | None:
    """llama-cpp-python's version and llama.cpp's system-info line (its CPU features), or None if not importable."""
    try:
        import llama_cpp
    except Exception:
        return None
    info = llama_cpp.llama_print_system_info()
    info = info.decode(errors="replace") if isinstance(info, bytes) else str(info)
    keep = [part.strip() for part in info.split("|") if "= 1" in part or "CPU" in part.upper()]
    return f"llama-cpp-python {llama_cpp.__version__}: {' | '.join(keep)[:400]}"


STEADY = 0.85  # the lower of two readings at least this fraction of the higher


class BandwidthProbe:
    """n_bytes of float32 touched once, on huge pages where the kernel takes the advice (`huge`; else ordinary 4 KiB
    pages): `read()` is the best of `passes` torch.sum passes over them at `threads` threads, in GB/s, also kept in
    `readings`. Readings of one probe share its pages, so they differ only where the machine did (a second array can
    land on 4 KiB pages where the first got huge ones: 30 against 70 GB/s on the EPYC)."""

    def __init__(self, n_bytes: int, threads: int, huge: bool = True):
        import numpy as np
        import torch

        from .memory import huge_page_array

        torch.set_num_threads(int(threads))
        self.nbytes = int(n_bytes) // 4 * 4
        self.readings: list[float] = []
        self.huge = False
        if huge:
            raw, self.huge = huge_page_array(self.nbytes)
            self._x = torch.from_numpy(raw.view(np.float32))
        else:
            self._x = torch.empty(self.nbytes // 4, dtype=torch.float32)
        self._x.fill_(1.0)
        float(self._x.sum())  # warm-up: thread pool started

    def seconds(self, passes: int) -> list[float]:
        """Each pass's time."""
        times = []
        for _ in range(passes):
            t0 = time.perf_counter()
            float(self._x.sum())
            times.append(time.perf_counter() - t0)
        return times

    def read(self, passes: int = 5) -> float:
        self.readings.append(self.nbytes / min(self.seconds(passes)) / 1e9)
        return self.readings[-1]

    def finish(self) -> tuple[float, ...]:
        """A last reading (after the measurement it brackets), the array freed: every reading, first to last."""
        self.read()
        self.close()
        return tuple(self.readings)

    def close(self) -> None:
        self._x = None


def steady(before: float, after: float) -> bool:
    return min(before, after) >= STEADY * max(before, after)


def beside(readings: tuple[float, float]) -> tuple[str, float | None]:
    """Two readings taken on either side of a measurement: ("37.8 / 36.8", the bandwidth to use: the higher one), or
    ("37.9 / 65.8 moved", None) where they disagree."""
    before, after = readings
    text = f"{before:.1f} / {after:.1f}"
    return (text, max(before, after)) if steady(before, after) else (text + " moved", None)


def roofline_ms(weight_bytes: int, bandwidth_gb_s: float) -> float:
    return weight_bytes / (bandwidth_gb_s * 1e9) * 1000.0


def share(floor_ms: float, decode_ms: float) -> float:
    return floor_ms / decode_ms
