"""BLIP-2 in the Hugging Face layout (``Salesforce/blip2-opt-2.7b``, ``blip2-flan-t5-xl``, ...): ViT, Q-Former, queries.

Our ``vision_model``, ``qformer`` and ``query_tokens`` are transformers' own BLIP-2 modules, so names pass through.
Old exports that store the ViT attention bias as ``q_bias`` / ``v_bias`` get them fused into ``qkv.bias`` (k part
zero). The BLIP-2 language model (``language_model.*``), ``language_projection.*`` and the Q-Former's text parts
(``qformer.embeddings.*``, text FFN) are not TinyGPT-V's and are reported as skipped.
The ViT and Q-Former sizes come from the directory's ``config.json``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from ..errors import UserError
from .phi2 import config_field
from .sources import read_config_json, read_model_dir, resolve_model_dir
from .torch_file import TensorSource, claim

_KEEP = re.compile(r"^(vision_model\.|qformer\.(layernorm|encoder)\.|query_tokens$)")
_TEXT_FFN = re.compile(r"^qformer\.encoder\.layer\.\d+\.(intermediate|output)\.")
_SPLIT_BIAS = re.compile(r"^(vision_model\.encoder\.layers\.\d+\.self_attn\.)(q|v)_bias$")
VISION_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "patch_size",
                 "image_size", "hidden_act", "layer_norm_eps", "qkv_bias")
QFORMER_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "hidden_act",
                  "layer_norm_eps", "cross_attention_frequency", "max_position_embeddings")


def wanted(name: str) -> bool:
    """Tensors worth downloading from a sharded BLIP-2 repo."""
    return name.startswith(("vision_model.", "qformer.", "query_tokens"))


def blip2_tensors(raw: TensorSource) -> TensorSource:
    loaders, skipped, biases, owners = {}, [], {}, {}
    for key in raw:
        if m := _SPLIT_BIAS.match(key):
            biases.setdefault(m.group(1), {})[m.group(2)] = key
        elif _KEEP.match(key) and not _TEXT_FFN.match(key):
            loaders[claim(owners, key, key, raw.origin)] = lambda k=key: raw[k]
        else:
            skipped.append(key)
    for prefix, parts in biases.items():
        if set(parts) != {"q", "v"}:
            raise UserError(f"{raw.origin}: {prefix}: q_bias and v_bias must come together")
        loaders[claim(owners, prefix + "qkv.bias", parts["q"], raw.origin)] = lambda p=parts: fuse_qv_bias(
            raw[p["q"]], raw[p["v"]])
    notes = []
    dropped_lm = sum(k.startswith(("language_model.", "language_projection.")) for k in skipped)
    if dropped_lm:
        notes.append(f"skipped {dropped_lm} BLIP-2 language-model / language_projection tensors")
    return raw.derived(loaders, skipped=skipped, notes=notes)


def fuse_qv_bias(q_bias: torch.Tensor, v_bias: torch.Tensor) -> torch.Tensor:
    """EVA/LAVIS attention bias: q and v learned, k fixed at zero -> one [3D] bias."""
    return torch.cat([q_bias, torch.zeros_like(q_bias), v_bias])


def blip2_config_overrides(config: dict, where: str) -> dict:
    """``{"vision": {...}, "qformer": {...}, "num_query_tokens": n}`` read from a BLIP-2 ``config.json``."""
    if not config:
        return {}
    if config.get("model_type") not in ("blip-2", "blip_2", "blip2"):
        raise UserError(f"{where}: model_type {config.get('model_type')!r} is not a BLIP-2 model")
    vision = config.get("vision_config") or {}
    qformer = config.get("qformer_config") or {}
    for name, part in (("vision_config", vision), ("qformer_config", qformer)):
        if not isinstance(part, dict):
            raise UserError(f"{where}: field {name!r} is {json.dumps(part)[:60]}; expected an object")
    out = {
        "vision": _fields(vision, VISION_FIELDS, f"{where}: vision_config"),
        "qformer": _fields(qformer, QFORMER_FIELDS, f"{where}: qformer_config"),
    }
    if "num_query_tokens" in config:
        queries = config["num_query_tokens"]
        if not isinstance(queries, int) or isinstance(queries, bool) or queries <= 0:
            raise UserError(f"{where}: field 'num_query_tokens' is {json.dumps(queries)}; expected a positive integer")
        out["num_query_tokens"] = queries
    return out


def _fields(part: dict, names: tuple[str, ...], where: str) -> dict:
    """The sizes ``names`` of a vision / Q-Former config, checked (a missing or null field keeps the preset's)."""
    kinds = {"hidden_act": str, "layer_norm_eps": float}
    out = {}
    for name in names:
        if name in part and part[name] is None:
            raise UserError(f"{where}: field {name!r} is null; give a value or leave the field out")
        if name == "qkv_bias":
            if part.get(name) is not None and not isinstance(part[name], bool):
                raise UserError(f"{where}: field 'qkv_bias' is {json.dumps(part[name])}; expected true or false")
            value = part.get(name)
        else:
            value = config_field(part, name, where, None, kinds.get(name, int))
        if value is not None:
            out[name] = value
    return out


def open_blip2(source: str) -> tuple[Path, dict]:
    directory = resolve_model_dir(source, "--vision", wanted)
    return directory, blip2_config_overrides(read_config_json(directory), str(directory / "config.json"))


def read_blip2(directory: Path) -> TensorSource:
    return blip2_tensors(read_model_dir(directory, wanted))
