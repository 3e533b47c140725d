"""LoRA on the fused ``qkv`` and ``dense`` projections, via peft's in-place injection (no wrapper model).

The injected layers keep the module paths (``...self_attn.qkv.base_layer.weight``, ``...qkv.lora_A.default.weight``),
so the whole VLM stays one ``PreTrainedModel`` that saves and loads with the LoRA weights in it.
One ``lora_A`` is shared by q, k and v, as in the original (LoRA on the fused projection).
"""

from __future__ import annotations

import logging
import os

from torch import nn

os.environ.setdefault("BITSANDBYTES_NOWELCOME", "1")
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

DEFAULT_LORA = {"r": 64, "alpha": 16, "dropout": 0.05, "target_modules": ["qkv", "dense"]}


def lora_settings(settings: dict | None) -> dict:
    merged = dict(DEFAULT_LORA)
    merged.update(settings or {})
    return merged


def inject_lora(language_model: nn.Module, settings: dict) -> None:
    from peft import LoraConfig, inject_adapter_in_model  # lazy: peft pulls in bitsandbytes; tinygpt.model stays light

    s = lora_settings(settings)
    config = LoraConfig(
        r=int(s["r"]),
        lora_alpha=float(s["alpha"]),
        lora_dropout=float(s["dropout"]),
        target_modules=list(s["target_modules"]),
        bias="none",
    )
    inject_adapter_in_model(config, language_model)
    # peft drew the start (B = 0: each layer computes its base function). Mark the new Linears initialised, or the
    # post_init of a model that encloses this one (TinyGPTVForConditionalGeneration) draws them again, B ~ N(0, 0.02)
    for name, module in language_model.named_modules():
        if ".lora_A." in f"{name}." or ".lora_B." in f"{name}.":
            module._is_hf_initialized = True


def has_lora(model: nn.Module) -> bool:
    from peft.tuners.lora import LoraLayer  # lazy: see inject_lora

    return any(isinstance(m, LoraLayer) for m in model.modules())


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA delta into its base Linear and put the plain Linear back; clears ``config.lora``."""
    from peft.tuners.lora import LoraLayer  # lazy: see inject_lora

    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, LoraLayer)]
    for name, layer in targets:
        layer.merge(safe_merge=True)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer.get_base_layer())
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "lora", None) is not None:
        config.lora = None
    return model
