"""LAVIS checkpoints: ``eva_vit_g.pth`` (EVA ViT-g), ``blip2_pretrained_flant5xxl.pth`` (Q-Former, queries, ln_vision).

Key mapping, LAVIS -> ours (the files' contents: docs/training.md, "Weight layouts the importers read"):

* ViT (keys bare, or under ``visual_encoder.``): ``cls_token`` -> ``vision_model.embeddings.class_embedding``,
  ``pos_embed`` -> ``embeddings.position_embedding``, ``patch_embed.proj`` -> ``embeddings.patch_embedding``,
  ``blocks.i.norm1/norm2`` -> ``encoder.layers.i.layer_norm1/2``, ``attn.qkv.weight`` -> ``self_attn.qkv.weight``,
  ``attn.q_bias`` + ``attn.v_bias`` -> ``self_attn.qkv.bias = [q_bias; 0; v_bias]``, ``attn.proj`` ->
  ``self_attn.projection``, ``mlp.fc1/fc2`` -> ``mlp.fc1/fc2``. Blocks beyond the model's depth are dropped with a
  note: EVA-CLIP-g has 40 blocks and BLIP-2 uses the first 39, as LAVIS does by loading with ``strict=False``.
* Q-Former: ``Qformer.bert.embeddings.LayerNorm`` -> ``qformer.layernorm``, ``Qformer.bert.encoder.*`` ->
  ``qformer.encoder.*`` with ``attention.self`` -> ``attention.attention`` (also in ``crossattention``);
  ``query_tokens`` as is; ``ln_vision`` -> ``vision_model.post_layernorm`` (its eps is 1e-5 in our config).
  Skipped: the Q-Former's text parts (word/position embeddings, ``position_ids``, text FFN ``intermediate``/``output``,
  ``Qformer.cls``), and every T5 / OPT / projection-head tensor (``t5_*``, ``opt_*``, ``vision_proj`` ...).
"""

from __future__ import annotations

import re

from ..errors import UserError
from .blip2_hf import fuse_qv_bias
from .torch_file import TensorSource, claim

VISION = "vision_model."
_EVA_RENAMES = [
    (re.compile(r"^cls_token$"), "embeddings.class_embedding"),
    (re.compile(r"^pos_embed$"), "embeddings.position_embedding"),
    (re.compile(r"^patch_embed\.proj\.(weight|bias)$"), r"embeddings.patch_embedding.\1"),
    (re.compile(r"^blocks\.(\d+)\.norm1\.(weight|bias)$"), r"encoder.layers.\1.layer_norm1.\2"),
    (re.compile(r"^blocks\.(\d+)\.norm2\.(weight|bias)$"), r"encoder.layers.\1.layer_norm2.\2"),
    (re.compile(r"^blocks\.(\d+)\.attn\.qkv\.weight$"), r"encoder.layers.\1.self_attn.qkv.weight"),
    (re.compile(r"^blocks\.(\d+)\.attn\.proj\.(weight|bias)$"), r"encoder.layers.\1.self_attn.projection.\2"),
    (re.compile(r"^blocks\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)$"), r"encoder.layers.\1.mlp.\2.\3"),
]
_EVA_BIAS = re.compile(r"^blocks\.(\d+)\.attn\.(q|v)_bias$")
_BLOCK = re.compile(r"^blocks\.(\d+)\.")
_QFORMER_LAYER = re.compile(r"^Qformer\.bert\.encoder\.layer\.(\d+)\.(.+)$")
_QFORMER_KEEP = re.compile(r"^(attention|crossattention)\.(self|output)\.|^(intermediate_query|output_query)\.")


