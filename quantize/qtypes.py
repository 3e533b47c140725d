"""Quantization of one tensor into a GGUF type, with llama.cpp's block-size fallback rules.

User-facing names: q4_k (default), q4_0, q8_0, f16, f32 (unquantised: the exact reference, twice F16's size).
Q4_0 / Q5_0 / Q8_0 / F16 are quantized with the gguf package (pure numpy); Q4_K with ggml's own C quantizer
(`ggml.ggml_quantize_chunk` from ggml-python), since gguf-py has no Q4_K quantizer.
Both produce the block layouts that gguf.quants.dequantize and ggml's kernels read.

Fallback (llama.cpp's llama_tensor_get_type for "incompatible" tensors): a 2-D weight whose row length does not
divide into the type's block widens: Q4_K (block 256) -> Q5_0 (block 32) -> F16; Q4_0 / Q8_0 / Q5_0 -> F16.
1-D tensors (norms, biases) and other small parameters are always F32.
"""
from __future__ import annotations

import ctypes
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType
from gguf import quants as gguf_quants

from tinygpt.errors import UserError

T = GGMLQuantizationType

QTYPE_BY_NAME: dict[str, GGMLQuantizationType] = {"q4_k": T.Q4_K, "q4_0": T.Q4_0, "q8_0": T.Q8_0, "f16": T.F16,
                                                  "f32": T.F32}

# general.file_type: llama.cpp's ftype for "mostly <type>" (all-Q4_K is closest to Q4_K_S, not Q4_K_M's Q6_K mix).
FILE_TYPE_BY_NAME: dict[str, int] = {
    "q4_k": int(LlamaFileType.MOSTLY_Q4_K_S),
    "q4_0": int(LlamaFileType.MOSTLY_Q4_0),
    "q8_0": int(LlamaFileType.MOSTLY_Q8_0),
    "f16": int(LlamaFileType.MOSTLY_F16),
    "f32": int(LlamaFileType.ALL_F32),
}

# Next wider type when rows do not divide into blocks (llama.cpp: Q4_K -> Q5_0, then anything -> F16).
_FALLBACK: dict[GGMLQuantizationType, GGMLQuantizationType] = {T.Q4_K: T.Q5_0, T.Q5_0: T.F16, T.Q4_0: T.F16,
                                                                T.Q8_0: T.F16}


def parse_qtype(name: str, what: str = "--qtype") -> GGMLQuantizationType:
    """'q4_k' -> GGMLQuantizationType.Q4_K; anything else is a UserError naming the argument."""
    key = str(name).lower()
    if key not in QTYPE_BY_NAME:
        raise UserError(f"{what}: unknown quantization type {name!r}; choose one of {', '.join(QTYPE_BY_NAME)}")
    return QTYPE_BY_NAME[key]


def block_size(qtype: GGMLQuantizationType) -> int:
    return GGML_QUANT_SIZES[qtype][0]


def fits(qtype: GGMLQuantizationType, row_length: int) -> bool:
    return row_length % block_size(qtype) == 0


def choose_type(requested: GGMLQuantizationType, shape: Sequence[int]) -> GGMLQuantizationType:
    """The type a 2-D weight of numpy shape [rows, row_length] is stored in: requested, or its fallback chain."""
    qtype = requested
    while not fits(qtype, int(shape[-1])):
        qtype = _FALLBACK[qtype]  # F16 fits every row length, so this ends
    return qtype


def nbytes(shape: Sequence[int], qtype: GGMLQuantizationType) -> int:
    """Bytes a tensor of numpy shape `shape` takes in `qtype` (rows must fit the block size)."""
    block, type_size = GGML_QUANT_SIZES[qtype]
    n = int(np.prod(shape, dtype=np.int64))
    if n % block:
        raise ValueError(f"{n} elements do not fill whole {qtype.name} blocks of {block}")
    return n // block * type_size


def bits_per_weight(qtype: GGMLQuantizationType) -> float:
    block, type_size = GGML_QUANT_SIZES[qtype]
    return 8.0 * type_size / block


@dataclass(frozen=True)
class Quantized:
    """Bytes (or a float array) ready for GGUFWriter: `data` plus the GGML type it holds."""
    data: np.ndarray
    qtype: GGMLQuantizationType


def quantize(array: np.ndarray, qtype: GGMLQuantizationType) -> Quantized:
    """Encode a float array (last axis = rows' length) into `qtype`; F32/F16 return float arrays."""
    x = np.ascontiguousarray(array, dtype=np.float32)
    if qtype == T.F32:
        return Quantized(x, qtype)
    if qtype == T.F16:
        return Quantized(x.astype(np.float16), qtype)
    if not fits(qtype, x.shape[-1]):
        raise ValueError(f"row length {x.shape[-1]} does not fit {qtype.name} blocks of {block_size(qtype)}")
    if qtype == T.Q4_K:
        return Quantized(_quantize_with_ggml(x, qtype), qtype)
    return Quantized(gguf_quants.quantize(x, qtype), qtype)


def dequantize(data: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """Inverse of quantize (up to the quantization error), as float32 of the element shape."""
    if qtype in (T.F32, T.F16):
        return np.asarray(data, dtype=np.float32)
    return gguf_quants.dequantize(np.asarray(data), qtype).astype(np.float32, copy=False)


def _quantize_with_ggml(x: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """ggml_quantize_chunk over all rows; returns uint8 bytes shaped [..., row_bytes] like gguf-py does."""
    import ggml  # ggml-python; imported here so the other types work without it

    ggml_type = int(qtype)  # GGMLQuantizationType values are ggml's enum ggml_type values
    n_per_row = int(x.shape[-1])
    n_rows = int(x.size // n_per_row)
    row_bytes = int(ggml.ggml_row_size(ggml_type, n_per_row))
    if row_bytes * block_size(qtype) != GGML_QUANT_SIZES[qtype][1] * n_per_row:
        raise RuntimeError(f"ggml and gguf disagree on the size of a {qtype.name} row of {n_per_row}")
    dst = np.empty((*x.shape[:-1], row_bytes), dtype=np.uint8)
    ggml.ggml_quantize_init(ggml_type)  # builds lookup tables once; not thread-safe, so before the threads
    src_ptr = x.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
    dst_ptr = dst.ctypes.data_as(ctypes.c_void_p)

    def run(first_row: int, count: int) -> int:
        # start is an element index; ggml writes row r at dst + r * row_bytes, so chunks never overlap
        return int(ggml.ggml_quantize_chunk(ggml_type, src_ptr, dst_ptr, first_row * n_per_row, count, n_per_row, None))

    workers = max(1, min(os.cpu_count() or 1, 8, n_rows // 64))
    step = -(-n_rows // workers)
    chunks = [(r, min(step, n_rows - r)) for r in range(0, n_rows, step)]
    if len(chunks) == 1:
        written = run(*chunks[0])
    else:  # ctypes releases the GIL during the C call, so threads use every core
        with ThreadPoolExecutor(len(chunks)) as pool:
            written = sum(pool.map(lambda c: run(*c), chunks))
    if written != dst.nbytes:
        raise RuntimeError(f"ggml_quantize_chunk wrote {written} bytes, expected {dst.nbytes}")
    return dst
