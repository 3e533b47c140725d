"""The modified Phi-2 decoder as a ggml graph, driven from Python through ggml-python.

Weights are the GGUF file's own bytes: each ggml weight tensor points into the file's memory map (quantized
tensors stay raw Q4_K/Q4_0/Q8_0 blocks and run through ggml's quantized kernels; nothing is dequantized).
The KV cache lives in persistent ggml tensors (K: [n_ctx, hidden] row per position, V: transposed
[hidden, n_ctx]), so one step only builds a small graph description and writes its inputs.

Single-token steps reuse a cached graph (quantize.ggml_decode_graph): it attends to a fixed bucket of cache
positions (masked past n_past) and writes K/V through index inputs, so a step only copies its inputs in and computes.
GgmlLLM(decode_graph=False) (CLI: --no-decode-graph) turns the cache off: every step builds its graph, as prefill does.

Layer (N = layer, all in fp32 activations):
    h   = LayerNorm(x) * attn_norm.w + attn_norm.b
    qkv = h @ attn_qkv.w^T + attn_qkv.b                rows [q; k; v]
    q,k = LayerNorm_head_dim(q|k) * w + b             (when the file has attn_q_norm / attn_k_norm)
    q,k = NeoX RoPE on the first rotary_dim dims of each head (ggml_rope_ext, mode NEOX)
    a   = softmax(q k^T / sqrt(head_dim) + causal mask) v  @ attn_output.w^T + attn_output.b
    a   = RMSNorm(a) * post_attention_norm.w            (when the file has it)
    x'  = x + a + ffn_down(gelu_tanh(ffn_up(h)))
logits = LayerNorm(x) @ output.w^T + output.b
"""
from __future__ import annotations

import ctypes
import math
import mmap
from typing import Sequence

import numpy as np

# OpenMP wait policy: left to libgomp (spin briefly, then sleep); a user's OMP_WAIT_POLICY still applies. ggml's CPU
# backend meets its threads at an OpenMP barrier after every op, and with OMP_WAIT_POLICY=PASSIVE each one sleeps and
# must be woken, which makes decode much slower; PASSIVE is steadier only when other processes spin on every core.
# Measurements: docs/gguf-runtime.md, "OpenMP wait policy".
import ggml  # ggml-python; quantize.session imports this module lazily and falls back to torch_llm when this fails

from tinygpt.errors import UserError

from .ggml_decode_graph import DecodeGraph, decode_graph_key
from .gguf_file import GGUFContents, LLMHyperParams, llm_hyperparams
from .llm_backend import LLMBackend

_GRAPH_NODES = 8192
_KV_TYPES = {"f16": ggml.GGML_TYPE_F16, "f32": ggml.GGML_TYPE_F32}


def _ne(t) -> tuple[int, ...]:
    return tuple(t.contents.ne[:4])


def _input(ctx, tensor_type: int, *ne: int):
    t = ggml.ggml_new_tensor(ctx, tensor_type, len(ne), (ctypes.c_int64 * len(ne))(*ne))
    ggml.ggml_set_input(t)
    return t


_REPACK_TYPES = (ggml.GGML_TYPE_Q4_0, ggml.GGML_TYPE_Q4_K)  # other types crash ggml 0.15's CPU_REPACK buffer
_MATMUL_WEIGHTS = ("attn_qkv.weight", "attn_output.weight", "ffn_up.weight", "ffn_down.weight", "output.weight")


def _repackable(name: str, tensor_type: int, ne: list[int]) -> bool:
    return tensor_type in _REPACK_TYPES and name.endswith(_MATMUL_WEIGHTS) and len(ne) == 2 and ne[1] % 8 == 0


