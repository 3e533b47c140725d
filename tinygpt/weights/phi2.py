"""Phi-2 weights (``microsoft/phi-2`` and its older layouts) -> our fused-``qkv`` language model.

Three layouts are accepted, detected per tensor name (docs/training.md, "Weight layouts the importers read"):

1. transformers >= 4.37 (today's ``microsoft/phi-2``): ``self_attn.q_proj`` / ``k_proj`` / ``v_proj`` (+ bias), fused
   here into ``self_attn.qkv`` with rows ``[q; k; v]``.
2. transformers <= 4.36 (what TinyGPT-V ran): ``self_attn.query_key_value`` with head-interleaved rows
   ``(heads, 3, head_dim)``, re-ordered to ``[q; k; v]``.
3. Microsoft's original MixFormer ("phi-msft"): ``transformer.h.N.mixer.Wqkv`` (rows already ``[q; k; v]``),
   ``mixer.out_proj``, ``ln``, ``lm_head.ln`` / ``lm_head.linear``.

Names come out relative to ``TinyGPTPhiForCausalLM`` (``model.layers.N...``, ``lm_head...``). Tensors the importer does
not know are listed as skipped. A ``torch.save(peft_model.state_dict())`` of a merged model has every name under
``base_model.model.``: the prefix is removed (with a note); LoRA adapter tensors (``lora_A`` / ``lora_B``) are refused,
since dropping them would silently give the base model. The sizes of the language model come from the directory's
``config.json``; a required field that is missing or null is one error naming the file and the field.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from ..errors import UserError
from .sources import read_config_json, read_model_dir, resolve_model_dir
from .torch_file import TensorSource, claim

PEFT_PREFIX = "base_model.model."
_REQUIRED = object()
_SPLIT_QKV = re.compile(r"^(model\.layers\.\d+\.self_attn\.)(q|k|v)_proj\.(weight|bias)$")
_FUSED_QKV = re.compile(r"^(model\.layers\.\d+\.self_attn\.)query_key_value\.(weight|bias)$")
_PLAIN = re.compile(
    r"^(model\.embed_tokens\.weight|model\.final_layernorm\.(weight|bias)|lm_head\.(weight|bias)"
    r"|model\.layers\.\d+\.(input_layernorm|self_attn\.dense|self_attn\.q_layernorm|self_attn\.k_layernorm"
    r"|post_layernorm|mlp\.fc1|mlp\.fc2)\.(weight|bias))$"
)
_MSFT_RENAMES = [
    (re.compile(r"^transformer\.embd\.wte\.weight$"), "model.embed_tokens.weight"),
    (re.compile(r"^transformer\.h\.(\d+)\.ln\.(weight|bias)$"), r"model.layers.\1.input_layernorm.\2"),
    (re.compile(r"^transformer\.h\.(\d+)\.mixer\.Wqkv\.(weight|bias)$"), r"model.layers.\1.self_attn.qkv.\2"),
    (re.compile(r"^transformer\.h\.(\d+)\.mixer\.out_proj\.(weight|bias)$"), r"model.layers.\1.self_attn.dense.\2"),
    (re.compile(r"^transformer\.h\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)$"), r"model.layers.\1.mlp.\2.\3"),
    (re.compile(r"^lm_head\.ln\.(weight|bias)$"), r"model.final_layernorm.\1"),
    (re.compile(r"^lm_head\.linear\.(weight|bias)$"), r"lm_head.\1"),
]


def deinterleave_qkv(tensor: torch.Tensor, num_heads: int, where: str = "fused query_key_value") -> torch.Tensor:
    """Rows ordered ``(heads, 3, head_dim)`` (transformers <= 4.36 / TinyGPT-V) -> ``(3, heads, head_dim)`` = [q;k;v].

    Works for the fused weight [3H, H], its bias [3H] and a LoRA B matrix [3H, r]. ``where`` (file: tensor) names the
    tensor in the error for a row count that does not split into the heads.
    """
    rows = tensor.shape[0] if tensor.ndim else 0
    if rows == 0 or rows % (3 * num_heads):
        raise UserError(f"{where} has shape {list(tensor.shape)}: {rows} rows, not divisible by 3 x {num_heads} "
                        "heads (a file for a model of another size?)")
    head_dim = rows // (3 * num_heads)
    rest = tuple(tensor.shape[1:])
    return tensor.reshape(num_heads, 3, head_dim, *rest).transpose(0, 1).reshape(rows, *rest).contiguous()


def phi2_tensors(raw: TensorSource, num_heads: int) -> TensorSource:
    """Rename/fuse a Phi checkpoint (any of the three layouts) into ``TinyGPTPhiForCausalLM`` names."""
    raw = _without_peft_prefix(raw)
    loaders, skipped, split, notes, owners = {}, [], {}, [], {}
    for key in raw:
        if m := _SPLIT_QKV.match(key):
            split.setdefault((m.group(1), m.group(3)), {})[m.group(2)] = key
        elif m := _FUSED_QKV.match(key):
            target = claim(owners, f"{m.group(1)}qkv.{m.group(2)}", key, raw.origin)
            loaders[target] = lambda k=key: deinterleave_qkv(raw[k], num_heads, f"{raw.origin}: tensor {k}")
        elif _PLAIN.match(key):
            loaders[claim(owners, key, key, raw.origin)] = lambda k=key: raw[k]
        else:
            target = _msft_name(key)
            if target is None:
                skipped.append(key)
            else:
                loaders[claim(owners, target, key, raw.origin)] = lambda k=key: raw[k]
    for (prefix, kind), parts in split.items():
        if set(parts) != {"q", "k", "v"}:
            have = ", ".join(sorted(parts))
            raise UserError(f"{raw.origin}: {prefix}*_proj.{kind}: only {have} of q/k/v present")
        target = claim(owners, f"{prefix}qkv.{kind}", parts["q"], raw.origin)
        loaders[target] = lambda p=parts: torch.cat([raw[p["q"]], raw[p["k"]], raw[p["v"]]], 0)
    if split:
        notes.append(f"fused q_proj/k_proj/v_proj into qkv in {len(split) // 2} layers")
    return raw.derived(loaders, skipped=skipped, notes=notes)


def _without_peft_prefix(raw: TensorSource) -> TensorSource:
    """Names without PEFT's ``base_model.model.``; LoRA adapter tensors are an error (merge them first)."""
    lora = next((k for k in raw if ".lora_A." in k or ".lora_B." in k), None)
    if lora is not None:
        raise UserError(f"{raw.origin}: holds LoRA adapter tensors (e.g. {lora}), not plain Phi weights; merge the "
                        "adapter first (peft: merge_and_unload(), then save_pretrained) and build from that folder")
    prefixed = [k for k in raw if k.startswith(PEFT_PREFIX)]
    if not prefixed:
        return raw
    names = {k.removeprefix(PEFT_PREFIX): k for k in raw}
    if len(names) < len(raw):
        clash = next(k for k in prefixed if k.removeprefix(PEFT_PREFIX) in raw)
        raise UserError(f"{raw.origin}: holds both {clash} and {clash.removeprefix(PEFT_PREFIX)}; keep one copy")
    note = f"removed the PEFT prefix {PEFT_PREFIX!r} from {len(prefixed)} tensor names"
    return raw.derived({name: raw.loaders[key] for name, key in names.items()}, notes=[note])


