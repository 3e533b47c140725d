"""MoE-tuning (MoE-LLaVA): the Phi-2 feed-forward block as a routed mixture of experts, and sparse upcycling.

An MoE layer holds a router ``Linear(hidden -> E, no bias)`` and ``E`` experts, each a copy of the dense
``TinyGPTPhiMLP`` (``fc1``, ``fc2``). Every token goes to its top-k experts by router probability; the gates are the
softmax renormalised over those k (MoE-LLaVA / DeepSpeed-MoE), and the output is the gate-weighted sum of the experts'
outputs. The decoder layer is otherwise unchanged (parallel residual: ``x + attn + ffn``).

* Capacity: in training an expert takes at most ``ceil(capacity_factor * tokens * top_k / E)`` tokens per forward;
  first choices come before second choices, earlier tokens before later ones, and a token that misses a slot gets
  nothing from that expert (its other experts and the residual still count). ``capacity_factor: null`` and every
  evaluation / generation forward are dropless, so a prompt's logits never depend on the batch around it, and
  generation gives the same tokens with and without the KV cache.
* Only real tokens are routed (``token_mask``: padding gets a zero output, takes no expert slot and counts in neither
  the load statistics nor the balancing loss), so a packed or bucketed batch gives the unpacked loss.
* Auxiliary loss (Switch Transformer): ``E * sum_i f_i * P_i`` with ``f_i`` the share of the top-k assignments that
  went to expert i and ``P_i`` the mean router probability of i; times ``aux_loss_weight``, plus
  ``z_loss_weight * mean(logsumexp(logits)^2)``. Each forward leaves it in ``last_aux_loss`` and its per-expert
  assignment counts in ``last_counts``; ``moe_aux_loss`` sums the former over the model.
* Sparse upcycling (``upcycle``): every expert starts as an exact copy of the trained dense FFN, the router from a
  seeded normal(0, 0.02) draw, so the upcycled model computes the dense model's function up to the routing (exactly
  with one expert and top-1).
"""

from __future__ import annotations

import math
import re

import torch
from torch import nn

from ..errors import UserError
from .phi import TinyGPTPhiMLP

ROUTER_INIT_STD = 0.02
SETTING_KEYS = ("num_experts", "top_k", "layers", "aux_loss_weight", "capacity_factor", "router_jitter",
                "z_loss_weight")


def resolve_layers(layers, num_layers: int, where: str = "model.moe.layers") -> list[int]:
    """``all`` | ``alternate`` (1, 3, 5, ...) | explicit indices -> a sorted list of indices, checked."""
    if layers == "all":
        return list(range(num_layers))
    if layers == "alternate":
        return list(range(1, num_layers, 2))
    if isinstance(layers, str):
        raise UserError(f"{where}: {layers!r} is not one of all, alternate or a list of layer indices")
    bad = [i for i in layers if not 0 <= int(i) < num_layers]
    if bad or not layers:
        raise UserError(f"{where}: layer indices {bad or layers} are outside the model's 0..{num_layers - 1}")
    return sorted(int(i) for i in layers)


def moe_settings(settings: dict, num_layers: int, where: str = "model.moe") -> dict:
    """The settings as stored in ``TinyGPTPhiConfig.moe``: every key, layers resolved to indices."""
    out = {"num_experts": 4, "top_k": 2, "layers": "all", "aux_loss_weight": 0.01, "capacity_factor": 1.5,
           "router_jitter": 0.0, "z_loss_weight": 0.0}
    unknown = sorted(set(settings) - set(SETTING_KEYS))
    if unknown:
        raise UserError(f"{where}: unknown MoE settings {unknown}; valid: {', '.join(SETTING_KEYS)}")
    out.update(settings)
    out["layers"] = resolve_layers(out["layers"], num_layers, f"{where}.layers")
    return out


def is_moe_layer(config, layer_idx: int) -> bool:
    return config.moe is not None and layer_idx in config.moe["layers"]


