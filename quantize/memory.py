"""Memory advice for large, long-lived buffers (Linux transparent huge pages).

Contract: `advise_huge_pages(address, size)` asks the kernel (madvise MADV_HUGEPAGE) to back the 2 MiB-aligned part of
[address, address + size) with 2 MiB pages, and says whether the advice was taken. Call it before the buffer is first
written, so its pages are born huge. It is a no-op returning False off Linux, where transparent huge pages are "never",
for a range holding no whole 2 MiB page, or with TINYGPT_GGML_HUGE_PAGES=0 in the environment. `huge_page_array(nbytes)`
returns an advised, untouched, zero-filled uint8 array of nbytes, 2 MiB-aligned where the advice is taken.
`release_pages(array)` gives the whole pages inside an anonymous array back to the kernel (they read as zeros
afterwards). `drop_pages(mm, data)` tells the kernel the file pages behind `data` (a view of the np.memmap `mm`) are no
longer needed, once a copy of them exists (repacked LLM weights, the vision tower's int8 layers): they leave the
process's resident set. No dependency beyond numpy and ctypes (the bench's bandwidth probe uses it without ggml).
"""
from __future__ import annotations

import ctypes
import mmap
import os
import sys

import numpy as np

_MADV_HUGEPAGE = 14  # linux/mman.h
HUGE_PAGE = 2 << 20


def _madvise(address: int, size: int, advice: int, unit: int) -> bool:
    """madvise(advice) on the whole `unit`-sized pages inside [address, address + size); False when there is none or
    the kernel refuses."""
    start = -(-int(address) // unit) * unit
    end = (int(address) + int(size)) // unit * unit
    if end <= start:
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    libc.madvise.restype = ctypes.c_int
    return libc.madvise(start, end - start, advice) == 0


def advise_huge_pages(address: int, size: int) -> bool:
    if not sys.platform.startswith("linux") or os.environ.get("TINYGPT_GGML_HUGE_PAGES", "1") == "0":
        return False
    return _madvise(address, size, _MADV_HUGEPAGE, HUGE_PAGE)


def huge_page_array(nbytes: int) -> tuple[np.ndarray, bool]:
    """(an untouched, zero-filled uint8 array of nbytes starting on a 2 MiB boundary, whether the huge-page advice was
    taken)."""
    raw = np.zeros(nbytes + HUGE_PAGE, np.uint8)  # calloc: large ones are fresh mmap'd pages, untouched until written
    start = -raw.ctypes.data % HUGE_PAGE
    view = raw[start:start + nbytes]
    return view, advise_huge_pages(view.ctypes.data, view.nbytes)


def drop_pages(mm: np.memmap, data: np.ndarray) -> None:
    raw = getattr(mm, "_mmap", None)
    if raw is None or not hasattr(raw, "madvise"):
        return
    start = data.ctypes.data - mm.ctypes.data
    page = mmap.PAGESIZE
    first = -(-start // page) * page
    last = (start + data.nbytes) // page * page
    if last > first:
        raw.madvise(mmap.MADV_DONTNEED, first, last - first)


def release_pages(array: np.ndarray) -> None:
    """MADV_DONTNEED on the whole pages inside `array` (anonymous memory, e.g. from huge_page_array): they leave the
    resident set now instead of when the array is freed. No-op off Linux."""
    if sys.platform.startswith("linux"):
        _madvise(array.ctypes.data, array.nbytes, mmap.MADV_DONTNEED, mmap.PAGESIZE)