def eva_tensors(raw: TensorSource, depth: int) -> TensorSource:
    """LAVIS EVA ViT-g keys (bare or ``visual_encoder.``-prefixed) -> ``vision_model.*``; blocks >= depth dropped."""
    loaders, skipped, biases, dropped, owners = {}, [], {}, set(), {}
    for key in raw:
        name = key.removeprefix("visual_encoder.")
        block = _BLOCK.match(name)
        if block and int(block.group(1)) >= depth:
            dropped.add(int(block.group(1)))
            skipped.append(key)
        elif m := _EVA_BIAS.match(name):
            claim(owners, name, key, raw.origin)  # blocks.N.attn.q_bias bare and under visual_encoder.
            biases.setdefault(int(m.group(1)), {})[m.group(2)] = key
        else:
            target = _rename(name, _EVA_RENAMES)
            if target is None:
                skipped.append(key)
            else:
                loaders[claim(owners, VISION + target, key, raw.origin)] = lambda k=key: raw[k]
    for index, parts in biases.items():
        if set(parts) == {"q", "v"}:
            target = f"{VISION}encoder.layers.{index}.self_attn.qkv.bias"
            loaders[claim(owners, target, parts["q"], raw.origin)] = lambda p=parts: fuse_qv_bias(raw[p["q"]],
                                                                                                   raw[p["v"]])
        else:
            skipped += list(parts.values())
    notes = []
    if dropped:
        listed = ", ".join(str(i) for i in sorted(dropped))
        notes.append(f"dropped ViT block(s) {listed}: the model uses the first {depth} blocks "
                     "(BLIP-2 / TinyGPT-V drop EVA-CLIP-g's 40th block)")
    return raw.derived(loaders, skipped=skipped, notes=notes)


def lavis_qformer_tensors(raw: TensorSource) -> TensorSource:
    """LAVIS BLIP-2 ``Qformer.bert.*``, ``query_tokens`` and ``ln_vision.*`` -> ``qformer.*`` / ``vision_model``."""
    loaders, skipped = {}, []
    for key in raw:
        target = lavis_qformer_name(key)
        if target is None:
            skipped.append(key)
        else:
            loaders[target] = lambda k=key: raw[k]
    return raw.derived(loaders, skipped=skipped)


def lavis_qformer_name(key: str) -> str | None:
    if key == "query_tokens":
        return key
    if key.startswith("ln_vision."):
        return VISION + "post_layernorm." + key.removeprefix("ln_vision.")
    if key.startswith("Qformer.bert.embeddings.LayerNorm."):
        return "qformer.layernorm." + key.removeprefix("Qformer.bert.embeddings.LayerNorm.")
    m = _QFORMER_LAYER.match(key)
    if m and _QFORMER_KEEP.match(m.group(2)):
        rest = re.sub(r"^(attention|crossattention)\.self\.", r"\1.attention.", m.group(2))
        return f"qformer.encoder.layer.{m.group(1)}.{rest}"
    return None


def _rename(name: str, renames) -> str | None:
    for pattern, target in renames:
        if pattern.match(name):
            return pattern.sub(target, name)
    return None


def lavis_config_overrides(eva: TensorSource, qformer: TensorSource) -> dict:
    """ViT / Q-Former widths read from the LAVIS tensors (the files carry no config).

    Depths and head counts stay the preset's: a file with fewer ViT blocks or Q-Former layers than that is reported as
    missing tensors when it is loaded (never a smaller model); extra ViT blocks are dropped with a note.
    """
    def find(source: TensorSource, suffix: str, ndim: int):
        """The tensor named ``suffix``, or None; a tensor of another rank is an error naming the file and the key."""
        key = next((k for k in source if k.removeprefix("visual_encoder.") == suffix), None)
        if key is None:
            return None
        tensor = source[key]
        if tensor.ndim != ndim or 0 in tensor.shape:
            raise UserError(f"{source.origin}: tensor {key} has shape {list(tensor.shape)}; a LAVIS checkpoint "
                            f"holds it with {ndim} non-empty dimensions")
        return tensor

    vision, qf, out = {}, {}, {}
    if (cls := find(eva, "cls_token", 3)) is not None:
        vision["hidden_size"] = int(cls.shape[-1])
    if (fc1 := find(eva, "blocks.0.mlp.fc1.weight", 2)) is not None:
        vision["intermediate_size"] = int(fc1.shape[0])
    if (patch := find(eva, "patch_embed.proj.weight", 4)) is not None:
        vision["patch_size"] = int(patch.shape[-1])
    if (queries := find(qformer, "query_tokens", 3)) is not None:
        qf["hidden_size"] = int(queries.shape[-1])
        out["num_query_tokens"] = int(queries.shape[1])
    if (inter := find(qformer, "Qformer.bert.encoder.layer.0.intermediate_query.dense.weight", 2)) is not None:
        qf["intermediate_size"] = int(inter.shape[0])
    return {"vision": vision, "qformer": qf, **out}
