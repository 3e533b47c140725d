"""Open and validate an exported GGUF pair (LLM file + vision file) for the CPU runtime.

Everything a user can get wrong here (missing directory, foreign or truncated file, a key or tensor that is not
there, an LLM file paired with the vision file of another model) raises UserError naming the file and the problem.
The tensors stay in the file's memory map (gguf.GGUFReader): quantized ones are raw blocks, nothing is copied.
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize

from tinygpt.errors import UserError

from . import gguf_names as names
from .gguf_moe import ffn_shapes, read_moe
from .qtypes import QTYPE_BY_NAME

GGUF_MAGIC = b"GGUF"


@dataclass
class GGUFContents:
    """One opened GGUF file: its metadata (key -> python value) and its tensors (name -> gguf ReaderTensor)."""

    path: Path
    metadata: dict[str, Any]
    tensors: dict[str, Any]
    reader: Any = field(repr=False)  # the memory map the tensors view

    def require(self, key: str) -> Any:
        if key not in self.metadata:
            raise UserError(f"{self.path}: metadata key {key!r} is missing")
        return self.metadata[key]

    def tensor(self, name: str) -> Any:
        if name not in self.tensors:
            raise UserError(f"{self.path}: tensor {name!r} is missing")
        return self.tensors[name]


@dataclass
class LLMHyperParams:
    """Shapes of the language model, read from the LLM file."""

    context_length: int
    hidden_size: int
    ffn_size: int
    n_layers: int
    n_heads: int
    rotary_dim: int
    rope_base: float
    layer_norm_eps: float
    rms_norm_eps: float | None  # None: no post-attention RMSNorm (plain Phi-2)
    qk_layernorm: bool
    vocab_size: int
    attention: str = "causal"  # "mmca" when the file has names.ATTENTION = "mmca"
    moe_layers: tuple[int, ...] = ()  # MoE layers (quantize.gguf_moe); empty for a dense file
    n_expert: int = 0
    n_expert_used: int = 0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.n_heads


@dataclass
class ChatFormat:
    """How the model expects a conversation to be written, read from the LLM file."""

    prompt_template: str
    end_sym: str
    stop_strings: list[str]
    image_token_count: int
    image_placeholder: str
    bos_id: int
    eos_id: int


def open_gguf(path: str | os.PathLike, expected_arch: str) -> GGUFContents:
    """Read a GGUF file's header and tensor table; UserError when it is absent, foreign, truncated or of another
    arch."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: GGUF file not found")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise UserError(f"{path}: not a GGUF file (magic {magic!r}, expected b'GGUF')")
    try:
        metadata, tensors, mm = _parse(path)
    except (struct.error, ValueError, IndexError, KeyError, OverflowError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: damaged or truncated GGUF file ({type(exc).__name__}: {exc})") from None
    contents = GGUFContents(path=path, metadata=metadata, tensors=tensors, reader=mm)
    arch = contents.require("general.architecture")
    if arch != expected_arch:
        raise UserError(f"{path}: general.architecture is {arch!r}, expected {expected_arch!r}")
    return contents


# GGUF value types -> struct format (8 = string, 9 = array are handled apart)
_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_U64 = struct.Struct("<Q")
_NUMPY = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32, 7: np.bool_,
          10: np.uint64, 11: np.int64, 12: np.float64}


@dataclass
class GGUFTensor:
    """One tensor of the file: ggml-order shape, type, and `data` viewing the memory map (no copy).

    data is float32/float16 of the numpy-order shape for F32/F16, else uint8 [rows, bytes per row] (raw blocks)."""

    name: str
    tensor_type: int
    shape: np.ndarray
    n_bytes: int
    data_offset: int
    data: np.ndarray


