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
  * `open_entry` returns a `Reader` whose `get(torch layer name)` reads that layer's (int8 [out, in], float64 scales
    [out]) when it is asked for, or None (missing, unreadable, or not holding every layer asked for: the caller
    rebuilds, and a `Writer` then replaces the entry); every array carries its CRC-32 (the header's __metadata__),
    checked when it is read: a damaged array raises OSError (the caller rebuilds that layer) and removes the entry, so
    the next load writes it again (the check reads at ~4 GB/s: ~0.3 s of the full-size tower's 1.1 GB);
  * `Writer` streams a new entry (safetensors format) into a temporary file while the layers are built and renames it
    into place when all are written (a crash never leaves a half-written entry under the real name); the temporary
    is the writer's own (process id + a serial), so two writers of the same entry, in two processes or on two threads
    of one, each commit a whole file (the last rename wins; both hold the same rows); temporaries over an hour old
    (a process killed while writing) are removed; it keeps the KEEP newest entries, and a failure (read-only or full
    disk) costs only a one-line notice;
  * TINYGPT_VISION_CACHE=0 turns the cache off; it lives in vision-int8/ under the tinygpt cache root
    (tinygpt.paths.cache_root: TINYGPT_CACHE, default ~/.cache/tinygpt).
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import struct
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import torch

from tinygpt.paths import cache_root

from . import gguf_names as names
from .gguf_file import GGUFContents

ENV = "TINYGPT_VISION_CACHE"
KEEP = 2  # cache entries kept (each about the size of vision.gguf)
FORMAT = "2"  # bump when what is stored changes (2: a CRC-32 per array)


_SERIAL = itertools.count()  # the writers of this process, for their temporary files' names (next() is atomic)

CRC_KEY = "__metadata__"  # safetensors' string-to-string metadata: array name -> its CRC-32, 8 hex digits


def _crc(array: np.ndarray) -> str:
    return f"{zlib.crc32(memoryview(np.ascontiguousarray(array)).cast('B')):08x}"


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


class Reader:
    """One entry's layers, read one at a time with pread (`get(name)` -> (int8 [out, in], float64 scales [out])), so a
    load never holds the whole entry next to the layers built from it, and no memory map of it counts in the resident
    set. Safe to call from several threads."""

    _DTYPES = {"I8": np.int8, "F64": np.float64}

    def __init__(self, fd: int, data_start: int, header: dict, path: Path):
        self._fd, self._data_start, self._header, self._path = fd, data_start, header, path

    def _read(self, key: str) -> torch.Tensor:
        info = self._header[key]
        begin, end = info["data_offsets"]
        array = np.empty(info["shape"], self._DTYPES[info["dtype"]])
        if os.preadv(self._fd, [memoryview(array).cast("B")], self._data_start + begin) != end - begin:
            raise OSError(f"{key}: short read")
        if _crc(array) != self._header[CRC_KEY][key]:
            self._path.unlink(missing_ok=True)  # damaged: the next load writes the entry again
            raise OSError(f"{self._path}: {key} fails its CRC-32")
        return torch.from_numpy(array)

    def get(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self._read(f"{name}.weight"), self._read(f"{name}.scale")

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def open_entry(path: Path | None, layers: list[str]) -> Reader | None:
    """A Reader of the entry at `path` when it holds every name in `layers` with int8 rows and float64 scales of
    matching shapes; None when it is missing, unreadable, truncated or incomplete (then the caller rebuilds the layers
    and writes the entry again with a Writer)."""
    if path is None or not path.is_file():
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        size = os.fstat(fd).st_size
        (length,) = struct.unpack("<Q", os.pread(fd, 8, 0))
        if length > size:
            raise ValueError("header past the end")
        header = json.loads(os.pread(fd, length, 8))
        crcs = header[CRC_KEY]
        for n in layers:
            w, sc = header[f"{n}.weight"], header[f"{n}.scale"]
            if (w["dtype"], sc["dtype"]) != ("I8", "F64") or len(w["shape"]) != 2 or sc["shape"] != w["shape"][:1]:
                raise ValueError(f"{n}: not int8 rows with float64 scales")
            if not all(len(crcs[f"{n}.{part}"]) == 8 for part in ("weight", "scale")):
                raise ValueError(f"{n}: no CRC-32")
            for info, itemsize in ((w, 1), (sc, 8)):
                begin, end = info["data_offsets"]
                if end - begin != itemsize * int(np.prod(info["shape"])) or 8 + length + end > size:
                    raise ValueError(f"{n}: truncated")
    except Exception:  # a truncated, foreign or incomplete file: rebuild
        os.close(fd)
        return None
    os.utime(path)  # most recently used: kept by the pruning in Writer.commit()
    return Reader(fd, 8 + length, header, path)


class Writer:
    """Writes one cache entry while the layers are being built: the safetensors header first (every layer's shape is
    known), then each layer's int8 rows and scales at their own offsets as a worker thread produces them (`put` is
    safe to call from several threads), so no second copy of the weights is ever held. `commit` renames the finished
    file into place and prunes old entries; any OSError turns the writer off with a one-line notice."""

    def __init__(self, path: Path, shapes: dict[str, tuple[int, int]]):
        self.path, self._fd, self._lock = path, None, threading.Lock()
        # a temporary of this writer's own: another process (pid) or another writer of the same entry in this process
        # (two threads loading the same file: the serial) never truncates, renames or removes it
        self._tmp = path.with_name(f".{path.name}.{os.getpid()}.{next(_SERIAL)}.tmp")
        header, self._offsets, offset = {}, {}, 0
        for name, (rows, cols) in shapes.items():
            for key, dtype, shape, size in ((f"{name}.weight", "I8", [rows, cols], rows * cols),
                                            (f"{name}.scale", "F64", [rows], 8 * rows)):
                header[key] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
                self._offsets[key] = offset
                offset += size
        self._header, self._crcs = header, {key: "0" * 8 for key in self._offsets}  # CRCs filled in by put
        text = self._header_bytes()
        self._data_start, self._size = 8 + len(text), offset
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self._tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.pwrite(self._fd, struct.pack("<Q", len(text)) + text, 0)
        except OSError as exc:
            self._fail(exc)

    def _header_bytes(self) -> bytes:
        """The header, padded to 8 bytes; the same length whatever the CRCs (8 hex digits each)."""
        text = json.dumps({CRC_KEY: self._crcs, **self._header}, separators=(",", ":")).encode()
        return text + b" " * (-len(text) % 8)

    def put(self, name: str, qweight: torch.Tensor) -> None:
        if self._fd is None:
            return
        rows = qweight.int_repr().numpy()
        scales = qweight.q_per_channel_scales().to(torch.float64).numpy()
        arrays = {f"{name}.weight": rows, f"{name}.scale": scales}
        crcs = {key: _crc(array) for key, array in arrays.items()}
        with self._lock:  # a failure in one thread closes the file: no other thread writes through a closed fd
            if self._fd is None:
                return
            try:
                for key, array in arrays.items():
                    os.pwrite(self._fd, memoryview(np.ascontiguousarray(array)).cast("B"),
                              self._data_start + self._offsets[key])
                    self._crcs[key] = crcs[key]  # an array never put keeps "00000000" and fails its check
            except OSError as exc:
                self._fail(exc)

    def commit(self) -> bool:
        """Whether the entry is now in place."""
        if self._fd is None:
            return False
        try:
            os.ftruncate(self._fd, self._data_start + self._size)
            text = self._header_bytes()
            os.pwrite(self._fd, struct.pack("<Q", len(text)) + text, 0)
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
