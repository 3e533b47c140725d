"""QLoRA: the frozen LLM Linear weights (fc1, fc2 and the base layers under LoRA's qkv and dense) stored in 4-bit NF4
with bitsandbytes; LoRA, the norms and the projections stay in full precision and train as usual.

Only for ``trainable: lora`` stages that save trainable-only outputs (the 4-bit base is never written back: the
stage output references the full-precision base directory). lm_head and the embeddings are left as they are.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import UserError


def _quantized(linear: nn.Linear, compute_dtype: torch.dtype) -> nn.Module:
    import bitsandbytes as bnb  # lazy: slow to import, CUDA-only; checked by quantize_frozen_llm first

    device = linear.weight.device
    q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                          compute_dtype=compute_dtype, quant_type="nf4", device="cpu")
    q.weight = bnb.nn.Params4bit(linear.weight.data.float().cpu(), requires_grad=False, quant_type="nf4")
    if linear.bias is not None:
        q.bias = nn.Parameter(linear.bias.data.clone().cpu(), requires_grad=False)
    return q.to(device)


def quantize_frozen_llm(model: nn.Module, compute_dtype: torch.dtype = torch.bfloat16) -> int:
    """Replace the decoder layers' frozen Linear weights by 4-bit ones in place; returns how many were replaced."""
    try:  # lazy: bitsandbytes is slow to import and only 4-bit runs need it
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise UserError("model.load_in_4bit: needs bitsandbytes (pip install bitsandbytes)") from None
    if not torch.cuda.is_available():
        compute_dtype = torch.float32  # CPU kernels: fp32 compute
    replaced = 0
    layers = model.language_model.model.layers
    for layer in layers:
        for name, module in list(layer.named_modules()):
            if type(module) is not nn.Linear:
                continue
            if not (name.endswith("base_layer") or name in ("mlp.fc1", "mlp.fc2")):
                continue
            parent_name, _, child = name.rpartition(".")
            parent = layer.get_submodule(parent_name) if parent_name else layer
            setattr(parent, child, _quantized(module, compute_dtype))
            replaced += 1
    if replaced == 0:
        raise UserError("model.load_in_4bit: found no LLM Linear layer to quantize")
    return replaced
