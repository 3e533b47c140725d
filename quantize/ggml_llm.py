"""The modified Phi-2 decoder as a ggml graph, driven from Python through ggml-python.

Weights are the GGUF file's own bytes: each ggml weight tensor points into the file's memory map (quantized
tensors stay raw Q4_K/Q4_0/Q8_0 blocks and run through ggml's quantized kernels; nothing is dequantized).
The KV cache lives in persistent ggml tensors, K and V each [head_dim, capacity, n_heads] per layer (head-major: one
head's positions are contiguous, so attention streams each head's keys and values instead of striding across rows of all
heads; the capacity grows with the positions used, up to n_ctx: quantize.ggml_kv_cache), so one step only builds a small
graph description and writes its inputs. Attention is ggml's fused flash attention (ggml_flash_attn_ext: scores, mask,
softmax and the weighted sum of V in one op per layer; F16 mask).

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
    x'  = x + a + ffn_down(gelu_tanh(ffn_up(h)))      (quantize.ggml_gelu; MoE layers: routed, quantize.ggml_moe)
logits = LayerNorm(x) @ output.w^T + output.b

A file with tinygptv.attention = mmca (multi-modal causal attention) runs two flash attentions per layer, one over the
keys of the query's own kind and one (text queries only, weighted 0 or 1) over the image keys, and adds them
(quantize.mmca_masks; image positions are the ones fed through eval_embeddings).
"""
from __future__ import annotations

import ctypes
import math
from typing import Sequence

import numpy as np

# OpenMP wait policy: left to libgomp (spin briefly, then sleep); a user's OMP_WAIT_POLICY still applies. ggml's CPU
# backend meets its threads at an OpenMP barrier after every op, and with OMP_WAIT_POLICY=PASSIVE each one sleeps and
# must be woken, which makes decode much slower; PASSIVE is steadier only when other processes spin on every core.
# Measurements: docs/gguf-runtime.md, "OpenMP wait policy".
import ggml  # ggml-python; quantize.session imports this module lazily and falls back to torch_llm when this fails

from tinygpt.errors import UserError

from .ggml_amx import amx_tiles_work
from .ggml_decode_graph import DecodeGraph, decode_graph_key
from .ggml_gelu import gelu_tanh
from .ggml_kv_cache import KVCache
from .ggml_moe import routed_ffn
from .ggml_weights import AMX_TYPES, GgmlWeights
from .gguf_file import GGUFContents, LLMHyperParams, llm_hyperparams
from .llm_backend import LLMBackend
from .mmca_masks import additive, mmca_masks

_GRAPH_NODES = 8192
_KV_TYPES = {"f16": ggml.GGML_TYPE_F16, "f32": ggml.GGML_TYPE_F32}


def _ne(t) -> tuple[int, ...]:
    return tuple(t.contents.ne[:4])


def _input(ctx, tensor_type: int, *ne: int):
    t = ggml.ggml_new_tensor(ctx, tensor_type, len(ne), (ctypes.c_int64 * len(ne))(*ne))
    ggml.ggml_set_input(t)
    return t


@ggml.ggml_log_callback
def _quiet_log(level, text, user_data):
    """ggml's own log (e.g. one "repack tensor" line per weight) is dropped; errors still raise in Python."""


ggml.ggml_log_set(_quiet_log, None)


