"""The LLM file's tensors as ggml tensors for quantize.ggml_llm.GgmlLLM: where each weight lives and in which layout.

Contract:
  * `GgmlWeights(file, backend, repack, amx)`: `w` maps every tensor name of the file to a ggml tensor. With repack, the
    matmul weights of a type ggml can repack (Q4_0, Q4_K) are copied into ggml's CPU_REPACK buffer (interleaved
    layout with GEMM kernels for prefill); with amx too (quantize.ggml_amx decides whether this build may), those of
    the AMX_TYPES go to ggml's AMX buffer instead (AVX-512 VNNI GEMV for one token, AMX tiles for several);
    the 1-D F32 tensors (biases, norm weights) are copied, in file order, into one array; everything else points
    straight into the file's memory map. `repacked` / `in_amx` / `packed` count the copied tensors,
    `huge_pages` says whether the kernel took the advice to back the copies with 2 MiB pages. `close()` frees the
    ggml side (the memory map belongs to the file).
  * Packed small tensors: a full-size step reads ~350 of them (~4 MB), each a few KiB somewhere in the 1.5 GB map;
    together in one array on huge pages a step takes ~0.3 ms less (41.3 against 41.6 ms on the 2-core EPYC, median
    of interleaved rounds).
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

import numpy as np

import ggml  # ggml-python: only quantize.ggml_llm (itself imported lazily) imports this module

from tinygpt.errors import UserError

from .memory import advise_huge_pages, drop_pages, huge_page_array

_REPACK_TYPES = (ggml.GGML_TYPE_Q4_0, ggml.GGML_TYPE_Q4_K)  # other types crash ggml 0.15's CPU_REPACK buffer
# where ggml's AMX buffer beats the repacked layout: Q4_0 (57 vs 141 ms per full-size token); Q4_K is no faster there
# (150 vs 139 ms, one thread). docs/gguf-runtime.md, "AMX".
AMX_TYPES = (ggml.GGML_TYPE_Q4_0,)
_MATMUL_WEIGHTS = ("attn_qkv.weight", "attn_output.weight", "ffn_up.weight", "ffn_down.weight", "output.weight")


def repackable(name: str, tensor_type: int, ne: list[int]) -> bool:
    return tensor_type in _REPACK_TYPES and name.endswith(_MATMUL_WEIGHTS) and len(ne) == 2 and ne[1] % 8 == 0


def amx_placeable(name: str, tensor_type: int, ne: list[int]) -> bool:
    """A matmul weight of a type that ggml's AMX buffer runs faster than the repacked layout (quantize.ggml_amx)."""
    # ggml's AMX matmul computes 32 output rows at a time and does not check the tail (its supports_op wants
    # out_features % 32 == 0, but a graph computed on the CPU backend directly never asks): other shapes stay repacked
    return tensor_type in AMX_TYPES and name.endswith(_MATMUL_WEIGHTS) and len(ne) == 2 and ne[1] % 32 == 0


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


def packable(name: str, tensor_type: int, ne: list[int]) -> bool:
    """A bias or norm weight (a 1-D F32 tensor): GgmlWeights copies these together into one buffer."""
    return tensor_type == ggml.GGML_TYPE_F32 and len(ne) == 1


def weight_layouts(backend, repack: bool, amx: bool) -> dict[str, tuple[object, object]]:
    """Layout name -> (buffer type or None, fits(name, type, ne)) a weight may be copied into, preferred first."""
    extra = extra_buffer_types(backend) if repack else {}
    layouts = {"CPU_REPACK": (extra.get("CPU_REPACK"), repackable)}
    if amx and "AMX" in extra:
        layouts = {"AMX": (extra["AMX"], amx_placeable), **layouts}  # first match wins
    return layouts


def pick_layout(layouts: dict, name: str, tensor_type: int, ne: list[int]) -> str | None:
    """The first of `layouts` that takes this weight; None: it stays in the file's blocks."""
    return next((lay for lay, (buft, fits) in layouts.items() if buft is not None and fits(name, tensor_type, ne)),
                None)


