"""The model a stage trains: from a preset (random weights) or a model directory (the tiny backbones included).

Steps: load (``init_from``) -> resize the ViT position embeddings when the stage's image size differs (224 -> 448,
bicubic, once) -> add LoRA when the stage has it and the loaded model does not -> upcycle the FFNs into experts when
the stage has ``model.moe`` and the loaded model is dense -> store the stage's prompt template
and end symbol in the model config -> optional 4-bit frozen LLM weights -> apply the stage's trainable set and CHECK
its exact size -> frozen weights in the compute dtype (bf16/fp16 runs) -> gradient checkpointing -> train mode
(the frozen ViT and Q-Former stay in eval mode, as in the original: no dropout in them).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from ..config.schema import BUILTIN_PREFIX, ModelSection, RunConfig
from ..errors import UserError
from ..model import TinyGPTVForConditionalGeneration, build_config, load_vlm
from ..model.checkpoint_io import read_config
from ..model.lora import has_lora, inject_lora, lora_settings
from ..model.moe import moe_settings, upcycle
from ..model.phi_config import attention_kind, set_attention_kind
from ..model.presets import PRESETS
from ..model.trainable import apply_trainable_set, check_trainable
from ..model.vision import resize_position_embedding
from ..tokenizer import load_tokenizer
from .qlora import quantize_frozen_llm

log = logging.getLogger(__name__)


@dataclass
class BuiltModel:
    model: nn.Module
    base_dir: Optional[str]      # the whole-weights directory the stage started from (None: random init)
    resized: bool                # position embeddings were resized (the output then holds non-trainable changes)
    trainable_count: int


def resolve_init_dir(init_from: Optional[str]) -> Optional[Path]:
    """The model directory ``init_from`` names; ``builtin:tiny`` must already be resolved to a directory
    (``tinygpt.tiny.backbones.resolve_builtin``, called by the entry points)."""
    if init_from is None:
        return None
    if init_from.startswith(BUILTIN_PREFIX):  # the twin sits above training: its entry points resolve it first
        raise UserError(f"model.init_from: {init_from} names a built-in model that only the entry points resolve "
                        "(python train.py --cfg-path ... or tinygpt train); pass a model directory instead")
    return Path(init_from)


def planned_config(cfg: RunConfig):
    """The config of the model the stage starts from, without loading weights: ``model.init_from``'s config.json, or
    the preset's for random weights. None while init_from names a built-in model (only the entry points resolve it)
    or a folder without a config.json (check_paths says so)."""
    init = cfg.model.init_from
    if init is None:
        return build_config(cfg.model.preset, image_size=cfg.model.image_size)
    if init.startswith(BUILTIN_PREFIX) or not (Path(init) / "config.json").is_file():
        return None
    return read_config(Path(init))


def planned_image_size(cfg: RunConfig) -> int:
    """The image size the stage trains at, without loading weights (datasets are built before the model)."""
    if cfg.model.image_size is not None:
        return cfg.model.image_size
    if cfg.model.init_from is None:
        return int(PRESETS[cfg.model.preset]["vision"]["image_size"])
    return read_config(resolve_init_dir(cfg.model.init_from)).image_size


def _lora_dict(model_cfg: ModelSection) -> Optional[dict]:
    if model_cfg.lora is None:
        return None
    lora = model_cfg.lora
    return {"r": lora.r, "alpha": lora.alpha, "dropout": lora.dropout, "target_modules": list(lora.target_modules)}


def _fresh_model(m: ModelSection, init_device: Optional[torch.device] = None):
    config = build_config(m.preset, image_size=m.image_size, lora=None, extra_norms=m.extra_norms,
                          tokenizer_source=m.tokenizer)
    with torch.device(init_device) if init_device is not None else contextlib.nullcontext():
        model = TinyGPTVForConditionalGeneration(config)
    model.tokenizer = load_tokenizer(m.tokenizer)
    return model


def resize_vision(model: nn.Module, image_size: int) -> bool:
    """Resize the ViT position embeddings in place (bicubic, CLS kept); returns whether anything changed."""
    embeddings = model.vision_model.embeddings
    if int(model.config.vision_config.image_size) == image_size:
        return False
    patch = int(model.config.vision_config.patch_size)
    with torch.no_grad():
        resized = resize_position_embedding(embeddings.position_embedding.data, image_size, patch)
    embeddings.position_embedding = nn.Parameter(resized, requires_grad=False)
    embeddings.image_size = image_size
    embeddings.num_patches = (image_size // patch) ** 2
    embeddings.num_positions = embeddings.num_patches + 1
    model.config.vision_config.image_size = image_size
    model.vision_model.config.image_size = image_size
    return True


def _attach_lora(model: nn.Module, wanted: Optional[dict], source: str) -> None:
    present = has_lora(model)
    if wanted is None:
        if present:
            raise UserError(f"model.lora: {source} has LoRA layers but this stage sets lora: null "
                            "(merge them first with tinygpt.model.merge_lora, or keep LoRA in this stage)")
        return
    if present:
        have = lora_settings(model.config.lora)
        if {k: have[k] for k in wanted} != lora_settings(wanted):
            raise UserError(f"model.lora: {source} has LoRA {have} but this stage asks for {lora_settings(wanted)}")
        return
    inject_lora(model.language_model, wanted)
    model.config.lora = dict(lora_settings(wanted))


def _attach_moe(model: nn.Module, m: ModelSection, source: str, seed: int) -> None:
    """Sparse upcycling of a dense model (router seeded by ``run.seed``); a model that already has MoE layers must
    have the stage's settings (it is a stage-5 output trained further)."""
    have = model.config.text_config.moe
    if m.moe is None:
        if have is not None:
            raise UserError(f"model.moe: {source} has MoE layers but this stage sets moe: null")
        return
    layers = model.config.text_config.num_hidden_layers
    wanted = moe_settings(dataclasses.asdict(m.moe), layers)
    if have is None:
        upcycle(model.language_model, wanted, seed)
        model.config.text_config.moe = model.language_model.config.moe
    elif moe_settings(have, layers) != wanted:
        raise UserError(f"model.moe: {source} has MoE {have} but this stage asks for {wanted}")


