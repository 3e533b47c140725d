"""Write a GGUF file tensor by tensor (low memory), atomically, and summarise what was written.

The caller gives the metadata (a list of KV), a plan (name, numpy shape, GGML type per tensor) and a function that
produces one float32 tensor at a time; each tensor is quantized and appended, then dropped. The file appears under
its final name only when complete (temporary name + os.replace), so an interrupted export leaves nothing behind;
``write_gguf_to`` writes to a temporary name the caller commits (an export commits its two files together).
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from gguf import GGMLQuantizationType, GGUFValueType, GGUFWriter

from tinygpt.io_utils import atomic_path, make_readable  # noqa: F401  (make_readable: re-exported)

from .qtypes import choose_type, nbytes, quantize

T = GGMLQuantizationType


@dataclass(frozen=True)
class KV:
    """One metadata entry: key, value, GGUF value type (and the element type for arrays)."""
    key: str
    value: Any
    vtype: GGUFValueType
    sub_type: GGUFValueType | None = None


def kv_u32(key: str, value: int) -> KV:
    return KV(key, int(value), GGUFValueType.UINT32)


def kv_f32(key: str, value: float) -> KV:
    return KV(key, float(value), GGUFValueType.FLOAT32)


def kv_str(key: str, value: str) -> KV:
    return KV(key, str(value), GGUFValueType.STRING)


def kv_bool(key: str, value: bool) -> KV:
    return KV(key, bool(value), GGUFValueType.BOOL)


def kv_array(key: str, values: Sequence[Any], sub_type: GGUFValueType) -> KV:
    return KV(key, list(values), GGUFValueType.ARRAY, sub_type)


@dataclass(frozen=True)
class TensorPlan:
    """One tensor of the file: GGUF name, numpy shape ([out, in] for a Linear weight), stored and asked-for type."""
    name: str
    shape: tuple[int, ...]
    qtype: GGMLQuantizationType
    requested: GGMLQuantizationType

    @property
    def nbytes(self) -> int:
        return nbytes(self.shape, self.qtype)

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def fell_back(self) -> bool:
        return self.qtype != self.requested


def plan_tensor(name: str, shape: Sequence[int], wanted: GGMLQuantizationType) -> TensorPlan:
    """Plan `name` in `wanted`, widened by llama.cpp's fallback rule when its rows do not fill whole blocks."""
    shape = tuple(int(s) for s in shape)
    stored = wanted if wanted in (T.F32, T.F16) else choose_type(wanted, shape)
    return TensorPlan(name, shape, stored, wanted)


