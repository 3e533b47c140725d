"""The routed FFN of an MoE layer (quantize.gguf_moe) as ggml ops, for quantize.ggml_llm's prefill and decode graphs.

As llama.cpp's build_moe_ffn, for n tokens h [n_embd, n], E experts, top-k:
    logits = ffn_gate_inp @ h                         [E, n]       (router, no bias)
    probs  = softmax(logits)                          [E, n]
    ids    = top_k(probs, k)                          [k, n] I32   (which k experts; their order does not matter)
    gates  = probs[ids] / sum(probs[ids])             [1, k, n]    (renormalised over the k: MoEFeedForward's gates)
    up     = mul_mat_id(ffn_up_exps, h, ids) + ffn_up_exps.bias[ids]             [n_ff, k, n]
    down   = mul_mat_id(ffn_down_exps, gelu(up), ids) + ffn_down_exps.bias[ids]  [n_embd, k, n]
    out    = sum over k of gates * down               [n_embd, n]
GELU is quantize.ggml_gelu's (tanh approximation), as the dense FFN. The expert weights stay in the file's memory
map (plain CPU buffer): ggml_mul_mat_id reads each token's k experts from the 3-D tensor, in the file's type
(F32/F16/Q8_0/Q4_K...).
"""
from __future__ import annotations

import ggml  # ggml-python: only quantize.ggml_llm (itself imported lazily) imports this module

from .ggml_gelu import gelu_tanh


def routed_ffn(ctx, w: dict, prefix: str, h, n_used: int):
    """The MoE FFN of layer `prefix` ('blk.N.') on h [n_embd, n] -> [n_embd, n]; w: GGUF name -> ggml tensor."""
    n_embd, n = h.contents.ne[0], h.contents.ne[1]
    n_expert = w[prefix + "ffn_gate_inp.weight"].contents.ne[1]
    probs = ggml.ggml_soft_max(ctx, ggml.ggml_mul_mat(ctx, w[prefix + "ffn_gate_inp.weight"], h))  # [E, n]
    ids = ggml.ggml_top_k(ctx, probs, n_used)  # [k, n]
    gates = ggml.ggml_get_rows(ctx, ggml.ggml_reshape_3d(ctx, probs, 1, n_expert, n), ids)  # [1, k, n]
    gates = ggml.ggml_reshape_2d(ctx, gates, n_used, n)
    gates = ggml.ggml_div(ctx, gates, ggml.ggml_sum_rows(ctx, gates))  # renormalised over the k
    gates = ggml.ggml_reshape_3d(ctx, gates, 1, n_used, n)

    x = ggml.ggml_reshape_3d(ctx, h, n_embd, 1, n)  # one row per token, shared by its k experts
    up = ggml.ggml_mul_mat_id(ctx, w[prefix + "ffn_up_exps.weight"], x, ids)  # [n_ff, k, n]
    up = ggml.ggml_add_id(ctx, up, w[prefix + "ffn_up_exps.bias"], ids)
    down = ggml.ggml_mul_mat_id(ctx, w[prefix + "ffn_down_exps.weight"], gelu_tanh(ctx, up), ids)
    down = ggml.ggml_add_id(ctx, down, w[prefix + "ffn_down_exps.bias"], ids)  # [n_embd, k, n]
    down = ggml.ggml_mul(ctx, down, gates)

    nb1, nb2 = down.contents.nb[1], down.contents.nb[2]
    out = ggml.ggml_view_2d(ctx, down, n_embd, n, nb2, 0)
    for slot in range(1, n_used):
        out = ggml.ggml_add(ctx, out, ggml.ggml_view_2d(ctx, down, n_embd, n, nb2, slot * nb1))
    return ggml.ggml_cont(ctx, out) if n_used == 1 else out  # a view of one slot is not contiguous
