"""A tiny GGUF LLM written by hand and an independent NumPy decoder: the reference the runtime tests check
``quantize`` against.

The LLM files are written directly with gguf.GGUFWriter following the GGUF contract (independent of the exporter),
from random weights; the NumPy implementation follows the contract's formulas in float64.
"""
from __future__ import annotations

import math
from pathlib import Path

import gguf
import numpy as np

from quantize import gguf_names as names
from quantize import qtypes
from quantize.gguf_file import as_float32, open_gguf

T = gguf.GGMLQuantizationType

# ------------------------------------------------------------------------------------------------ tiny model
TINY = dict(hidden=256, heads=4, layers=2, ffn=512, rot=24, ctx=96)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (the alphabet of byte-level BPE token strings)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def tiny_vocab() -> tuple[list[str], list[int], list[str], int]:
    """256 byte tokens, a few merges ('##', '###', 'Ġ#', ...), <|endoftext|> (control), padded to a multiple of 8."""
    byte_tokens = [_bytes_to_unicode()[b] for b in range(256)]
    merges = ["# #", "## #", "Ġ ###", "H u", "Hu m", "Hum a", "Huma n", "Ġ a"]
    tokens = byte_tokens + [m.replace(" ", "") for m in merges]
    types = [1] * len(tokens)
    eos = len(tokens)
    tokens.append("<|endoftext|>")
    types.append(3)
    while len(tokens) % 8:
        tokens.append(f"[PAD{len(tokens)}]")
        types.append(5)
    return tokens, types, merges, eos


def random_llm_weights(seed: int = 0, qk_norm: bool = True, post_norm: bool = True, vocab: int | None = None,
                       **overrides) -> dict[str, np.ndarray]:
    """Random float32 weights under GGUF names (numpy [out, in] layout), with non-trivial norms."""
    p = {**TINY, **overrides}
    H, F, D = p["hidden"], p["ffn"], p["hidden"] // p["heads"]
    V = vocab or len(tiny_vocab()[0])
    rng = np.random.default_rng(seed)

    def lin(o, i, scale=1.0):
        return (rng.standard_normal((o, i)) * scale / math.sqrt(i)).astype(np.float32)

    def vec(n, mean=0.0, std=0.1):
        return (mean + std * rng.standard_normal(n)).astype(np.float32)

    w = {"token_embd.weight": rng.standard_normal((V, H)).astype(np.float32),
         "output_norm.weight": vec(H, 1.0), "output_norm.bias": vec(H),
         "output.weight": lin(V, H, 2.0), "output.bias": vec(V)}
    for i in range(p["layers"]):
        b = f"blk.{i}."
        w.update({b + "attn_norm.weight": vec(H, 1.0), b + "attn_norm.bias": vec(H),
                  b + "attn_qkv.weight": lin(3 * H, H, 2.0), b + "attn_qkv.bias": vec(3 * H),
                  b + "attn_output.weight": lin(H, H), b + "attn_output.bias": vec(H),
                  b + "ffn_up.weight": lin(F, H), b + "ffn_up.bias": vec(F),
                  b + "ffn_down.weight": lin(H, F), b + "ffn_down.bias": vec(H)})
        if qk_norm:
            w.update({b + "attn_q_norm.weight": vec(D, 1.0, 0.3), b + "attn_q_norm.bias": vec(D, 0.0, 0.3),
                      b + "attn_k_norm.weight": vec(D, 1.0, 0.3), b + "attn_k_norm.bias": vec(D, 0.0, 0.3)})
        if post_norm:
            w[b + "post_attention_norm.weight"] = vec(H, 1.0, 0.2)
    return w


def write_llm_gguf(path: Path, weights: dict[str, np.ndarray], qtype=T.F32, vision_hash: str | None = None,
                   **overrides) -> Path:
    """An LLM GGUF per the contract: 2-D weights in qtype (fallback per qtypes.choose_type), 1-D in F32."""
    p = {**TINY, **overrides}
    tokens, types, merges, eos = tiny_vocab()
    wr = gguf.GGUFWriter(str(path), names.ARCH_LLM)
    wr.add_name("tiny-test")
    wr.add_uint32(names.LLM_CONTEXT_LENGTH, p["ctx"])
    wr.add_uint32(names.LLM_EMBEDDING_LENGTH, p["hidden"])
    wr.add_uint32(names.LLM_FEED_FORWARD_LENGTH, p["ffn"])
    wr.add_uint32(names.LLM_BLOCK_COUNT, p["layers"])
    wr.add_uint32(names.LLM_HEAD_COUNT, p["heads"])
    wr.add_uint32(names.LLM_HEAD_COUNT_KV, p["heads"])
    wr.add_uint32(names.LLM_ROPE_DIMENSION_COUNT, p["rot"])
    wr.add_float32(names.LLM_ROPE_FREQ_BASE, 10000.0)
    wr.add_float32(names.LLM_LAYER_NORM_EPS, 1e-5)
    if "blk.0.post_attention_norm.weight" in weights:
        wr.add_float32(names.LLM_RMS_NORM_EPS, 1e-6)
    wr.add_string("tokenizer.ggml.model", "gpt2")
    wr.add_array("tokenizer.ggml.tokens", tokens)
    wr.add_array("tokenizer.ggml.token_type", types)
    wr.add_array("tokenizer.ggml.merges", merges)
    wr.add_uint32("tokenizer.ggml.bos_token_id", eos)
    wr.add_uint32("tokenizer.ggml.eos_token_id", eos)
    wr.add_uint32("tokenizer.ggml.padding_token_id", eos)
    wr.add_string(names.PROMPT_TEMPLATE, "###Human: {} ###Assistant: ")
    wr.add_string(names.END_SYM, "###")
    wr.add_array(names.STOP_STRINGS, ["###"])
    wr.add_uint32(names.IMAGE_TOKEN_COUNT, 4)
    wr.add_string(names.IMAGE_PLACEHOLDER, "<ImageHere>")
    if vision_hash:
        wr.add_string(names.VISION_HASH, vision_hash)
    for name, arr in weights.items():
        if arr.ndim == 1:
            wr.add_tensor(name, arr.astype(np.float32))
            continue
        q = (qtypes.quantize(arr, qtypes.choose_type(qtype, arr.shape)) if qtype != T.F32
             else qtypes.Quantized(arr, T.F32))
        if q.qtype in (T.F32, T.F16):
            wr.add_tensor(name, q.data)
        else:
            wr.add_tensor(name, q.data, raw_shape=q.data.shape, raw_dtype=q.qtype)
    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_tensors_to_file()
    wr.close()
    return path


