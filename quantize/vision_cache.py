"""The int8 vision tower's Linear weights cached on disk, so that a later load does not rebuild them.

Building the int8 vision tower (quantize.vision_runtime) dequantises every Q8_0 Linear weight of vision.gguf and
requantises it with one scale per output row: two thirds of the tower's build time (full size: 7.6 s of the 11 s
that opening a session takes on a 2-core Zen 4, docs/benchmarks.md). The result depends only on the file, so the
first load writes the int8 rows and their scales to one safetensors file under the tinygpt cache, and every later
load of the same file reads them back and only prepacks them for fbgemm.

Contract:
  * the key is the file's model_id (a hash of the exported model's content), its size and every Linear weight's name,
    type and shape: another export, another type or a file of another shape is another entry; a file without a
    model_id is never cached;
  * `load` returns {torch layer name: (int8 [out, in], float64 scales [out])} or None (missing, unreadable, or not
    holding every layer asked for: the caller rebuilds, and a `Writer` then replaces the entry);
  * `Writer` streams a new entry (safetensors format) into a temporary file while the layers are built and renames it
    into place when all are written (a crash never leaves a half-written entry under the real name); it keeps the
    KEEP newest entries, and a failure (read-only or full disk) costs only a one-line notice;
  * TINYGPT_VISION_CACHE=0 turns the cache off; it lives in vision-int8/ under the tinygpt cache root
    (tinygpt.paths.cache_root: TINYGPT_CACHE, default ~/.cache/tinygpt).
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from tinygpt.paths import cache_root

from . import gguf_names as names
from .gguf_file import GGUFContents

ENV = "TINYGPT_VISION_CACHE"
KEEP = 2  # cache entries kept (each about the size of vision.gguf)
FORMAT = "1"  # bump when what is stored changes


def _root() -> Path:
    return cache_root() / "vision-int8"


def cache_file(vision: GGUFContents, linear_weights: list[str]) -> Path | None:
    """Where the int8 weights of this vision file live in the cache; None when caching is off or impossible."""
    model_id = vision.metadata.get(names.VISION_MODEL_ID)
    if os.environ.get(ENV, "").strip() == "0" or not model_id:
        return None
    h = hashlib.sha256(f"{FORMAT}|{model_id}|{Path(vision.path).stat().st_size}".encode())
    for gguf_name in sorted(linear_weights):
        t = vision.tensors[gguf_name]
        h.update(f"|{gguf_name}:{int(t.tensor_type)}:{list(t.shape)}".encode())
    return _root() / f"{h.hexdigest()[:32]}.safetensors"


def load(path: Path | None, layers: list[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]] | None:
    """The cached (int8 weight, scales) of every name in `layers`, or None (then the caller rebuilds them and writes
    the entry again with a Writer)."""
    if path is None or not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            stored = set(f.keys())
            if not all(f"{n}.weight" in stored and f"{n}.scale" in stored for n in layers):
                return None
            out = {n: (f.get_tensor(f"{n}.weight"), f.get_tensor(f"{n}.scale")) for n in layers}
    except Exception:  # a truncated or foreign file: rebuild
        return None
    if any(w.dtype != torch.int8 or s.dtype != torch.float64 or s.shape != w.shape[:1] for w, s in out.values()):
        return None
    os.utime(path)  # most recently used: kept by the pruning in Writer.commit()
    return out


class Writer:
    """Writes one cache entry while the layers are being built: the safetensors header first (every layer's shape is
    known), then each layer's int8 rows and scales at their own offsets as a worker thread produces them (`put` is
    safe to call from several threads), so no second copy of the weights is ever held. `commit` renames the finished
    file into place and prunes old entries; any OSError turns the writer off with a one-line notice."""

    def __init__(self, path: Path, shapes: dict[str, tuple[int, int]]):
        self.path, self._fd = path, None
        self._tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        header, self._offsets, offset = {}, {}, 0
        for name, (rows, cols) in shapes.items():
            for key, dtype, shape, size in ((f"{name}.weight", "I8", [rows, cols], rows * cols),
                                            (f"{name}.scale", "F64", [rows], 8 * rows)):
                header[key] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
                self._offsets[key] = offset
                offset += size
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        self._data_start, self._size = 8 + len(text), offset
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self._tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.pwrite(self._fd, struct.pack("<Q", len(text)) + text, 0)
        except OSError as exc:
            self._fail(exc)

    def put(self, name: str, qweight: torch.Tensor) -> None:
        if self._fd is None:
            return
        rows = qweight.int_repr().numpy()
        scales = qweight.q_per_channel_scales().to(torch.float64).numpy()
        try:
            for key, array in ((f"{name}.weight", rows), (f"{name}.scale", scales)):
                os.pwrite(self._fd, memoryview(np.ascontiguousarray(array)).cast("B"),
                          self._data_start + self._offsets[key])
        except OSError as exc:
            self._fail(exc)

    def commit(self) -> bool:
        """Whether the entry is now in place."""
        if self._fd is None:
            return False
        try:
            os.ftruncate(self._fd, self._data_start + self._size)
            os.close(self._fd)
            self._fd = None
            self._tmp.replace(self.path)
            entries = sorted(self.path.parent.glob("*.safetensors"), key=lambda p: p.stat().st_mtime, reverse=True)
            for old in entries[KEEP:]:
                old.unlink(missing_ok=True)
            for stale in self.path.parent.glob(".*.tmp"):  # left by a process killed while writing
                if time.time() - stale.stat().st_mtime > 3600:
                    stale.unlink(missing_ok=True)
        except OSError as exc:
            self._fail(exc)
        return self.path.is_file()

    def abort(self) -> None:
        """Drop the unfinished entry (the build failed)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        try:
            self._tmp.unlink(missing_ok=True)
        except OSError:
            pass

    def _fail(self, exc: OSError) -> None:
        self.abort()
        print(f"notice: the int8 vision tower was not cached ({exc.__class__.__name__}: {exc}); the next load "
              f"builds it again ({ENV}=0 turns the cache off)", file=sys.stderr)