def _repack_buffer_type(backend):
    """ggml's CPU_REPACK buffer type from the CPU device's extra buffer types, or None if this build has none."""
    reg = ggml.ggml_backend_cpu_reg()
    address = ggml.ggml_backend_reg_get_proc_address(reg, b"ggml_backend_dev_get_extra_bufts") if reg else None
    if not address:
        return None
    get_extra = ctypes.CFUNCTYPE(ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p)(address)
    bufts = get_extra(ggml.ggml_backend_get_device(backend))
    i = 0
    while bufts and bufts[i]:
        if ggml.ggml_backend_buft_name(bufts[i]) == b"CPU_REPACK":
            return bufts[i]
        i += 1
    return None


def _drop_pages(mm: np.memmap, data: np.ndarray) -> None:
    """Tell the kernel the file pages behind ``data`` (a view of ``mm``) are not needed any more, so the repacked copy
    does not sit in memory next to them."""
    raw = getattr(mm, "_mmap", None)
    if raw is None or not hasattr(raw, "madvise"):
        return
    start = data.ctypes.data - mm.ctypes.data
    page = mmap.PAGESIZE
    first = -(-start // page) * page
    last = (start + data.nbytes) // page * page
    if last > first:
        raw.madvise(mmap.MADV_DONTNEED, first, last - first)


@ggml.ggml_log_callback
def _quiet_log(level, text, user_data):
    """ggml's own log (e.g. one "repack tensor" line per weight) is dropped; errors still raise in Python."""


ggml.ggml_log_set(_quiet_log, None)


class GgmlLLM(LLMBackend):
    """Stateful decoder: `eval_tokens` / `eval_embeddings` append to the KV cache and return logits.

    decode_graph: reuse one cached graph for single-token steps (False: build every step's graph, as prefill does).
    repack: copy Q4_0/Q4_K matmul weights into ggml's CPU_REPACK layout at load (False: run on the file's blocks)."""

    def __init__(self, llm: GGUFContents, n_ctx: int | None = None, n_threads: int = 2, n_batch: int = 256,
                 kv_type: str = "f16", decode_graph: bool = True, repack: bool = True):
        self.file = llm
        self.hp: LLMHyperParams = llm_hyperparams(llm)
        self.n_ctx = int(n_ctx or self.hp.context_length)
        if self.n_ctx <= 0:
            raise UserError(f"context length must be positive, got {self.n_ctx}")
        if kv_type not in _KV_TYPES:
            raise UserError(f"kv_type must be one of {sorted(_KV_TYPES)}, got {kv_type!r}")
        self.n_threads = int(n_threads)
        self.n_batch = int(n_batch)
        self.n_past = 0
        self.cpu_backend = ggml.ggml_backend_cpu_init()  # ggml's CPU backend handle (ggml_decode_graph uses it too)
        ggml.ggml_backend_cpu_set_n_threads(self.cpu_backend, self.n_threads)
        # the binding of ggml_backend_cpu_buffer_type truncates the pointer; ask the backend instead
        self._galloc = ggml.ggml_gallocr_new(ggml.ggml_backend_get_default_buffer_type(self.cpu_backend))
        self._weights_ctx = None
        self._kv_ctx = None
        self.decode_graph = bool(decode_graph)
        self._decode: DecodeGraph | None = None
        self._load_weights(bool(repack))
        self._alloc_kv(_KV_TYPES[kv_type])

    # ------------------------------------------------------------------------------------------ setup
    def _load_weights(self, repack: bool) -> None:
        """With repack, matmul weights of a type ggml can repack (Q4_0, Q4_K) go into ggml's CPU_REPACK buffer, whose
        interleaved layout has GEMM kernels: prefill faster, decode the same or faster (measurements:
        docs/gguf-runtime.md, "Repacked weights"). Everything else points straight into the file's memory map."""
        tensors = self.file.tensors
        repack_buft = _repack_buffer_type(self.cpu_backend) if repack else None
        overhead = (len(tensors) + 8) * ggml.ggml_tensor_overhead()
        self._weights_ctx = ggml.ggml_init(ggml.ggml_init_params(mem_size=overhead, mem_buffer=None, no_alloc=True))
        self._repack_ctx = ggml.ggml_init(ggml.ggml_init_params(mem_size=overhead, mem_buffer=None, no_alloc=True))
        self._repack_buffer = None
        self.w: dict[str, object] = {}
        to_repack = []
        for name, t in tensors.items():
            ne = [int(x) for x in t.shape.tolist()]
            repack = repack_buft is not None and _repackable(name, int(t.tensor_type), ne)
            ctx = self._repack_ctx if repack else self._weights_ctx
            gt = ggml.ggml_new_tensor(ctx, int(t.tensor_type), len(ne), (ctypes.c_int64 * len(ne))(*ne))
            if ggml.ggml_nbytes(gt) != t.data.nbytes:
                raise UserError(f"{self.file.path}: tensor {name!r} holds {t.data.nbytes} bytes, ggml expects "
                                f"{ggml.ggml_nbytes(gt)}")
            if repack:
                to_repack.append((gt, t.data))
            else:
                gt.contents.data = t.data.ctypes.data  # the memory map stays alive through self.file.reader
            self.w[name] = gt
        if to_repack:
            self._repack_buffer = ggml.ggml_backend_alloc_ctx_tensors_from_buft(self._repack_ctx, repack_buft)
            for gt, data in to_repack:
                ggml.ggml_backend_tensor_set(gt, data.ctypes.data, 0, data.nbytes)
                _drop_pages(self.file.reader, data)  # the repacked copy replaces the file's pages in memory
        self.repacked = len(to_repack)

    def _alloc_kv(self, kv_type: int) -> None:
        hp = self.hp
        per_tensor = ggml.ggml_row_size(kv_type, hp.hidden_size * self.n_ctx)
        size = 2 * hp.n_layers * (per_tensor + 64) + (2 * hp.n_layers + 4) * ggml.ggml_tensor_overhead()
        # zero-filled (calloc: pages stay untouched until written), because a decode graph also reads cache rows past
        # n_past under a -inf mask, and 0 * NaN from uninitialised memory would poison the output
        self._kv_buf = np.zeros(size + 64, np.uint8)
        start = -self._kv_buf.ctypes.data % 64
        self._kv_ctx = ggml.ggml_init(ggml.ggml_init_params(
            mem_size=size, mem_buffer=self._kv_buf[start:].ctypes.data, no_alloc=False))
        self.k_cache, self.v_cache = [], []
        for _ in range(hp.n_layers):
            self.k_cache.append(ggml.ggml_new_tensor_2d(self._kv_ctx, kv_type, hp.hidden_size, self.n_ctx))
            self.v_cache.append(ggml.ggml_new_tensor_2d(self._kv_ctx, kv_type, self.n_ctx, hp.hidden_size))
        self.kv_bytes = 2 * hp.n_layers * per_tensor

    def close(self) -> None:
        if getattr(self, "_decode", None) is not None:
            self._decode.close()
            self._decode = None
        if self._galloc is not None:
            ggml.ggml_gallocr_free(self._galloc)
            self._galloc = None
        if getattr(self, "_repack_buffer", None) is not None:
            ggml.ggml_backend_buffer_free(self._repack_buffer)
            self._repack_buffer = None
        for attr in ("_weights_ctx", "_repack_ctx", "_kv_ctx"):
            if getattr(self, attr) is not None:
                ggml.ggml_free(getattr(self, attr))
                setattr(self, attr, None)
        if self.cpu_backend is not None:
            ggml.ggml_backend_free(self.cpu_backend)
            self.cpu_backend = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    # ------------------------------------------------------------------------------------------ state
    def reset(self) -> None:
        self.n_past = 0

    def truncate(self, n_keep: int) -> None:
        """Forget every cached position from n_keep on (the cache rows there get overwritten later)."""
        if not 0 <= n_keep <= self.n_past:
            raise ValueError(f"truncate({n_keep}) outside 0..{self.n_past}")
        self.n_past = n_keep

    # ------------------------------------------------------------------------------------------ public eval
    def eval_tokens(self, ids: Sequence[int], all_logits: bool = False) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int32).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= self.hp.vocab_size):
            raise UserError(f"token id outside 0..{self.hp.vocab_size - 1}")
        return self._eval(ids, None, all_logits)

    def eval_embeddings(self, rows: np.ndarray, all_logits: bool = False) -> np.ndarray:
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        if rows.ndim != 2 or rows.shape[1] != self.hp.hidden_size:
            raise UserError(f"embeddings must be [n, {self.hp.hidden_size}], got {list(rows.shape)}")
        return self._eval(None, rows, all_logits)

    def _eval(self, ids, rows, all_logits: bool) -> np.ndarray:
        n = len(ids) if ids is not None else rows.shape[0]
        if n == 0:
            raise ValueError("nothing to evaluate")
        if self.n_past + n > self.n_ctx:
            raise UserError(f"context length exceeded: {self.n_past} cached + {n} new > n_ctx {self.n_ctx}")
        if n == 1 and self.decode_graph:
            key = decode_graph_key(self, ids is not None)
            if self._decode is None or self._decode.key != key:
                if self._decode is not None:
                    self._decode.close()
                    self._decode = None
                self._decode = DecodeGraph(self, key)
            logits = self._decode.run(self, ids if ids is not None else rows)
            return logits[None] if all_logits else logits
        outs = []
        for start in range(0, n, self.n_batch):
            stop = min(n, start + self.n_batch)
            last_chunk = stop == n
            out = self._run_chunk(None if ids is None else ids[start:stop], None if rows is None else rows[start:stop],
                                  want_logits=all_logits or last_chunk, all_logits=all_logits)
            if out is not None:
                outs.append(out)
        return np.concatenate(outs, axis=0) if all_logits else outs[-1][-1]

    # ------------------------------------------------------------------------------------------ graph
    def _run_chunk(self, ids, rows, want_logits: bool, all_logits: bool):
        hp = self.hp
        n = len(ids) if ids is not None else rows.shape[0]
        n_kv = self.n_past + n
        meta, gf = self.new_graph()
        try:
            inputs, out = self.build_graph(meta, gf, n, n_kv, ids is not None, want_logits, all_logits)
            if not ggml.ggml_gallocr_alloc_graph(self._galloc, gf):
                raise RuntimeError("ggml could not allocate the compute graph")
            values = {"x": ids if ids is not None else rows, "pos": np.arange(self.n_past, n_kv, dtype=np.int32),
                      "mask": self._causal_mask(n, n_kv)}
            for name, tensor in inputs.items():
                v = np.ascontiguousarray(values[name])
                ctypes.memmove(tensor.contents.data, v.ctypes.data, v.nbytes)
            status = ggml.ggml_backend_graph_compute(self.cpu_backend, gf)
            if status != 0:
                raise RuntimeError(f"ggml graph compute failed with status {status}")
            self.n_past = n_kv
            if out is None:
                return None
            rows_out = _ne(out)[1]
            data = (ctypes.c_float * (hp.vocab_size * rows_out)).from_address(out.contents.data)
            return np.ctypeslib.as_array(data).reshape(rows_out, hp.vocab_size).copy()
        finally:
            ggml.ggml_free(meta)

    @staticmethod
    def new_graph():
        """A no_alloc ggml context sized for one forward graph's metadata, and an empty graph in it."""
        meta = ggml.ggml_init(ggml.ggml_init_params(
            mem_size=_GRAPH_NODES * ggml.ggml_tensor_overhead() + ggml.ggml_graph_overhead_custom(_GRAPH_NODES, False),
            mem_buffer=None, no_alloc=True))
        return meta, ggml.ggml_new_graph_custom(meta, _GRAPH_NODES, False)

    def build_graph(self, ctx, gf, n: int, n_kv: int, token_input: bool, want_logits: bool, all_logits: bool,
                    kv_index_inputs: bool = False):
        """Forward graph of n new positions attending to cache positions 0..n_kv-1. Returns its input tensors
        ({"x": ids or rows, "pos", "mask"}) and the logits tensor (None unless want_logits). The new K/V go to cache
        position self.n_past (a graph constant), or with kv_index_inputs to the rows named by two more I64 inputs,
        "k_idx" [n] (K rows) and "v_idx" [hidden * n] (V viewed as n_ctx * hidden one-element rows)."""
        hp = self.hp
        if token_input:
            inp = _input(ctx, ggml.GGML_TYPE_I32, n)
            x = ggml.ggml_get_rows(ctx, self.w["token_embd.weight"], inp)
        else:
            inp = x = _input(ctx, ggml.GGML_TYPE_F32, hp.hidden_size, n)
        pos = _input(ctx, ggml.GGML_TYPE_I32, n)
        mask = _input(ctx, ggml.GGML_TYPE_F32, n_kv, n)
        inputs = {"x": inp, "pos": pos, "mask": mask}
        kv_rows = None
        if kv_index_inputs:
            inputs["k_idx"] = _input(ctx, ggml.GGML_TYPE_I64, n)
            inputs["v_idx"] = _input(ctx, ggml.GGML_TYPE_I64, hp.hidden_size * n)
            kv_rows = inputs["k_idx"], inputs["v_idx"]
        for layer in range(hp.n_layers):
            x = self._layer(ctx, gf, x, layer, n, n_kv, pos, mask, kv_rows)
        out = None
        if not want_logits:
            ggml.ggml_build_forward_expand(gf, x)
        else:
            if not all_logits and n > 1:
                x = ggml.ggml_view_2d(ctx, x, hp.hidden_size, 1, x.contents.nb[1], (n - 1) * x.contents.nb[1])
            x = self._layer_norm(ctx, x, "output_norm", hp.layer_norm_eps)
            out = ggml.ggml_add(ctx, ggml.ggml_mul_mat(ctx, self.w["output.weight"], x), self.w["output.bias"])
            ggml.ggml_set_output(out)
            ggml.ggml_build_forward_expand(gf, out)
        return inputs, out

    def _causal_mask(self, n: int, n_kv: int) -> np.ndarray:
        q_pos = np.arange(self.n_past, n_kv)[:, None]
        k_pos = np.arange(n_kv)[None, :]
        return np.where(k_pos <= q_pos, 0.0, -np.inf).astype(np.float32)

    def _layer_norm(self, ctx, x, prefix: str, eps: float):
        x = ggml.ggml_norm(ctx, x, eps)
        x = ggml.ggml_mul(ctx, x, self.w[prefix + ".weight"])
        return ggml.ggml_add(ctx, x, self.w[prefix + ".bias"])

    def _linear(self, ctx, x, prefix: str):
        return ggml.ggml_add(ctx, ggml.ggml_mul_mat(ctx, self.w[prefix + ".weight"], x), self.w[prefix + ".bias"])

    def _layer(self, ctx, gf, x, il: int, n: int, n_kv: int, pos, mask, kv_rows=None):
        hp = self.hp
        H, D, NH = hp.hidden_size, hp.head_dim, hp.n_heads
        b = f"blk.{il}."
        h = self._layer_norm(ctx, x, b + "attn_norm", hp.layer_norm_eps)
        qkv = self._linear(ctx, h, b + "attn_qkv")  # [3H, n]
        row = qkv.contents.nb[1]
        q = ggml.ggml_cont(ctx, ggml.ggml_view_2d(ctx, qkv, H, n, row, 0))
        k = ggml.ggml_cont(ctx, ggml.ggml_view_2d(ctx, qkv, H, n, row, H * 4))
        v = ggml.ggml_cont(ctx, ggml.ggml_view_2d(ctx, qkv, H, n, row, 2 * H * 4))
        q = ggml.ggml_reshape_3d(ctx, q, D, NH, n)
        k = ggml.ggml_reshape_3d(ctx, k, D, NH, n)
        if hp.qk_layernorm:
            q = self._layer_norm(ctx, q, b + "attn_q_norm", hp.layer_norm_eps)
            k = self._layer_norm(ctx, k, b + "attn_k_norm", hp.layer_norm_eps)
        rope_args = (hp.rotary_dim, ggml.GGML_ROPE_TYPE_NEOX, 0, hp.rope_base, 1.0, 0.0, 1.0, 0.0, 0.0)
        q = ggml.ggml_rope_ext(ctx, q, pos, None, *rope_args)
        k = ggml.ggml_rope_ext(ctx, k, pos, None, *rope_args)
        # write this chunk's k and v into the cache, before anything reads the cache
        kc, vc = self.k_cache[il], self.v_cache[il]
        if kv_rows is None:
            k_dst = ggml.ggml_view_2d(ctx, kc, H, n, kc.contents.nb[1], self.n_past * kc.contents.nb[1])
            ggml.ggml_build_forward_expand(gf, ggml.ggml_cpy(ctx, ggml.ggml_reshape_2d(ctx, k, H, n), k_dst))
            v_dst = ggml.ggml_view_2d(ctx, vc, n, H, vc.contents.nb[1], self.n_past * vc.contents.nb[0])
            ggml.ggml_build_forward_expand(gf, ggml.ggml_cpy(ctx, ggml.ggml_transpose(ctx, v), v_dst))
        else:  # K: row k_idx[i] <- k[:, i]; V as n_ctx*H one-element rows: element (h, i) goes to row v_idx[h + i*H]
            k_idx, v_idx = kv_rows
            ggml.ggml_build_forward_expand(gf, ggml.ggml_set_rows(ctx, kc, ggml.ggml_reshape_2d(ctx, k, H, n), k_idx))
            v_rows = ggml.ggml_reshape_2d(ctx, vc, 1, self.n_ctx * H)
            ggml.ggml_build_forward_expand(gf, ggml.ggml_set_rows(ctx, v_rows, ggml.ggml_reshape_2d(ctx, v, 1, H * n),
                                                                  v_idx))
        # attention over positions 0..n_kv-1
        k_all = ggml.ggml_view_3d(ctx, kc, D, n_kv, NH, kc.contents.nb[1], D * kc.contents.nb[0], 0)
        v_all = ggml.ggml_view_3d(ctx, vc, n_kv, D, NH, vc.contents.nb[1], D * vc.contents.nb[1], 0)
        q = ggml.ggml_permute(ctx, q, 0, 2, 1, 3)  # [D, n, NH]
        kq = ggml.ggml_mul_mat(ctx, k_all, q)  # [n_kv, n, NH]
        kq = ggml.ggml_soft_max_ext(ctx, kq, mask, 1.0 / math.sqrt(D), 0.0)
        kqv = ggml.ggml_mul_mat(ctx, v_all, kq)  # [D, n, NH]
        att = ggml.ggml_cont_2d(ctx, ggml.ggml_permute(ctx, kqv, 0, 2, 1, 3), H, n)
        att = self._linear(ctx, att, b + "attn_output")
        if hp.rms_norm_eps is not None:
            att = ggml.ggml_mul(ctx, ggml.ggml_rms_norm(ctx, att, hp.rms_norm_eps),
                                self.w[b + "post_attention_norm.weight"])
        mlp = self._linear(ctx, ggml.ggml_gelu(ctx, self._linear(ctx, h, b + "ffn_up")), b + "ffn_down")
        return ggml.ggml_add(ctx, ggml.ggml_add(ctx, x, att), mlp)