@dataclass
class FileSummary:
    """What one written GGUF file holds; `bits_per_weight*` count tensor data bytes only (no header)."""
    path: str
    size_bytes: int
    n_tensors: int
    n_params: int
    data_bytes: int
    n_params_2d: int
    data_bytes_2d: int
    tensors_per_type: dict[str, int] = field(default_factory=dict)
    fallbacks: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.data_bytes / max(self.n_params, 1)

    @property
    def bits_per_weight_2d(self) -> float:
        return 8.0 * self.data_bytes_2d / max(self.n_params_2d, 1)

    def to_dict(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        out["bits_per_weight"] = round(self.bits_per_weight, 4)
        out["bits_per_weight_2d"] = round(self.bits_per_weight_2d, 4)
        out["seconds"] = round(self.seconds, 2)
        return out

    def lines(self) -> list[str]:
        types = ", ".join(f"{k} {v}" for k, v in sorted(self.tensors_per_type.items()))
        out = [
            f"{Path(self.path).name}: {self.size_bytes / 2**20:,.1f} MiB, {self.n_tensors} tensors ({types}), "
            f"{self.n_params:,} weights, {self.bits_per_weight:.2f} bits/weight overall, "
            f"{self.bits_per_weight_2d:.2f} for the 2-D weights, written in {self.seconds:.1f} s"
        ]
        if self.fallbacks:
            out.append(f"  {len(self.fallbacks)} tensor(s) fell back to a wider type (rows do not fill whole blocks):")
            out += [f"    {f}" for f in self.fallbacks]
        return out


def summarize(path: Path, plans: Sequence[TensorPlan], seconds: float, size_bytes: int | None = None) -> FileSummary:
    per_type: dict[str, int] = {}
    for p in plans:
        per_type[p.qtype.name] = per_type.get(p.qtype.name, 0) + 1
    two_d = [p for p in plans if len(p.shape) == 2]
    return FileSummary(
        path=str(path),
        size_bytes=path.stat().st_size if size_bytes is None else size_bytes,
        n_tensors=len(plans),
        n_params=sum(p.n_elements for p in plans),
        data_bytes=sum(p.nbytes for p in plans),
        n_params_2d=sum(p.n_elements for p in two_d),
        data_bytes_2d=sum(p.nbytes for p in two_d),
        tensors_per_type=per_type,
        fallbacks=[f"{p.name} {list(p.shape)}: {p.requested.name} -> {p.qtype.name}" for p in plans if p.fell_back],
        seconds=seconds,
    )


def write_gguf(
    path: str | Path,
    arch: str,
    metadata: Sequence[KV],
    plans: Sequence[TensorPlan],
    produce: Callable[[TensorPlan], np.ndarray],
    progress: bool = True,
) -> FileSummary:
    """Write `path` atomically; `produce(plan)` returns the float tensor of numpy shape `plan.shape`."""
    path = Path(path)
    with atomic_path(path) as tmp:
        summary = write_gguf_to(tmp, path, arch, metadata, plans, produce, progress)
    return summary


def write_gguf_to(
    tmp: Path,
    path: Path,
    arch: str,
    metadata: Sequence[KV],
    plans: Sequence[TensorPlan],
    produce: Callable[[TensorPlan], np.ndarray],
    progress: bool = True,
) -> FileSummary:
    """Write the GGUF file to `tmp` (the caller renames it to `path`, e.g. with tinygpt.io_utils.atomic_paths)."""
    start = time.perf_counter()
    total = sum(p.nbytes for p in plans)
    writer = GGUFWriter(tmp, arch)
    try:
        for kv in metadata:
            if kv.vtype == GGUFValueType.ARRAY and len(kv.value) == 0:
                continue  # GGUF has no empty arrays; a reader treats a missing key as empty
            writer.add_key_value(kv.key, kv.value, kv.vtype, kv.sub_type)
        for p in plans:
            writer.add_tensor_info(p.name, p.shape, np.dtype(np.float32), p.nbytes, raw_dtype=p.qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        done = 0
        bar = _Progress(path.name, len(plans), total, progress)
        for i, p in enumerate(plans):
            array = np.asarray(produce(p), dtype=np.float32)
            if tuple(array.shape) != p.shape:
                raise ValueError(f"{p.name}: produced shape {list(array.shape)}, planned {list(p.shape)}")
            data = quantize(array, p.qtype).data
            del array
            writer.write_tensor_data(data)
            done += p.nbytes
            bar.update(i + 1, done)
        writer.flush()
    finally:
        writer.close()
    bar.close()
    return summarize(path, plans, time.perf_counter() - start, size_bytes=tmp.stat().st_size)


class _Progress:
    """One status line on stderr: rewritten in place on a terminal, a new line every 10 s otherwise."""

    def __init__(self, label: str, n: int, total: int, enabled: bool):
        self.label, self.n, self.total, self.enabled = label, n, total, enabled
        self.tty = sys.stderr.isatty()
        self.start = self.last = time.perf_counter()

    def update(self, i: int, done: int) -> None:
        now = time.perf_counter()
        if not self.enabled or (i < self.n and now - self.last < (0.5 if self.tty else 10.0)):
            return
        self.last = now
        elapsed = now - self.start
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - done) / rate if rate > 0 else 0.0
        text = (f"{self.label}: tensor {i}/{self.n}, {done / 2**20:,.0f}/{self.total / 2**20:,.0f} MiB, "
                f"{elapsed:.0f} s elapsed, ETA {eta:.0f} s")
        print(("\r" + text + "   ") if self.tty else text, end="" if self.tty else "\n", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.enabled and self.tty:
            print(file=sys.stderr)
