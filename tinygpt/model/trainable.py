"""Per-stage trainable sets, exact and checked.

* ``stage1``: proj1, proj2 and the weights (not biases) of the q/k LayerNorms, the post-attention RMSNorms, the
  input LayerNorms and the final LayerNorm -> 13,809,664 parameters at full size. No LoRA.
* ``lora`` (stages 2-4): the same plus every LoRA A/B -> 45,266,944 at full size.
* ``moe`` (stage 5, MoE-tuning as MoE-LLaVA): only the routers and the experts' fc1/fc2 of the MoE layers; LoRA, when
  the model has it from stage 4, stays in place and frozen -> 839,106,560 at full size with stage 5's 4 experts on
  4 layers (``tests/test_moe.py``).
ViT, ln_vision, Q-Former, query tokens, embeddings, MLPs, attention base weights and lm_head stay frozen.
"""

from __future__ import annotations

from torch import nn

from ..errors import UserError
from .lora import lora_settings

NORM_WEIGHT_SUFFIXES = (
    "self_attn.q_layernorm.weight",
    "self_attn.k_layernorm.weight",
    "post_layernorm.weight",
    "input_layernorm.weight",
    "model.final_layernorm.weight",
)
TRAINABLE_SETS = ("stage1", "lora", "moe")
MOE_PARTS = (".mlp.router.", ".mlp.experts.")


def is_trainable(name: str, trainable_set: str) -> bool:
    if trainable_set == "moe":
        return any(part in name for part in MOE_PARTS)
    if name.startswith(("proj1.", "proj2.")):
        return True
    if name.startswith("language_model.") and name.endswith(NORM_WEIGHT_SUFFIXES):
        return True
    return trainable_set == "lora" and (".lora_A." in name or ".lora_B." in name)


def apply_trainable_set(model: nn.Module, trainable_set: str) -> int:
    """Freeze everything but the set; returns the trainable parameter count. LoRA must already be injected."""
    if trainable_set not in TRAINABLE_SETS:
        raise UserError(f"model.trainable: unknown set {trainable_set!r}; choose one of {', '.join(TRAINABLE_SETS)}")
    names = [name for name, _ in model.named_parameters()]
    has_lora = any(".lora_A." in n for n in names)
    if trainable_set == "lora" and not has_lora:
        raise UserError("model.trainable: 'lora' needs LoRA layers (set model.lora) but the model has none")
    if trainable_set == "stage1" and has_lora:
        raise UserError("model.trainable: 'stage1' trains no LoRA, but the model has LoRA layers (unset model.lora)")
    if trainable_set == "moe" and not any(".mlp.router." in n for n in names):
        raise UserError("model.trainable: 'moe' needs MoE layers (set model.moe) but the model has none")
    for name, param in model.named_parameters():
        param.requires_grad_(is_trainable(name, trainable_set))
    return count_trainable(model)


def count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def expected_trainable(config, trainable_set: str) -> int:
    """The exact count a set must have for a config (so a wrong model fails loudly, not silently)."""
    text = config.text_config
    hidden, layers, head = text.hidden_size, text.num_hidden_layers, text.head_dim
    if trainable_set == "moe":
        moe, inner = text.moe, text.intermediate_size
        expert = hidden * inner + inner + inner * hidden + hidden  # fc1 + fc2, weights and biases
        return len(moe["layers"]) * int(moe["num_experts"]) * (expert + hidden)  # + router (no bias)
    q = config.qformer_config.hidden_size
    projections = q * config.proj_hidden_size + config.proj_hidden_size
    projections += config.proj_hidden_size * hidden + hidden
    per_layer = hidden  # input LayerNorm weight
    per_layer += 2 * head if text.qk_layernorm else 0
    per_layer += hidden if text.post_attention_rmsnorm else 0
    total = projections + layers * per_layer + hidden  # + final LayerNorm weight
    if trainable_set == "lora":
        settings = lora_settings(config.lora)
        r = int(settings["r"])
        shapes = {"qkv": (hidden, 3 * hidden), "dense": (hidden, hidden)}
        for target in settings["target_modules"]:
            fan_in, fan_out = shapes[target]
            total += layers * r * (fan_in + fan_out)
    return total


def check_trainable(model: nn.Module, trainable_set: str) -> int:
    got = count_trainable(model)
    want = expected_trainable(model.config, trainable_set)
    if got != want:
        raise UserError(f"model.trainable: set {trainable_set!r} has {got:,} trainable parameters, expected {want:,}")
    return got