class GgmlLLM(LLMBackend):
    """Stateful decoder: `eval_tokens` / `eval_embeddings` append to the KV cache and return logits.

    decode_graph: reuse one cached graph for single-token steps (False: build every step's graph, as prefill does).
    repack: copy Q4_0/Q4_K matmul weights into ggml's CPU_REPACK layout at load (False: run on the file's blocks).
    amx: put Q4_0 matmul weights into ggml's AMX buffer instead (needs repack; None: where this CPU has AMX and this
    ggml build's tile kernels pass quantize.ggml_amx's probe; False: never).
    kv_type: "f32" (default) or "f16" cache. ggml's flash attention accumulates V in the cache's type and converts every
    F16 row it reads; with the 80-wide heads of Phi-2 an F32 cache makes attention ~2x faster (7.9 vs 16.2 ms per
    full-size step at 64 positions, one thread) and keeps F32 accuracy, for twice the cache memory (0.66 MB per
    position at full size; the cache grows with the positions used, quantize.ggml_kv_cache)."""

    def __init__(self, llm: GGUFContents, n_ctx: int | None = None, n_threads: int = 2, n_batch: int = 256,
                 kv_type: str = "f32", decode_graph: bool = True, repack: bool = True, amx: bool | None = None):
        self.file = llm
        self.hp: LLMHyperParams = llm_hyperparams(llm)
        self.n_ctx = int(self.hp.context_length if n_ctx is None else n_ctx)
        if self.n_ctx <= 0:
            raise UserError(f"context length must be positive, got {self.n_ctx}")
        if kv_type not in _KV_TYPES:
            raise UserError(f"kv_type must be one of {sorted(_KV_TYPES)}, got {kv_type!r}")
        self.n_threads = int(n_threads)
        self.n_batch = int(n_batch)
        self.n_past = 0
        self.mmca = self.hp.attention == "mmca"
        self.image_flags = np.zeros(self.n_ctx, bool)  # per cache position: fed as an embedding row (mmca)
        self.cpu_backend = ggml.ggml_backend_cpu_init()  # ggml's CPU backend handle (ggml_decode_graph uses it too)
        ggml.ggml_backend_cpu_set_n_threads(self.cpu_backend, self.n_threads)
        # the binding of ggml_backend_cpu_buffer_type truncates the pointer; ask the backend instead
        self._galloc = ggml.ggml_gallocr_new(ggml.ggml_backend_get_default_buffer_type(self.cpu_backend))
        self.kv = None
        self.decode_graph = bool(decode_graph)
        self._decode: DecodeGraph | None = None
        # weights: the file's tensors, matmul weights repacked (quantize.ggml_weights: layouts, huge pages)
        if amx is None:  # ggml's AMX buffer where this CPU has one and this build's tile kernels work
            amx = bool(repack) and any(int(t.tensor_type) in AMX_TYPES for t in llm.tensors.values()) \
                and amx_tiles_work()
        self.weights = GgmlWeights(llm, self.cpu_backend, bool(repack), amx=bool(amx))
        self.w = self.weights.w
        self.repacked, self.in_amx = self.weights.repacked, self.weights.in_amx
        self.kv = KVCache(self.hp.n_layers, self.hp.head_dim, self.hp.n_heads, self.n_ctx, _KV_TYPES[kv_type])

    # ------------------------------------------------------------------------------------------ setup
    @property
    def kv_bytes_per_position(self) -> int:
        return self.kv.bytes_per_position

    @property
    def k_cache(self) -> list:
        return self.kv.k

    @property
    def v_cache(self) -> list:
        return self.kv.v

    def _reserve_kv(self, n_positions: int) -> None:
        """Room in the KV cache for positions 0..n_positions-1; a cache that has to grow gets new tensors, so the cached
        decode graph (built on the old ones) goes first (also when the growth is interrupted)."""
        if n_positions > self.kv.capacity and self._decode is not None:
            self._decode.close()
            self._decode = None
        self.kv.reserve(n_positions)

    def close(self) -> None:
        if getattr(self, "_decode", None) is not None:
            self._decode.close()
            self._decode = None
        if self._galloc is not None:
            ggml.ggml_gallocr_free(self._galloc)
            self._galloc = None
        if getattr(self, "weights", None) is not None:
            self.weights.close()
            self.weights = None
        if getattr(self, "kv", None) is not None:
            self.kv.close()
            self.kv = None
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
        self.image_flags[self.n_past:self.n_past + n] = rows is not None
        if n == 1 and self.decode_graph:
            self._reserve_kv(self.n_past + 1)
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
        meta, gf, out = self.chunk_graph(ids, rows, want_logits, all_logits)
        try:
            status = ggml.ggml_backend_graph_compute(self.cpu_backend, gf)
            if status != 0:
                raise RuntimeError(f"ggml graph compute failed with status {status}")
            self.n_past += len(ids) if ids is not None else rows.shape[0]
            if out is None:
                return None
            rows_out = _ne(out)[1]
            data = (ctypes.c_float * (hp.vocab_size * rows_out)).from_address(out.contents.data)
            return np.ctypeslib.as_array(data).reshape(rows_out, hp.vocab_size).copy()
        finally:
            ggml.ggml_free(meta)

    def chunk_graph(self, ids, rows, want_logits: bool, all_logits: bool):
        """(metadata context, graph, logits tensor or None) for the chunk ids|rows at n_past, allocated in the prefill
        gallocr with its inputs written: ready to compute (n_past is not advanced; the caller frees the context).
        quantize.profile_ops computes it node by node."""
        n = len(ids) if ids is not None else rows.shape[0]
        n_kv = self.n_past + n
        self._reserve_kv(n_kv)
        meta, gf = self.new_graph()
        try:
            inputs, out = self.build_graph(meta, gf, n, n_kv, ids is not None, want_logits, all_logits)
            if not ggml.ggml_gallocr_alloc_graph(self._galloc, gf):
                raise RuntimeError("ggml could not allocate the compute graph")
            values = {"x": ids if ids is not None else rows, "pos": np.arange(self.n_past, n_kv, dtype=np.int32)}
            if self.mmca:
                same, cross, has = mmca_masks(self.image_flags, self.n_past, n, n_kv)
                values.update(mask=additive(same), mask2=additive(cross), scale=has.astype(np.float32))
            else:
                values["mask"] = self._causal_mask(n, n_kv)
            for name, tensor in inputs.items():
                v = np.ascontiguousarray(values[name])
                ctypes.memmove(tensor.contents.data, v.ctypes.data, v.nbytes)
        except BaseException:
            ggml.ggml_free(meta)
            raise
        return meta, gf, out

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
        ({"x": ids or rows, "pos", "mask"}; mask F16 [n_kv, n]) and the logits tensor (None unless want_logits). The
        new K/V go to cache position self.n_past (a graph constant), or with kv_index_inputs to the cache rows named
        by one more I64 input, "kv_idx" [n]. mmca files have two more inputs: "mask2" (the image part, F16 [n_kv, n])
        and "scale" (F32 [1, 1, n]: 1 where a query has an image part, else 0); "mask" is then the same-kind part."""
        hp = self.hp
        if token_input:
            inp = _input(ctx, ggml.GGML_TYPE_I32, n)
            x = ggml.ggml_get_rows(ctx, self.w["token_embd.weight"], inp)
        else:
            inp = x = _input(ctx, ggml.GGML_TYPE_F32, hp.hidden_size, n)
        pos = _input(ctx, ggml.GGML_TYPE_I32, n)
        mask = _input(ctx, ggml.GGML_TYPE_F16, n_kv, n)
        inputs = {"x": inp, "pos": pos, "mask": mask}
        if self.mmca:
            inputs["mask2"] = _input(ctx, ggml.GGML_TYPE_F16, n_kv, n)
            inputs["scale"] = _input(ctx, ggml.GGML_TYPE_F32, 1, 1, n)
        kv_rows = None
        if kv_index_inputs:
            kv_rows = inputs["kv_idx"] = _input(ctx, ggml.GGML_TYPE_I64, n)
        for layer in range(hp.n_layers):
            x = self._layer(ctx, gf, x, layer, n, n_kv, pos, mask, kv_rows, inputs.get("mask2"), inputs.get("scale"))
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
        return np.where(k_pos <= q_pos, 0.0, -np.inf).astype(np.float16)

    def _layer_norm(self, ctx, x, prefix: str, eps: float):
        x = ggml.ggml_norm(ctx, x, eps)
        x = ggml.ggml_mul(ctx, x, self.w[prefix + ".weight"])
        return ggml.ggml_add(ctx, x, self.w[prefix + ".bias"])

    def _linear(self, ctx, x, prefix: str):
        return ggml.ggml_add(ctx, ggml.ggml_mul_mat(ctx, self.w[prefix + ".weight"], x), self.w[prefix + ".bias"])

    def _layer(self, ctx, gf, x, il: int, n: int, n_kv: int, pos, mask, kv_rows=None, mask2=None, scale=None):
        hp = self.hp
        H, D, NH = hp.hidden_size, hp.head_dim, hp.n_heads
        b = f"blk.{il}."
        h = self._layer_norm(ctx, x, b + "attn_norm", hp.layer_norm_eps)
        qkv = self._linear(ctx, h, b + "attn_qkv")  # [3H, n]
        row = qkv.contents.nb[1]
        # q, k, v as [D, NH, n] views of qkv (no copies: every op below reads rows through strides)
        q, k, v = (ggml.ggml_view_3d(ctx, qkv, D, NH, n, D * 4, row, i * H * 4) for i in range(3))
        if hp.qk_layernorm:
            q = self._layer_norm(ctx, q, b + "attn_q_norm", hp.layer_norm_eps)
            k = self._layer_norm(ctx, k, b + "attn_k_norm", hp.layer_norm_eps)
        rope_args = (hp.rotary_dim, ggml.GGML_ROPE_TYPE_NEOX, 0, hp.rope_base, 1.0, 0.0, 1.0, 0.0, 0.0)
        q = ggml.ggml_rope_ext(ctx, q, pos, None, *rope_args)
        k = ggml.ggml_rope_ext(ctx, k, pos, None, *rope_args)
        # write this chunk's k and v into the cache, before anything reads the cache
        kc, vc = self.k_cache[il], self.v_cache[il]
        for new, cache in ((k, kc), (v, vc)):
            new = ggml.ggml_permute(ctx, new, 0, 2, 1, 3)  # [D, n, NH]
            nb = cache.contents.nb
            if kv_rows is None:
                dst = ggml.ggml_view_3d(ctx, cache, D, n, NH, nb[1], nb[2], self.n_past * nb[1])
                ggml.ggml_build_forward_expand(gf, ggml.ggml_cpy(ctx, new, dst))
            else:  # position kv_idx[i] of every head <- new[:, i, head]
                ggml.ggml_build_forward_expand(gf, ggml.ggml_set_rows(ctx, cache, new, kv_rows))
        # attention over positions 0..n_kv-1: q [D, n, NH], k and v [D, n_kv, NH] views of the caches
        k_all = ggml.ggml_view_3d(ctx, kc, D, n_kv, NH, kc.contents.nb[1], kc.contents.nb[2], 0)
        v_all = ggml.ggml_view_3d(ctx, vc, D, n_kv, NH, vc.contents.nb[1], vc.contents.nb[2], 0)
        q = ggml.ggml_permute(ctx, q, 0, 2, 1, 3)
        att = ggml.ggml_flash_attn_ext(ctx, q, k_all, v_all, mask, 1.0 / math.sqrt(D), 0.0, 0.0)  # [D, NH, n]
        if mask2 is not None:  # mmca: + the image part of text queries (0 for the others)
            cross = ggml.ggml_flash_attn_ext(ctx, q, k_all, v_all, mask2, 1.0 / math.sqrt(D), 0.0, 0.0)
            att = ggml.ggml_add(ctx, att, ggml.ggml_mul(ctx, cross, scale))
        att = ggml.ggml_reshape_2d(ctx, att, H, n)
        att = self._linear(ctx, att, b + "attn_output")
        if hp.rms_norm_eps is not None:
            att = ggml.ggml_mul(ctx, ggml.ggml_rms_norm(ctx, att, hp.rms_norm_eps),
                                self.w[b + "post_attention_norm.weight"])
        if il in hp.moe_layers:  # routed mixture of experts (quantize.ggml_moe)
            mlp = routed_ffn(ctx, self.w, b, h, hp.n_expert_used)
        else:
            mlp = self._linear(ctx, gelu_tanh(ctx, self._linear(ctx, h, b + "ffn_up"), self.n_threads), b + "ffn_down")
        return ggml.ggml_add(ctx, ggml.ggml_add(ctx, x, att), mlp)
