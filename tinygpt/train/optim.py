"""AdamW over the trainable parameters with the original's two weight-decay groups.

Decay ``weight_decay`` (0.05) for parameters with ndim >= 2 whose name contains none of "bias", "ln", "norm"; no decay
for the rest (norm weights, biases). The original tested "bn" where we test "norm": the same set for this model
(its norm modules are named *layernorm / *_norm, and no BatchNorm exists). ``adamw8bit``: bitsandbytes' AdamW8bit.
``optim.fused``: torch's fused AdamW (the same update up to float rounding; speed: docs/benchmarks.md).
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import UserError

NO_DECAY_MARKERS = ("bias", "ln", "norm")


def decays(name: str, param: torch.Tensor) -> bool:
    return param.ndim >= 2 and not any(marker in name for marker in NO_DECAY_MARKERS)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (decay if decays(name, param) else no_decay).append(param)
    if not decay and not no_decay:
        raise UserError("optim: the model has no trainable parameter")
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, optim, lr: float) -> torch.optim.Optimizer:
    """``optim``: the config's OptimSection (name, weight_decay, betas, eps)."""
    groups = param_groups(model, optim.weight_decay)
    betas = (float(optim.betas[0]), float(optim.betas[1]))
    if optim.name == "adamw":
        # fused: one kernel for all parameters (CUDA, and the CPU since torch 2.4); None keeps torch's default
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=optim.eps, fused=True if optim.fused else None)
    if optim.name == "adamw8bit":
        try:  # lazy: bitsandbytes is slow to import and only the 8-bit optimizer needs it
            import bitsandbytes as bnb
        except ImportError:
            raise UserError("optim.name: adamw8bit needs bitsandbytes (pip install bitsandbytes)") from None
        return bnb.optim.AdamW8bit(groups, lr=lr, betas=betas, eps=optim.eps)
    raise UserError(f"optim.name: unknown optimizer {optim.name!r}")
