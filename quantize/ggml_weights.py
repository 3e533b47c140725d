"""The LLM file's tensors as ggml tensors for quantize.ggml_llm.GgmlLLM: where each weight lives and in which layout.

Contract:
  * `GgmlWeights(file, backend, repack)`: `w` maps every tensor name of the file to a ggml tensor. With repack, the
    matmul weights of a type ggml can repack (Q4_0, Q4_K) are copied into ggml's CPU_REPACK buffer (interleaved
    layout with GEMM kernels for prefill); everything else points straight into the file's memory map. `repacked`
    counts the copied weights, `huge_pages` says whether the kernel took the advice to back that copy with 2 MiB
    pages. `close()` frees the ggml side (the memory map belongs to the file).
  * Huge pages: a decode step streams every weight once (~1.5 GB at full size). With 4 KiB pages that is ~370,000
    TLB misses per token, and ggml's Q4_K kernels do not keep enough loads in flight to hide them: on a 2-core Xeon
    with AVX-512/AMX the step ran 1.5x slower than with 2 MiB pages (docs/gguf-runtime.md, "Huge pages"). So the
    repack buffer is advised MADV_HUGEPAGE before it is written (quantize.memory; Linux transparent huge pages in
    "madvise" or "always" mode, elsewhere a no-op). TINYGPT_GGML_HUGE_PAGES=0 turns the advice off.
  * After a weight is copied, the file's pages behind it are dropped (MADV_DONTNEED), so the copy does not sit in
    memory next to them.
"""
from __future__ import annotations

import ctypes

import ggml  # ggml-python: only quantize.ggml_llm (itself imported lazily) imports this module

from tinygpt.errors import UserError

from .memory import advise_huge_pages, drop_pages

_REPACK_TYPES = (ggml.GGML_TYPE_Q4_0, ggml.GGML_TYPE_Q4_K)  # other types crash ggml 0.15's CPU_REPACK buffer
_MATMUL_WEIGHTS = ("attn_qkv.weight", "attn_output.weight", "ffn_up.weight", "ffn_down.weight", "output.weight")


def repackable(name: str, tensor_type: int, ne: list[int]) -> bool:
    return tensor_type in _REPACK_TYPES and name.endswith(_MATMUL_WEIGHTS) and len(ne) == 2 and ne[1] % 8 == 0


def extra_buffer_types(backend) -> dict[str, object]:
    """The CPU device's extra buffer types by name (this build: "AMX" where compiled with AMX, "CPU_REPACK")."""
    reg = ggml.ggml_backend_cpu_reg()
    address = ggml.ggml_backend_reg_get_proc_address(reg, b"ggml_backend_dev_get_extra_bufts") if reg else None
    if not address:
        return {}
    get_extra = ctypes.CFUNCTYPE(ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p)(address)
    bufts = get_extra(ggml.ggml_backend_get_device(backend))
    found, i = {}, 0
    while bufts and bufts[i]:
        found[ggml.ggml_backend_buft_name(bufts[i]).decode()] = bufts[i]
        i += 1
    return found


class GgmlWeights:
    """Every tensor of an LLM file as a ggml tensor (see the module docstring)."""

    def __init__(self, file, backend, repack: bool):
        self.file = file
        tensors = file.tensors
        repack_buft = extra_buffer_types(backend).get("CPU_REPACK") if repack else None
        overhead = (len(tensors) + 8) * ggml.ggml_tensor_overhead()
        self._ctx = ggml.ggml_init(ggml.ggml_init_params(mem_size=overhead, mem_buffer=None, no_alloc=True))
        self._repack_ctx = ggml.ggml_init(ggml.ggml_init_params(mem_size=overhead, mem_buffer=None, no_alloc=True))
        self._buffer = None
        self.w: dict[str, object] = {}
        self.huge_pages = False
        to_repack = []
        for name, t in tensors.items():
            ne = [int(x) for x in t.shape.tolist()]
            copy = repack_buft is not None and repackable(name, int(t.tensor_type), ne)
            gt = ggml.ggml_new_tensor(self._repack_ctx if copy else self._ctx, int(t.tensor_type), len(ne),
                                      (ctypes.c_int64 * len(ne))(*ne))
            if ggml.ggml_nbytes(gt) != t.data.nbytes:
                raise UserError(f"{file.path}: tensor {name!r} holds {t.data.nbytes} bytes, ggml expects "
                                f"{ggml.ggml_nbytes(gt)}")
            if copy:
                to_repack.append((gt, t.data))
            else:
                gt.contents.data = t.data.ctypes.data  # the memory map stays alive through file.reader
            self.w[name] = gt
        if to_repack:
            self._buffer = ggml.ggml_backend_alloc_ctx_tensors_from_buft(self._repack_ctx, repack_buft)
            if not self._buffer:
                raise RuntimeError("ggml could not allocate the repacked weights")
            # before the first write, so the pages are born huge
            self.huge_pages = advise_huge_pages(ggml.ggml_backend_buffer_get_base(self._buffer),
                                                ggml.ggml_backend_buffer_get_size(self._buffer))
            for gt, data in to_repack:
                ggml.ggml_backend_tensor_set(gt, data.ctypes.data, 0, data.nbytes)
                drop_pages(file.reader, data)  # the repacked copy replaces the file's pages in memory
        self.repacked = len(to_repack)

    def close(self) -> None:
        if self._buffer is not None:
            ggml.ggml_backend_buffer_free(self._buffer)
            self._buffer = None
        for attr in ("_ctx", "_repack_ctx"):
            if getattr(self, attr) is not None:
                ggml.ggml_free(getattr(self, attr))
                setattr(self, attr, None)