class GgmlWeights:
    """Every tensor of an LLM file as a ggml tensor (see the module docstring)."""

    def __init__(self, file, backend, repack: bool, amx: bool = False):
        self.file = file
        tensors = file.tensors
        layouts = weight_layouts(backend, repack, amx)
        overhead = (len(tensors) + 8) * ggml.ggml_tensor_overhead()
        self._ctx = ggml.ggml_init(ggml.ggml_init_params(mem_size=overhead, mem_buffer=None, no_alloc=True))
        self._copy_ctx = {name: ggml.ggml_init(ggml.ggml_init_params(mem_size=overhead, mem_buffer=None,
                                                                      no_alloc=True)) for name in layouts}
        self._buffers = []
        self.w: dict[str, object] = {}
        self.huge_pages = False
        copies: dict[str, list] = {name: [] for name in layouts}
        small: list = []
        for name, t in tensors.items():
            ne = [int(x) for x in t.shape.tolist()]
            layout = pick_layout(layouts, name, int(t.tensor_type), ne)
            gt = ggml.ggml_new_tensor(self._copy_ctx[layout] if layout else self._ctx, int(t.tensor_type), len(ne),
                                      (ctypes.c_int64 * len(ne))(*ne))
            ggml.ggml_set_name(gt, name.encode()[:63])  # for quantize.profile_ops (matmuls grouped by weight)
            if ggml.ggml_nbytes(gt) != t.data.nbytes:
                raise UserError(f"{file.path}: tensor {name!r} holds {t.data.nbytes} bytes, ggml expects "
                                f"{ggml.ggml_nbytes(gt)}")
            if layout:
                copies[layout].append((gt, t.data))
            elif packable(name, int(t.tensor_type), ne):
                small.append((gt, t.data))
            else:
                gt.contents.data = t.data.ctypes.data  # the memory map stays alive through file.reader
            self.w[name] = gt
        for layout, todo in copies.items():
            if todo:
                self._copy(file, self._copy_ctx[layout], layouts[layout][0], todo)
        self._small = self._pack(file, small)
        self.repacked = len(copies["CPU_REPACK"])
        self.in_amx = len(copies.get("AMX", ()))
        self.packed = len(small)

    def _copy(self, file, ctx, buft, todo) -> None:
        buffer = ggml.ggml_backend_alloc_ctx_tensors_from_buft(ctx, buft)
        if not buffer:
            raise RuntimeError(f"ggml could not allocate the {ggml.ggml_backend_buft_name(buft).decode()} weights")
        self._buffers.append(buffer)
        # before the first write, so the pages are born huge
        self.huge_pages |= advise_huge_pages(ggml.ggml_backend_buffer_get_base(buffer),
                                             ggml.ggml_backend_buffer_get_size(buffer))
        for gt, data in todo:
            ggml.ggml_backend_tensor_set(gt, data.ctypes.data, 0, data.nbytes)
            drop_pages(file.reader, data)  # the copy replaces the file's pages in memory

    def _pack(self, file, todo) -> np.ndarray:
        """Copy the small tensors of todo, in order and 64-byte aligned, into one huge-page-advised array (kept alive by
        the caller) and point their ggml tensors at it."""
        offsets, end = [], 0
        for _, data in todo:
            offsets.append(end)
            end += -(-data.nbytes // 64) * 64
        packed, advised = huge_page_array(max(end, 64))
        self.huge_pages |= advised
        for (gt, data), offset in zip(todo, offsets):
            packed[offset:offset + data.nbytes] = np.frombuffer(data, np.uint8)
            gt.contents.data = packed.ctypes.data + offset
            drop_pages(file.reader, data)
        return packed

    def close(self) -> None:
        for buffer in self._buffers:
            ggml.ggml_backend_buffer_free(buffer)
        self._buffers = []
        self._small = None
        for ctx in [self._ctx, *self._copy_ctx.values()]:
            if ctx is not None:
                ggml.ggml_free(ctx)
        self._ctx, self._copy_ctx = None, {}