def _parse(path: Path):
    """A direct reader of the GGUF v2/v3 layout (gguf.GGUFReader takes seconds on a 51200-entry vocabulary)."""
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    buf = memoryview(mm)
    pos = 4

    def unpack(fmt: str):
        nonlocal pos
        value = struct.unpack_from(fmt, buf, pos)[0]
        pos += struct.calcsize(fmt)
        return value

    def strings(n: int) -> list[str]:
        """An array of n strings: one loop over local names (the 51200 tokens and 50000 merges of a Phi-2 file
        took most of a load's parse through ``string``)."""
        nonlocal pos
        length_at, end, at, out = _U64.unpack_from, len(buf), pos, []
        for _ in range(n):
            (size,) = length_at(buf, at)
            at += 8
            if at + size > end:
                raise ValueError("string runs past the end of the file")
            out.append(str(buf[at:at + size], "utf-8"))
            at += size
        pos = at
        return out

    def string() -> str:
        return strings(1)[0]

    def value(vtype: int):
        nonlocal pos
        if vtype == 8:
            return string()
        if vtype == 9:
            itype, n = unpack("<I"), unpack("<Q")
            if itype == 8:
                return strings(n)
            if itype not in _NUMPY:
                raise ValueError(f"array of unsupported type {itype}")
            arr = np.frombuffer(buf, dtype=_NUMPY[itype], count=n, offset=pos)
            pos += arr.nbytes
            return arr.tolist()
        if vtype not in _SCALAR:
            raise ValueError(f"unknown metadata value type {vtype}")
        return unpack(_SCALAR[vtype])

    version = unpack("<I")
    if version not in (2, 3):
        raise ValueError(f"unsupported GGUF version {version}")
    n_tensors, n_kv = unpack("<Q"), unpack("<Q")
    metadata = {}
    for _ in range(n_kv):
        key = string()
        metadata[key] = value(unpack("<I"))
    infos = []
    for _ in range(n_tensors):
        name = string()
        n_dims = unpack("<I")
        dims = [unpack("<Q") for _ in range(n_dims)]
        infos.append((name, dims, unpack("<I"), unpack("<Q")))
    alignment = metadata.get("general.alignment", 32)
    if not isinstance(alignment, int) or alignment < 1:
        raise ValueError(f"general.alignment is {alignment!r}, not a positive integer")
    data_start = -(-pos // alignment) * alignment
    tensors = {}
    for name, dims, ttype, offset in infos:
        qtype = GGMLQuantizationType(ttype)
        block, type_size = GGML_QUANT_SIZES[qtype]
        n_elements = int(np.prod(dims, dtype=np.int64))
        n_bytes = n_elements // block * type_size
        start = data_start + offset
        if start + n_bytes > len(mm):
            raise ValueError(f"tensor {name!r} ends at byte {start + n_bytes}, the file has {len(mm)}")
        numpy_shape = tuple(reversed(dims))
        if qtype == GGMLQuantizationType.F32:
            data = np.frombuffer(buf, np.float32, n_elements, start).reshape(numpy_shape)
        elif qtype == GGMLQuantizationType.F16:
            data = np.frombuffer(buf, np.float16, n_elements, start).reshape(numpy_shape)
        else:
            row_bytes = dims[0] // block * type_size
            data = np.frombuffer(buf, np.uint8, n_bytes, start).reshape(*numpy_shape[:-1], row_bytes)
        tensors[name] = GGUFTensor(name, qtype, np.asarray(dims, dtype=np.uint64), n_bytes, start, data)
    return metadata, tensors, mm


def tensor_shape(t: Any) -> tuple[int, ...]:
    """numpy-order shape of a GGUF tensor ([out, in] for a Linear weight)."""
    return tuple(int(x) for x in reversed(t.shape.tolist()))


def llm_hyperparams(llm: GGUFContents) -> LLMHyperParams:
    """Hyper-parameters of the LLM file; checks every tensor the decoder graph reads and its shape."""
    rms_eps = llm.metadata.get(names.LLM_RMS_NORM_EPS)
    hp = LLMHyperParams(
        context_length=int(llm.require(names.LLM_CONTEXT_LENGTH)),
        hidden_size=int(llm.require(names.LLM_EMBEDDING_LENGTH)),
        ffn_size=int(llm.require(names.LLM_FEED_FORWARD_LENGTH)),
        n_layers=int(llm.require(names.LLM_BLOCK_COUNT)),
        n_heads=int(llm.require(names.LLM_HEAD_COUNT)),
        rotary_dim=int(llm.require(names.LLM_ROPE_DIMENSION_COUNT)),
        rope_base=float(llm.metadata.get(names.LLM_ROPE_FREQ_BASE, 10000.0)),
        layer_norm_eps=float(llm.require(names.LLM_LAYER_NORM_EPS)),
        rms_norm_eps=None if rms_eps is None else float(rms_eps),
        qk_layernorm="blk.0.attn_q_norm.weight" in llm.tensors,
        vocab_size=0,
    )
    hp.attention = str(llm.metadata.get(names.ATTENTION, "causal"))
    if hp.attention not in names.ATTENTION_KINDS:
        raise UserError(f"{llm.path}: metadata key {names.ATTENTION!r} is {hp.attention!r}, expected one of "
                        f"{', '.join(names.ATTENTION_KINDS)}")
    hp.moe_layers, hp.n_expert, hp.n_expert_used = read_moe(llm, hp.n_layers)
    kv_heads = int(llm.metadata.get(names.LLM_HEAD_COUNT_KV, hp.n_heads))
    if kv_heads != hp.n_heads:
        raise UserError(f"{llm.path}: {names.LLM_HEAD_COUNT_KV}={kv_heads} != head_count {hp.n_heads} "
                        "(GQA unsupported)")
    if hp.n_layers < 1 or hp.n_heads < 1:
        raise UserError(f"{llm.path}: {names.LLM_BLOCK_COUNT}={hp.n_layers} and {names.LLM_HEAD_COUNT}={hp.n_heads} "
                        "must be at least 1")
    blocks = {n.split(".")[1] for n in llm.tensors if n.startswith("blk.")}
    extra = sorted(b for b in blocks if not b.isdigit() or int(b) >= hp.n_layers)
    if extra:
        raise UserError(f"{llm.path}: {names.LLM_BLOCK_COUNT}={hp.n_layers} but the file has tensors of block "
                        f"{extra[0]} (damaged metadata)")
    if hp.hidden_size % hp.n_heads or not 0 <= hp.rotary_dim <= hp.head_dim or hp.rotary_dim % 2:
        raise UserError(f"{llm.path}: inconsistent shapes (hidden {hp.hidden_size}, heads {hp.n_heads}, "
                        f"rope {hp.rotary_dim}: an even count at most the head size)")
    has_post = "blk.0.post_attention_norm.weight" in llm.tensors
    if has_post and hp.rms_norm_eps is None:
        raise UserError(f"{llm.path}: metadata key {names.LLM_RMS_NORM_EPS!r} is missing "
                        "(the file has post-attention norms)")
    if not has_post:
        hp.rms_norm_eps = None
    hp.vocab_size = tensor_shape(llm.tensor("token_embd.weight"))[0]
    h, f, d = hp.hidden_size, hp.ffn_size, hp.head_dim
    expected = {"token_embd.weight": (hp.vocab_size, h), "output.weight": (hp.vocab_size, h),
                "output.bias": (hp.vocab_size,), "output_norm.weight": (h,), "output_norm.bias": (h,)}
    for i in range(hp.n_layers):
        b = f"blk.{i}."
        expected.update({b + "attn_norm.weight": (h,), b + "attn_norm.bias": (h,), b + "attn_qkv.weight": (3 * h, h),
                         b + "attn_qkv.bias": (3 * h,), b + "attn_output.weight": (h, h), b + "attn_output.bias": (h,),
                         **ffn_shapes(b, h, f, hp.n_expert, i in hp.moe_layers)})
        if hp.qk_layernorm:
            for part in ("attn_q_norm", "attn_k_norm"):
                expected.update({b + part + ".weight": (d,), b + part + ".bias": (d,)})
        if has_post:
            expected[b + "post_attention_norm.weight"] = (h,)
    for name, shape in expected.items():
        got = tensor_shape(llm.tensor(name))
        if got != shape:
            raise UserError(f"{llm.path}: tensor {name!r} has shape {list(got)}, expected {list(shape)}")
    return hp


def chat_format(llm: GGUFContents) -> ChatFormat:
    """Prompt template, stop strings and image settings of the LLM file."""
    template = llm.metadata.get(names.PROMPT_TEMPLATE, "###Human: {} ###Assistant: ")
    if "{}" not in template:  # written before the export appended it: the user text follows, as in training
        template += "{}"
    if template.count("{}") != 1:
        raise UserError(f"{llm.path}: {names.PROMPT_TEMPLATE} must contain at most one '{{}}', got {template!r}")
    end_sym = llm.metadata.get(names.END_SYM, "###")
    stops = llm.metadata.get(names.STOP_STRINGS)
    if stops is None:
        stops = [end_sym] if end_sym.strip() else []
    return ChatFormat(
        prompt_template=template,
        end_sym=end_sym,
        stop_strings=[s for s in stops if s],
        image_token_count=int(llm.metadata.get(names.IMAGE_TOKEN_COUNT, 32)),
        image_placeholder=llm.metadata.get(names.IMAGE_PLACEHOLDER, "<ImageHere>"),
        bos_id=int(llm.require("tokenizer.ggml.bos_token_id")),
        eos_id=int(llm.require("tokenizer.ggml.eos_token_id")),
    )


def vision_values(vision: GGUFContents) -> dict[str, Any]:
    """Hyper-parameters of the vision file under their short names ('image_size', 'qformer.num_layers', ...)."""
    out: dict[str, Any] = {}
    for key in names.VISION_SHAPE_KEYS:
        out[key] = int(vision.require(names.vision_key(key)))
    for key in names.VISION_FLOAT_KEYS:
        out[key] = float(vision.require(names.vision_key(key)))
    for key in names.VISION_ARRAY_KEYS:
        value = vision.require(names.vision_key(key))
        if value is None or len(value) != 3:
            raise UserError(f"{vision.path}: {names.vision_key(key)} must hold 3 floats")
        out[key] = [float(v) for v in value]
    return out


def check_pair(llm: GGUFContents, hp: LLMHyperParams, vision: GGUFContents, vis: dict[str, Any]) -> None:
    """UserError when the two files do not belong to the same model."""
    if vis["llm_hidden_size"] != hp.hidden_size:
        raise UserError(
            f"{vision.path}: llm_hidden_size {vis['llm_hidden_size']} does not match {llm.path} embedding_length "
            f"{hp.hidden_size} (files of different models)")
    expected_hash = llm.metadata.get(names.VISION_HASH)
    if expected_hash is not None and expected_hash != names.vision_hash(vis):
        raise UserError(f"{vision.path}: does not match {llm.path} ({names.VISION_HASH} differs: files of different "
                        "models)")
    llm_id, vision_id = llm.metadata.get(names.MODEL_ID), vision.metadata.get(names.VISION_MODEL_ID)
    if llm_id is None or vision_id is None:
        missing = llm.path if llm_id is None else vision.path
        raise UserError(f"{missing}: no {names.MODEL_ID if llm_id is None else names.VISION_MODEL_ID}, so it cannot "
                        "be shown to belong with the other file of the pair; re-export the model (python -m quantize "
                        "export) to write both files again")
    if llm_id != vision_id:
        raise UserError(f"{vision.path}: model_id {str(vision_id)[:12]}... differs from {llm.path}'s "
                        f"{str(llm_id)[:12]}...: the two files come from different exports of different models "
                        "(re-export both together)")
    count = int(llm.metadata.get(names.IMAGE_TOKEN_COUNT, vis["num_query_tokens"]))
    if count != vis["num_query_tokens"]:
        raise UserError(f"{llm.path}: image_token_count {count} != {vision.path} num_query_tokens "
                        f"{vis['num_query_tokens']}")


def find_llm_file(gguf_dir: str | os.PathLike, qtype: str | None = None) -> Path:
    """The llm-<qtype>.gguf in DIR (or DIR itself when it is a file); with several, q4_k first, then QTYPES order.
    qtype is matched case-insensitively; an unknown one, one DIR has no file of, or one that disagrees with a file
    given as DIR is a UserError listing what is there."""
    d = Path(gguf_dir)
    q = None if qtype is None else str(qtype).lower()
    if q is not None and q not in QTYPE_BY_NAME:
        raise UserError(f"--qtype {qtype}: unknown type; choose one of {', '.join(QTYPE_BY_NAME)}"
                        + (f" ({d} has {', '.join(llm_types_in(d)) or 'none'})" if d.is_dir() else ""))
    if d.is_file():
        if q is not None and d.name != names.llm_file_name(q):
            raise UserError(f"--qtype {qtype} disagrees with --gguf {d} (not an {names.llm_file_name(q)}); drop "
                            "--qtype, or give the directory")
        return d
    if not d.is_dir():
        raise UserError(f"{d}: --gguf directory not found")
    if q is not None:
        path = d / names.llm_file_name(q)
        if not path.is_file():
            raise UserError(f"{path}: no LLM file for --qtype {qtype} ({d} has {', '.join(llm_types_in(d)) or 'none'})")
        return path
    for q in names.QTYPES:
        if (d / names.llm_file_name(q)).is_file():
            return d / names.llm_file_name(q)
    others = sorted(d.glob("llm-*.gguf"))
    if others:
        return others[0]
    raise UserError(f"{d}: no llm-<qtype>.gguf file (expected e.g. {names.llm_file_name('q4_k')})")


def llm_types_in(gguf_dir: Path) -> list[str]:
    """The <qtype> of every llm-<qtype>.gguf in the directory."""
    return sorted(p.name[len("llm-"):-len(".gguf")] for p in gguf_dir.glob("llm-*.gguf"))


def find_vision_file(gguf_dir: str | os.PathLike) -> Path:
    d = Path(gguf_dir)
    if not d.exists():
        raise UserError(f"{d}: --gguf directory not found")
    path = (d.parent if d.is_file() else d) / names.VISION_FILE_NAME
    if not path.is_file():
        raise UserError(f"{path}: vision file not found")
    return path


def as_float32(t: Any) -> np.ndarray:
    """A GGUF tensor as float32 numpy in numpy-order shape (dequantizing quantized blocks)."""
    if t.tensor_type == GGMLQuantizationType.F32:
        arr = np.asarray(t.data, dtype=np.float32)
    elif t.tensor_type == GGMLQuantizationType.F16:
        arr = np.asarray(t.data).astype(np.float32)
    else:
        arr = dequantize(np.asarray(t.data), t.tensor_type)
    return arr.reshape(tensor_shape(t))