# ------------------------------------------------------------------------------------------------ NumPy reference
def _ln(x, w, b, eps):
    x64 = x.astype(np.float64)
    mu = x64.mean(-1, keepdims=True)
    var = ((x64 - mu) ** 2).mean(-1, keepdims=True)
    return ((x64 - mu) / np.sqrt(var + eps) * w + b)


def _gelu_tanh(x):
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def _rope_neox(x, pos, rot, base):
    """x [S, heads, D]; rotate the first `rot` dims as NeoX halves (rotate_half), positions pos [S]."""
    half = rot // 2
    inv = base ** (-np.arange(half, dtype=np.float64) * 2.0 / rot)
    ang = pos[:, None].astype(np.float64) * inv[None, :]  # [S, half]
    cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    x1, x2 = x[..., :half], x[..., half:rot]
    out = x.copy()
    out[..., :half] = x1 * cos - x2 * sin
    out[..., half:rot] = x2 * cos + x1 * sin
    return out


def numpy_reference_logits(w: dict[str, np.ndarray], embeddings: np.ndarray, rot: int, heads: int,
                           ln_eps=1e-5, rms_eps=1e-6, base=10000.0) -> np.ndarray:
    """All-position logits of the decoder described in the contract, in float64, from embeddings [S, H]."""
    x = embeddings.astype(np.float64)
    S, H = x.shape
    D = H // heads
    pos = np.arange(S)
    n_layers = len({k.split(".")[1] for k in w if k.startswith("blk.")})
    causal = np.triu(np.full((S, S), -np.inf), 1)
    for i in range(n_layers):
        b = f"blk.{i}."
        h = _ln(x, w[b + "attn_norm.weight"], w[b + "attn_norm.bias"], ln_eps)
        qkv = h @ w[b + "attn_qkv.weight"].T.astype(np.float64) + w[b + "attn_qkv.bias"]
        q, k, v = (qkv[:, j * H:(j + 1) * H].reshape(S, heads, D) for j in range(3))
        if b + "attn_q_norm.weight" in w:
            q = _ln(q, w[b + "attn_q_norm.weight"], w[b + "attn_q_norm.bias"], ln_eps)
            k = _ln(k, w[b + "attn_k_norm.weight"], w[b + "attn_k_norm.bias"], ln_eps)
        q, k = _rope_neox(q, pos, rot, base), _rope_neox(k, pos, rot, base)
        scores = np.einsum("qhd,khd->hqk", q, k) / math.sqrt(D) + causal
        scores = np.exp(scores - scores.max(-1, keepdims=True))
        probs = scores / scores.sum(-1, keepdims=True)
        att = np.einsum("hqk,khd->qhd", probs, v).reshape(S, H)
        att = att @ w[b + "attn_output.weight"].T.astype(np.float64) + w[b + "attn_output.bias"]
        if b + "post_attention_norm.weight" in w:
            att = att / np.sqrt((att ** 2).mean(-1, keepdims=True) + rms_eps) * w[b + "post_attention_norm.weight"]
        mlp = _gelu_tanh(h @ w[b + "ffn_up.weight"].T.astype(np.float64) + w[b + "ffn_up.bias"])
        mlp = mlp @ w[b + "ffn_down.weight"].T.astype(np.float64) + w[b + "ffn_down.bias"]
        x = x + att + mlp
    x = _ln(x, w["output_norm.weight"], w["output_norm.bias"], ln_eps)
    return x @ w["output.weight"].T.astype(np.float64) + w["output.bias"]


def file_weights(path: Path) -> dict[str, np.ndarray]:
    """The weights as stored (dequantized), so the reference sees exactly what the runtime sees."""
    f = open_gguf(path, names.ARCH_LLM)
    return {n: as_float32(t) for n, t in f.tensors.items()}



def prompt_ids(n: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, n).astype(np.int32)


def reference_for_ids(path: Path, ids: np.ndarray) -> np.ndarray:
    w = file_weights(path)
    return numpy_reference_logits(w, w["token_embd.weight"][ids], TINY["rot"], TINY["heads"])


def rel_err(a, b) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())



def image_vectors(seed: int, n: int = 4, h: int = TINY["hidden"]) -> np.ndarray:
    """``n`` random image vectors of the model width (what the vision file would give)."""
    return np.random.default_rng(seed).standard_normal((n, h)).astype(np.float32)
