"""The released TinyGPT-V checkpoints ``TinyGPT-V_for_Stage{1..4}.pth`` -> our model names.

The files hold ``{"model": <trainable tensors>, "optimizer": ..., ...}``, all fp32 (docs/training.md, "Weight layouts
the importers read"). Mapping:

* ``llama_proj`` -> ``proj1``, ``llama_proj2`` -> ``proj2``;
* ``llama_model.model.*`` (stage 1, no LoRA) and ``llama_model.base_model.model.model.*`` (stages 2-4, peft 0.2.0
  names, no adapter name) -> ``language_model.model.*``; ``lm_head`` likewise;
* the fused, head-interleaved ``query_key_value`` (rows ``(heads, 3, head_dim)``) -> our ``qkv`` (rows ``[q; k; v]``):
  weight, bias and the LoRA B matrix are re-ordered; LoRA A stays as is (one A shared by q, k and v);
* ``dense`` and its LoRA, ``q_layernorm``/``k_layernorm``, ``post_layernorm``, input/final LayerNorms as they are;
* optional ``Qformer.*`` / ``query_tokens`` / ``ln_vision`` (the Dec-28 stage-4 file trained the Q-Former) and
  ``visual_encoder.*`` through the LAVIS mapping.
LoRA tensors get peft's current ``.default`` adapter name. Everything else (e.g. ``position_ids``) is skipped.
"""

from __future__ import annotations

import re

from .lavis import eva_tensors, lavis_qformer_name
from .phi2 import deinterleave_qkv
from .torch_file import TensorSource, claim

_LLM_PREFIXES = ("llama_model.base_model.model.", "llama_model.")
_PROJ = {"llama_proj.": "proj1.", "llama_proj2.": "proj2."}
_QKV = re.compile(r"^(model\.layers\.\d+\.self_attn\.)query_key_value\.(weight|bias)$")
_LORA = re.compile(r"^(model\.layers\.\d+\.self_attn\.)(query_key_value|dense)\.(lora_A|lora_B)(\.default)?\.weight$")


def released_tensors(raw: TensorSource, num_heads: int, vit_depth: int) -> TensorSource:
    loaders, skipped, vit_keys, owners = {}, [], [], {}
    lora_layers = set()
    for key in raw:
        proj = next((p for p in _PROJ if key.startswith(p)), None)
        if proj is not None:
            loaders[claim(owners, _PROJ[proj] + key.removeprefix(proj), key, raw.origin)] = lambda k=key: raw[k]
            continue
        llm_prefix = next((p for p in _LLM_PREFIXES if key.startswith(p)), None)
        if llm_prefix is not None:
            name = key.removeprefix(llm_prefix)
            if m := _LORA.match(name):
                module = "qkv" if m.group(2) == "query_key_value" else "dense"
                target = f"{m.group(1)}{module}.{m.group(3)}.default.weight"
                reorder = module == "qkv" and m.group(3) == "lora_B"
                lora_layers.add(m.group(1))
                loaders[claim(owners, "language_model." + target, key, raw.origin)] = _loader(
                    raw, key, num_heads if reorder else None)
            elif m := _QKV.match(name):
                target = claim(owners, f"language_model.{m.group(1)}qkv.{m.group(2)}", key, raw.origin)
                loaders[target] = _loader(raw, key, num_heads)
            else:
                loaders[claim(owners, "language_model." + name, key, raw.origin)] = _loader(raw, key, None)
            continue
        if key.startswith("visual_encoder."):
            vit_keys.append(key)
            continue
        target = lavis_qformer_name(key)
        if target is None:
            skipped.append(key)
        else:
            loaders[claim(owners, target, key, raw.origin)] = _loader(raw, key, None)
    notes = [f"LoRA on {len(lora_layers)} attention layers (query_key_value rows re-ordered to [q; k; v])"] \
        if lora_layers else []
    if any(k.startswith("Qformer.") for k in raw):
        notes.append("the file carries Q-Former weights (Dec-28 stage-4 release): they replace the BLIP-2 ones")
    source = raw.derived(loaders, skipped=skipped, notes=notes)
    if vit_keys:
        vit = eva_tensors(TensorSource({k: raw.loaders[k] for k in vit_keys}, raw.origin), vit_depth)
        source = TensorSource.merged([source, vit], raw.origin)
    return source


def _loader(raw: TensorSource, key: str, reorder_heads: int | None):
    if reorder_heads is None:
        return lambda: raw[key]
    return lambda: deinterleave_qkv(raw[key], reorder_heads, f"{raw.origin}: tensor {key}")


def released_lora_rank(raw: TensorSource) -> int | None:
    """The LoRA rank stored in a released file (shape of the first ``lora_A``), or None for a LoRA-free file."""
    for key in raw:
        if key.startswith(_LLM_PREFIXES) and ".lora_A." in key:
            return int(raw[key].shape[0])
    return None