def _msft_name(key: str) -> str | None:
    for pattern, target in _MSFT_RENAMES:
        if pattern.match(key):
            return pattern.sub(target, key)
    return None


def phi_text_overrides(config: dict, where: str) -> dict:
    """``TinyGPTPhiConfig`` fields read from a Phi ``config.json`` (transformers "phi" or MixFormer "phi-msft")."""
    if not config:
        return {}
    model_type = config.get("model_type")
    if model_type == "phi":
        rope = config_field(config, "rope_parameters", where, {}, dict)
        heads = config_field(config, "num_attention_heads", where)
        kv_heads = config_field(config, "num_key_value_heads", where, heads)
        if kv_heads != heads:
            raise UserError(f"{where}: num_key_value_heads {kv_heads} != num_attention_heads {heads}; "
                            "grouped-query attention is not supported")
        hidden = config_field(config, "hidden_size", where)
        factor = config_field(rope, "partial_rotary_factor", where,
                              config_field(config, "partial_rotary_factor", where, 0.5, float), float)
        theta = config_field(rope, "rope_theta", where,
                             config_field(config, "rope_theta", where, 10000.0, float), float)
        out = dict(
            vocab_size=config_field(config, "vocab_size", where), hidden_size=hidden,
            intermediate_size=config_field(config, "intermediate_size", where),
            num_hidden_layers=config_field(config, "num_hidden_layers", where),
            num_attention_heads=heads, rotary_dim=int(hidden // heads * float(factor)), rope_base=float(theta),
            max_position_embeddings=config_field(config, "max_position_embeddings", where, 2048),
            layer_norm_eps=config_field(config, "layer_norm_eps", where, 1e-5, float),
            hidden_act=config_field(config, "hidden_act", where, "gelu_new", str),
        )
        if config.get("qk_layernorm"):
            out["qk_layernorm"] = True
        return out
    if model_type in ("phi-msft", "mixformer-sequential"):
        hidden = config_field(config, "n_embd", where)
        return dict(
            vocab_size=config_field(config, "vocab_size", where), hidden_size=hidden,
            intermediate_size=config_field(config, "n_inner", where, 4 * hidden),
            num_hidden_layers=config_field(config, "n_layer", where),
            num_attention_heads=config_field(config, "n_head", where),
            rotary_dim=config_field(config, "rotary_dim", where),
            max_position_embeddings=config_field(config, "n_positions", where, 2048),
            layer_norm_eps=config_field(config, "layer_norm_epsilon", where, 1e-5, float),
            hidden_act=config_field(config, "activation_function", where, "gelu_new", str),
        )
    raise UserError(f"{where}: model_type {model_type!r} is not a Phi model (expected 'phi' or 'phi-msft')")


def config_field(config: dict, name: str, where: str, default=_REQUIRED, kind: type = int):
    """``config[name]`` checked: a positive int (``kind`` int), a number, a string or an object; a missing or null
    field takes ``default``, or is an error naming ``where`` and the field when it is required."""
    value = config.get(name)
    if value is None:
        if default is not _REQUIRED:
            return default
        state = "null" if name in config else "missing"
        raise UserError(f"{where}: field {name!r} is {state}; a Phi config.json needs it")
    ok = {int: lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0,
          float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
          str: lambda v: isinstance(v, str), dict: lambda v: isinstance(v, dict)}[kind](value)
    if not ok:
        expected = {int: "a positive integer", float: "a number", str: "a string", dict: "an object"}[kind]
        raise UserError(f"{where}: field {name!r} is {json.dumps(value)}; expected {expected}")
    return value


def open_phi2(source: str) -> tuple[Path, dict]:
    """Resolve a Phi-2 source (directory or hub id) -> (directory, text-config overrides)."""
    directory = resolve_model_dir(source, "--llm")
    overrides = phi_text_overrides(read_config_json(directory), str(directory / "config.json"))
    return directory, overrides


def read_phi2(directory: Path, num_heads: int) -> TensorSource:
    return phi2_tensors(read_model_dir(directory), num_heads)