class MoEFeedForward(nn.Module):
    """A routed mixture of ``TinyGPTPhiMLP`` experts (see the module docstring)."""

    def __init__(self, config):
        super().__init__()
        s = config.moe
        self.num_experts, self.top_k = int(s["num_experts"]), int(s["top_k"])
        self.capacity_factor = s["capacity_factor"]
        self.jitter, self.aux_weight, self.z_weight = s["router_jitter"], s["aux_loss_weight"], s["z_loss_weight"]
        self.router = nn.Linear(config.hidden_size, self.num_experts, bias=False)
        self.experts = nn.ModuleList(TinyGPTPhiMLP(config) for _ in range(self.num_experts))
        self.last_aux_loss: torch.Tensor | None = None
        self.last_counts: torch.Tensor | None = None

    def route(self, flat: torch.Tensor):
        """Router probabilities [T, E] (fp32), the top-k expert ids [T, k] and their renormalised gates [T, k]."""
        if self.training and self.jitter > 0:
            flat = flat * torch.empty_like(flat).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
        logits = self.router(flat).float()
        probs = logits.softmax(-1)
        top_p, top_i = probs.topk(self.top_k, dim=-1)
        gates = top_p / top_p.sum(-1, keepdim=True)
        counts = torch.bincount(top_i.reshape(-1), minlength=self.num_experts)
        share = counts.float() / top_i.numel()
        aux = self.num_experts * (share * probs.mean(0)).sum() * self.aux_weight
        if self.z_weight:
            aux = aux + self.z_weight * torch.logsumexp(logits, -1).pow(2).mean()
        self.last_aux_loss, self.last_counts = aux, counts.detach()
        return top_i, gates

    def capacity(self, tokens: int) -> int | None:
        if not self.training or self.capacity_factor is None:
            return None
        return math.ceil(self.capacity_factor * tokens * self.top_k / self.num_experts)

    def forward(self, x: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``token_mask`` [B, S]: the real tokens, which alone are routed, take expert slots (capacity counted over
        them, in row order) and count in the balancing loss; padding gets a zero output. None: every position."""
        flat = x.reshape(-1, x.shape[-1])
        real = None if token_mask is None else token_mask.reshape(-1).nonzero(as_tuple=True)[0]
        full, flat = flat, (flat if real is None else flat[real])
        top_i, gates = self.route(flat)
        limit = self.capacity(flat.shape[0])
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            token, slot = (top_i == e).nonzero(as_tuple=True)
            if limit is not None and token.numel() > limit:  # first choices first, then earlier tokens
                order = torch.argsort(slot * flat.shape[0] + token)[:limit]
                token, slot = token[order], slot[order]
            if token.numel() == 0:
                continue
            weight = gates[token, slot].unsqueeze(-1).to(flat.dtype)
            out = out.index_add(0, token, expert(flat[token]) * weight)
        if real is not None:
            out = torch.zeros_like(full).index_copy(0, real, out)
        return out.reshape(x.shape)


def moe_modules(model: nn.Module) -> list[tuple[int, MoEFeedForward]]:
    """(layer index, MoE block) of every MoE layer of a Phi model or a VLM holding one."""
    found = []
    for name, module in model.named_modules():
        if isinstance(module, MoEFeedForward):
            found.append((int(name.split("layers.")[-1].split(".")[0]), module))
    return found


def moe_aux_loss(model: nn.Module) -> torch.Tensor | None:
    """The sum of the last forward's auxiliary losses over all MoE layers (None for a dense model)."""
    losses = [m.last_aux_loss for _, m in moe_modules(model) if m.last_aux_loss is not None]
    return torch.stack(losses).sum() if losses else None


@torch.no_grad()
def upcycle(language_model: nn.Module, settings: dict, seed: int) -> list[int]:
    """Sparse upcycling in place: the dense FFN of each chosen layer becomes an MoE block whose experts all copy it;
    routers drawn from normal(0, ROUTER_INIT_STD) with a generator seeded by ``seed``. Sets ``config.moe``; returns
    the MoE layer indices."""
    config = language_model.config
    if config.moe is not None:
        raise UserError("model.moe: the model already has MoE layers; upcycling needs a dense model")
    layers = language_model.model.layers
    config.moe = moe_settings(settings, len(layers))
    generator = torch.Generator().manual_seed(int(seed))
    for idx in config.moe["layers"]:
        dense = layers[idx].mlp
        block = MoEFeedForward(config).to(device=dense.fc1.weight.device, dtype=dense.fc1.weight.dtype)
        block.train(dense.training)  # an upcycled model in eval mode stays dropless
        for expert in block.experts:
            expert.load_state_dict(dense.state_dict())
        router = torch.randn(block.router.weight.shape, generator=generator) * ROUTER_INIT_STD
        block.router.weight.copy_(router.to(block.router.weight))
        layers[idx].mlp = block
    return config.moe["layers"]


def upcycle_state(state: dict[str, torch.Tensor], config, prefix: str = "language_model.model.layers.") -> dict:
    """A dense checkpoint's FFN tensors under an MoE model: each MoE layer's ``{prefix}N.mlp.fc1/fc2`` copied into
    every expert (how a trainable-only MoE stage output loads over its dense base). Other tensors pass unchanged."""
    moe = getattr(config, "moe", None)
    if moe is None:
        return state
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.mlp\.(fc[12]\.(?:weight|bias))$")
    out = {}
    for key, value in state.items():
        match = pattern.match(key)
        if match is None or int(match.group(1)) not in moe["layers"]:
            out[key] = value
            continue
        for e in range(int(moe["num_experts"])):
            out[f"{prefix}{match.group(1)}.mlp.experts.{e}.{match.group(2)}"] = value
    return out
