"""Pure-PyTorch fallback for the LLM file: the same decoder as quantize.ggml_llm, same interface.

Used when ggml-python cannot be imported (or on request). Every weight is dequantized once at load with
gguf.quants.dequantize into fp32 (small models) or bf16 (models whose fp32 weights would exceed 4 GB); the
decoder then runs in that dtype with fp32 norms and softmax. The KV cache is a preallocated tensor per layer.
An mmca file (tinygptv.attention = mmca) adds the two masked softmaxes of quantize.mmca_masks; an MoE file's routed
layers run each token through its top-k experts (quantize.gguf_moe), routers and expert biases in fp32.
"""
from __future__ import annotations

import math
import sys
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from tinygpt.errors import UserError

from .gguf_file import GGUFContents, LLMHyperParams, as_float32, llm_hyperparams
from .llm_backend import LLMBackend
from .mmca_masks import mmca_masks

_AUTO_BF16_BYTES = 4 << 30
_FP32_NAMES = (".bias", "ffn_gate_inp.weight")


class TorchLLM(LLMBackend):
    """Stateful decoder: `eval_tokens` / `eval_embeddings` append to the KV cache and return logits."""

    def __init__(self, llm: GGUFContents, n_ctx: int | None = None, n_threads: int = 2, n_batch: int = 256,
                 dtype: str = "auto", progress: bool = False):
        self.file = llm
        self.hp: LLMHyperParams = llm_hyperparams(llm)
        self.n_ctx = int(self.hp.context_length if n_ctx is None else n_ctx)
        if self.n_ctx <= 0:
            raise UserError(f"context length must be positive, got {self.n_ctx}")
        self.n_batch = int(n_batch)
        self.n_past = 0
        self.image_flags = np.zeros(self.n_ctx, bool)  # per cache position: fed as an embedding row (mmca)
        if n_threads:
            torch.set_num_threads(int(n_threads))
        n_params = sum(int(np.prod(t.shape.tolist())) for t in llm.tensors.values())
        if dtype == "auto":
            dtype = "bf16" if 4 * n_params > _AUTO_BF16_BYTES else "fp32"
        if dtype not in ("fp32", "bf16"):
            raise UserError(f"dtype must be 'auto', 'fp32' or 'bf16', got {dtype!r}")
        self.dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
        self.w: dict[str, torch.Tensor] = {}
        for i, (name, t) in enumerate(llm.tensors.items()):
            arr = as_float32(t)
            if not arr.flags.writeable:  # a view of the read-only memory map
                arr = arr.copy()
            keep_fp32 = arr.ndim == 1 or name.endswith(_FP32_NAMES)  # norms, biases (MoE: 2-D) and routers
            self.w[name] = torch.from_numpy(np.ascontiguousarray(arr)).to(torch.float32 if keep_fp32 else self.dtype)
            last = i == len(llm.tensors) - 1
            if progress and (last or (i % 50 == 0 and sys.stdout.isatty())):  # a log file gets the last count only
                print(f"\rdequantizing {i + 1}/{len(llm.tensors)} tensors", end="\n" if last else "", flush=True)
        shape = (self.n_ctx, self.hp.n_heads, self.hp.head_dim)
        self.k_cache = [torch.zeros(shape, dtype=self.dtype) for _ in range(self.hp.n_layers)]
        self.v_cache = [torch.zeros(shape, dtype=self.dtype) for _ in range(self.hp.n_layers)]
        half = self.hp.rotary_dim // 2
        self._inv_freq = self.hp.rope_base ** (-torch.arange(half, dtype=torch.float64) * 2.0 / self.hp.rotary_dim)

    def close(self) -> None:
        self.w.clear()
        self.k_cache, self.v_cache = [], []

    # ------------------------------------------------------------------------------------------ state
    def reset(self) -> None:
        self.n_past = 0

    def truncate(self, n_keep: int) -> None:
        if not 0 <= n_keep <= self.n_past:
            raise ValueError(f"truncate({n_keep}) outside 0..{self.n_past}")
        self.n_past = n_keep

    # ------------------------------------------------------------------------------------------ public eval
    def eval_tokens(self, ids: Sequence[int], all_logits: bool = False) -> np.ndarray:
        ids = torch.as_tensor(np.asarray(ids, dtype=np.int64).reshape(-1))
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.hp.vocab_size):
            raise UserError(f"token id outside 0..{self.hp.vocab_size - 1}")
        return self._eval(self.w["token_embd.weight"][ids].float(), all_logits, image=False)

    def eval_embeddings(self, rows: np.ndarray, all_logits: bool = False) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.float32)
        if rows.ndim != 2 or rows.shape[1] != self.hp.hidden_size:
            raise UserError(f"embeddings must be [n, {self.hp.hidden_size}], got {list(rows.shape)}")
        return self._eval(torch.from_numpy(np.ascontiguousarray(rows)), all_logits, image=True)

    @torch.inference_mode()
    def _eval(self, x: torch.Tensor, all_logits: bool, image: bool) -> np.ndarray:
        n = x.shape[0]
        if n == 0:
            raise ValueError("nothing to evaluate")
        if self.n_past + n > self.n_ctx:
            raise UserError(f"context length exceeded: {self.n_past} cached + {n} new > n_ctx {self.n_ctx}")
        self.image_flags[self.n_past:self.n_past + n] = image
        outs = []
        for start in range(0, n, self.n_batch):
            h = self._forward(x[start:start + self.n_batch])
            if all_logits or start + self.n_batch >= n:
                outs.append(self._logits(h if all_logits else h[-1:]))
        return np.concatenate(outs, 0) if all_logits else outs[-1][-1]

    # ------------------------------------------------------------------------------------------ model
    def _ln(self, x: torch.Tensor, prefix: str) -> torch.Tensor:
        w, b = self.w[prefix + ".weight"], self.w[prefix + ".bias"]
        return F.layer_norm(x.float(), (x.shape[-1],), w, b, self.hp.layer_norm_eps)

    def _linear(self, x: torch.Tensor, prefix: str) -> torch.Tensor:
        w = self.w[prefix + ".weight"]
        return (F.linear(x.to(w.dtype), w).float() + self.w[prefix + ".bias"])

    def _rope(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """NeoX rotate_half on the first rotary_dim dims of each head; x [n, heads, D] fp32."""
        rot, half = self.hp.rotary_dim, self.hp.rotary_dim // 2
        ang = (pos[:, None].double() * self._inv_freq[None, :]).float()
        cos, sin = ang.cos()[:, None, :], ang.sin()[:, None, :]
        x1, x2 = x[..., :half], x[..., half:rot]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, x[..., rot:]], dim=-1)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        hp = self.hp
        n, H, NH, D = x.shape[0], hp.hidden_size, hp.n_heads, hp.head_dim
        p0, p1 = self.n_past, self.n_past + n
        pos = torch.arange(p0, p1)
        mask = torch.arange(p1)[None, :] <= pos[:, None]  # [n, n_kv] True = attend
        cross = None
        if self.hp.attention == "mmca":
            same, cross, has = (torch.from_numpy(m) for m in mmca_masks(self.image_flags, p0, n, p1))
            mask, has = same, has.float()[None, :, None]  # [1, n, 1] over [NH, n, D]
        for il in range(hp.n_layers):
            b = f"blk.{il}."
            h = self._ln(x, b + "attn_norm")
            qkv = self._linear(h, b + "attn_qkv")
            q, k, v = (qkv[:, j * H:(j + 1) * H].reshape(n, NH, D) for j in range(3))
            if hp.qk_layernorm:
                q, k = self._ln(q, b + "attn_q_norm"), self._ln(k, b + "attn_k_norm")
            q, k = self._rope(q, pos), self._rope(k, pos)
            self.k_cache[il][p0:p1] = k.to(self.dtype)
            self.v_cache[il][p0:p1] = v.to(self.dtype)
            keys = self.k_cache[il][:p1].float().transpose(0, 1)  # [NH, n_kv, D]
            values = self.v_cache[il][:p1].float().transpose(0, 1)
            att = F.scaled_dot_product_attention(q.transpose(0, 1), keys, values, attn_mask=mask,
                                                 scale=1.0 / math.sqrt(D))
            if cross is not None:
                att = att + has * F.scaled_dot_product_attention(q.transpose(0, 1), keys, values, attn_mask=cross,
                                                                 scale=1.0 / math.sqrt(D))
            att = self._linear(att.transpose(0, 1).reshape(n, H), b + "attn_output")
            if hp.rms_norm_eps is not None:
                att = att * torch.rsqrt(att.pow(2).mean(-1, keepdim=True) + hp.rms_norm_eps)
                att = att * self.w[b + "post_attention_norm.weight"]
            if il in hp.moe_layers:
                mlp = self._routed_ffn(h, b)
            else:
                mlp = self._linear(F.gelu(self._linear(h, b + "ffn_up"), approximate="tanh"), b + "ffn_down")
            x = x + att + mlp
        self.n_past = p1
        return x

    def _routed_ffn(self, h: torch.Tensor, b: str) -> torch.Tensor:
        """An MoE layer's FFN (quantize.gguf_moe): each token through its top-k experts by router softmax, gates
        renormalised over the k; expert e is slice e of the stacked ffn_*_exps tensors."""
        probs = F.linear(h.float(), self.w[b + "ffn_gate_inp.weight"].float()).softmax(-1)
        top_p, top_i = probs.topk(self.hp.n_expert_used, dim=-1)
        gates = top_p / top_p.sum(-1, keepdim=True)
        up_w, up_b = self.w[b + "ffn_up_exps.weight"], self.w[b + "ffn_up_exps.bias"]
        down_w, down_b = self.w[b + "ffn_down_exps.weight"], self.w[b + "ffn_down_exps.bias"]
        out = torch.zeros_like(h, dtype=torch.float32)
        for e in top_i.unique().tolist():
            token, slot = (top_i == e).nonzero(as_tuple=True)
            x = F.linear(h[token].to(up_w.dtype), up_w[e]).float() + up_b[e]
            x = F.linear(F.gelu(x, approximate="tanh").to(down_w.dtype), down_w[e]).float() + down_b[e]
            out = out.index_add(0, token, x * gates[token, slot, None])
        return out

    def _logits(self, h: torch.Tensor) -> np.ndarray:
        return self._linear(self._ln(h, "output_norm"), "output").numpy()