def _set_prompt_format(model: nn.Module, m: ModelSection) -> None:
    model.config.prompt_template = m.prompt_template
    model.config.end_sym = m.end_sym
    model.config.stop_strings = [m.end_sym] if m.end_sym.strip() else []


def _set_attention(model: nn.Module, m: ModelSection) -> None:
    """The stage's ``model.attention`` on the LLM's config (saved with the output model); unset keeps the starting
    model's (causal for a new one), so the stages after the one that switched to mmca stay mmca."""
    before = attention_kind(model.config.text_config)
    if m.attention is None or m.attention == before:
        return
    set_attention_kind(model.config.text_config, m.attention)
    log.info("attention: %s (the model it starts from ran %s)", m.attention, before)


def _cast_frozen(model: nn.Module, dtype: torch.dtype) -> None:
    """Frozen weights in the compute dtype (half the memory); trainable ones stay fp32 (the optimizer's master copy)."""
    for param in model.parameters():
        if not param.requires_grad and param.dtype.is_floating_point and param.dtype != dtype:
            param.data = param.data.to(dtype)


def _gradient_checkpointing(model: nn.Module, m: ModelSection) -> None:
    kwargs = {"use_reentrant": False}
    if m.gradient_checkpointing.vision:
        model.vision_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if m.gradient_checkpointing.llm:
        model.language_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def set_train_mode(model: nn.Module) -> None:
    model.train()
    model.vision_model.eval()  # frozen towers run as at inference (the original disables their train())
    model.qformer.eval()


def build_model(cfg: RunConfig, frozen_dtype: Optional[torch.dtype] = None,
                init_device: Optional[torch.device] = None) -> BuiltModel:
    """The stage's model, trainable set applied and checked, ready for the loop. ``init_device``: where random
    weights (``init_from: null``) are drawn (the bench draws the full-size ones on the GPU: a minute less per stage;
    other random numbers than on the CPU)."""
    m = cfg.model
    init_dir = resolve_init_dir(m.init_from)
    if init_dir is None:
        model, source = _fresh_model(m, init_device), f"preset {m.preset!r}"
    else:
        model, source = load_vlm(init_dir), str(init_dir)
    resized = resize_vision(model, m.image_size) if m.image_size is not None else False
    _attach_lora(model, _lora_dict(m), source)
    _attach_moe(model, m, source, cfg.run.seed)
    _set_prompt_format(model, m)
    _set_attention(model, m)
    if m.load_in_4bit:
        quantize_frozen_llm(model)
    apply_trainable_set(model, m.trainable)
    count = check_trainable(model, m.trainable)
    if frozen_dtype is not None:  # QLoRA too: its 4-bit weights are not floating point and stay as they are
        _cast_frozen(model, frozen_dtype)
    _gradient_checkpointing(model, m)
    set_train_mode(model)
    log.info("model from %s: %s trainable parameters (set %s)", source, f"{count:,}", m.trainable)
    return BuiltModel(model=model, base_dir=str(init_dir) if init_dir is not None else None, resized=resized,
                      trainable_count=count)
