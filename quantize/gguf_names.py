"""Names shared by the GGUF exporter and the CPU runtime: files, metadata keys, tensor-name tables.

Two files per export (llama.cpp's model + mmproj convention):
  llm-<qtype>.gguf   general.architecture = "phi2", stock phi2 tensor names plus the extra norms
  vision.gguf        general.architecture = "tinygptv-vision", our state-dict names shortened by VISION_TENSOR_RULES

Tensor tables are lists of (pytorch_template, gguf_template). "{N}" stands for a layer index. A template that
ends with "." is a module prefix and matches its ".weight" / ".bias" leaves; any other template is a whole name
(a bare Parameter such as query_tokens). Every table is a bijection, so a GGUF name maps back to exactly one
PyTorch name (gguf_to_torch_*), which the runtime uses to rebuild modules.

Vision table (full PyTorch name -> GGUF name):
  vision_model.embeddings.class_embedding                 -> v.cls
  vision_model.embeddings.position_embedding              -> v.pos
  vision_model.embeddings.patch_embedding.*               -> v.patch.*
  vision_model.encoder.layers.N.self_attn.qkv.*           -> v.enc.N.attn.qkv.*
  vision_model.encoder.layers.N.self_attn.projection.*    -> v.enc.N.attn.out.*
  vision_model.encoder.layers.N.layer_norm1.*             -> v.enc.N.ln1.*
  vision_model.encoder.layers.N.layer_norm2.*             -> v.enc.N.ln2.*
  vision_model.encoder.layers.N.mlp.fc1.* / fc2.*         -> v.enc.N.fc1.* / v.enc.N.fc2.*
  vision_model.post_layernorm.*  (= ln_vision)            -> v.ln_vision.*
  qformer.layernorm.*                                     -> qf.ln.*
  qformer.encoder.layer.N.attention.attention.{query,key,value}.*   -> qf.N.attn.{query,key,value}.*
  qformer.encoder.layer.N.attention.output.dense.*        -> qf.N.attn.out.*
  qformer.encoder.layer.N.attention.output.LayerNorm.*    -> qf.N.attn.ln.*
  qformer.encoder.layer.N.crossattention.(same as above)  -> qf.N.xattn.(query|key|value|out|ln).*
  qformer.encoder.layer.N.intermediate_query.dense.*      -> qf.N.ffn_up.*
  qformer.encoder.layer.N.output_query.dense.*            -> qf.N.ffn_down.*
  qformer.encoder.layer.N.output_query.LayerNorm.*        -> qf.N.ffn_ln.*
  query_tokens, proj1.*, proj2.*                          -> unchanged
"""
from __future__ import annotations

import hashlib
import re
from typing import Iterable, Mapping

# ---------------------------------------------------------------------------------------------- files
ARCH_LLM = "phi2"
ARCH_VISION = "tinygptv-vision"
VISION_FILE_NAME = "vision.gguf"
SUMMARY_FILE_NAME = "export.json"
QTYPES = ("q4_k", "q4_0", "q8_0", "f16")  # user-facing names for --qtype


def llm_file_name(qtype: str) -> str:
    """'q4_k' -> 'llm-q4_k.gguf'."""
    return f"llm-{qtype}.gguf"


# ------------------------------------------------------------------------------------------- LLM keys
# Keys that gguf.Keys formats with the architecture name ("phi2.context_length" ...).
LLM_CONTEXT_LENGTH = f"{ARCH_LLM}.context_length"
LLM_EMBEDDING_LENGTH = f"{ARCH_LLM}.embedding_length"
LLM_FEED_FORWARD_LENGTH = f"{ARCH_LLM}.feed_forward_length"
LLM_BLOCK_COUNT = f"{ARCH_LLM}.block_count"
LLM_HEAD_COUNT = f"{ARCH_LLM}.attention.head_count"
LLM_HEAD_COUNT_KV = f"{ARCH_LLM}.attention.head_count_kv"
LLM_ROPE_DIMENSION_COUNT = f"{ARCH_LLM}.rope.dimension_count"
LLM_ROPE_FREQ_BASE = f"{ARCH_LLM}.rope.freq_base"
LLM_LAYER_NORM_EPS = f"{ARCH_LLM}.attention.layer_norm_epsilon"
LLM_RMS_NORM_EPS = f"{ARCH_LLM}.attention.layer_norm_rms_epsilon"  # present only with the post-attention norm

# Our own keys in the LLM file.
PROMPT_TEMPLATE = "tinygptv.prompt_template"  # e.g. "###Human: {} ###Assistant: "
END_SYM = "tinygptv.end_sym"
STOP_STRINGS = "tinygptv.stop_strings"  # array of str
IMAGE_TOKEN_COUNT = "tinygptv.image_token_count"  # 32
IMAGE_PLACEHOLDER = "tinygptv.image_placeholder"  # "<ImageHere>"
VISION_HASH = "tinygptv.vision_hash"  # vision_hash() of the paired vision file's keys
MODEL_ID = "tinygptv.model_id"  # sha256 of the exported model's content; the vision file carries the same value
QK_LAYERNORM = "tinygptv.qk_layernorm"  # bool, informative (the tensors are the truth)
POST_ATTENTION_RMSNORM = "tinygptv.post_attention_rmsnorm"  # bool, informative
# str "mmca": multi-modal causal attention (image rows attend to image rows only; text rows add a softmax over earlier
# text and one over earlier image rows). Written only for mmca; a file without it is causal (older exports too).
ATTENTION = "tinygptv.attention"
ATTENTION_KINDS = ("causal", "mmca")
# MoE (model.moe; written only for a model with MoE layers, so a dense file is byte for byte what it was): llama.cpp's
# keys as it names them for the architecture, and ours for which layers are routed (llama.cpp has no such key).
EXPERT_COUNT = f"{ARCH_LLM}.expert_count"  # experts per MoE layer
EXPERT_USED_COUNT = f"{ARCH_LLM}.expert_used_count"  # top-k
MOE_LAYERS = "tinygptv.moe_layers"  # array of int: the MoE layers; the others keep the dense ffn_up / ffn_down
# An MoE layer's FFN tensors (llama.cpp's convention; ggml order): ffn_gate_inp (router) [n_embd, n_expert],
# ffn_up_exps [n_embd, n_ff, n_expert] + bias [n_ff, n_expert], ffn_down_exps [n_ff, n_embd, n_expert] + bias
# [n_embd, n_expert]. Expert e's slice is model.layers.N.mlp.experts.e.fc1 / fc2.
MOE_FFN_TENSORS = ("ffn_gate_inp.weight", "ffn_up_exps.weight", "ffn_up_exps.bias", "ffn_down_exps.weight",
                   "ffn_down_exps.bias")

# ---------------------------------------------------------------------------------------- vision keys
def vision_key(name: str) -> str:
    """'image_size' -> 'tinygptv-vision.image_size'."""
    return f"{ARCH_VISION}.{name}"


VISION_MODEL_ID = f"{ARCH_VISION}.model_id"  # == the LLM file's MODEL_ID: both files come from one export

# Integer hyper-parameters that fix every tensor shape of the vision file (and its output width).
VISION_SHAPE_KEYS = (
    "image_size", "patch_size", "hidden_size", "num_layers", "num_heads", "intermediate_size",
    "qformer.hidden_size", "qformer.num_layers", "qformer.num_heads", "qformer.intermediate_size",
    "qformer.cross_attention_frequency", "qformer.encoder_hidden_size",
    "num_query_tokens", "proj_hidden_size", "llm_hidden_size",
)
VISION_FLOAT_KEYS = ("layer_norm_eps", "ln_vision_eps", "qformer.layer_norm_eps")
VISION_ARRAY_KEYS = ("image_mean", "image_std")  # 3 floats each


def vision_hash(shape_values: Mapping[str, int]) -> str:
    """sha256 hex of the canonical string "key=value;..." over VISION_SHAPE_KEYS (short names, sorted).

    shape_values maps the short names of VISION_SHAPE_KEYS (or their full 'tinygptv-vision.' forms) to ints.
    """
    short = {k[len(ARCH_VISION) + 1:] if k.startswith(ARCH_VISION + ".") else k: v for k, v in shape_values.items()}
    missing = [k for k in VISION_SHAPE_KEYS if k not in short]
    if missing:
        raise KeyError(f"vision shape keys missing: {', '.join(missing)}")
    canonical = ";".join(f"{k}={int(short[k])}" for k in sorted(VISION_SHAPE_KEYS))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


# ------------------------------------------------------------------------------------- tensor tables
# LLM names are relative to TinyGPTPhiForCausalLM; a VLM state dict carries them under LLM_PREFIX.
LLM_PREFIX = "language_model."

LLM_TENSOR_RULES: tuple[tuple[str, str], ...] = (
    ("model.embed_tokens.weight", "token_embd.weight"),
    ("model.layers.{N}.input_layernorm.", "blk.{N}.attn_norm."),
    ("model.layers.{N}.self_attn.qkv.", "blk.{N}.attn_qkv."),
    ("model.layers.{N}.self_attn.q_layernorm.", "blk.{N}.attn_q_norm."),
    ("model.layers.{N}.self_attn.k_layernorm.", "blk.{N}.attn_k_norm."),
    ("model.layers.{N}.self_attn.dense.", "blk.{N}.attn_output."),
    ("model.layers.{N}.post_layernorm.", "blk.{N}.post_attention_norm."),
    ("model.layers.{N}.mlp.fc1.", "blk.{N}.ffn_up."),
    ("model.layers.{N}.mlp.fc2.", "blk.{N}.ffn_down."),
    ("model.layers.{N}.mlp.router.weight", "blk.{N}.ffn_gate_inp.weight"),  # MoE router (experts: expert_slice)
    ("model.final_layernorm.", "output_norm."),
    ("lm_head.", "output."),
)

_V = "vision_model."
_VL = _V + "encoder.layers.{N}."
_Q = "qformer.encoder.layer.{N}."
VISION_TENSOR_RULES: tuple[tuple[str, str], ...] = (
    (_V + "embeddings.class_embedding", "v.cls"),
    (_V + "embeddings.position_embedding", "v.pos"),
    (_V + "embeddings.patch_embedding.", "v.patch."),
    (_VL + "self_attn.qkv.", "v.enc.{N}.attn.qkv."),
    (_VL + "self_attn.projection.", "v.enc.{N}.attn.out."),
    (_VL + "layer_norm1.", "v.enc.{N}.ln1."),
    (_VL + "layer_norm2.", "v.enc.{N}.ln2."),
    (_VL + "mlp.fc1.", "v.enc.{N}.fc1."),
    (_VL + "mlp.fc2.", "v.enc.{N}.fc2."),
    (_V + "post_layernorm.", "v.ln_vision."),
    ("qformer.layernorm.", "qf.ln."),
    *(
        (_Q + f"{src}.attention.{part}.", f"qf.{{N}}.{dst}.{part}.")
        for src, dst in (("attention", "attn"), ("crossattention", "xattn"))
        for part in ("query", "key", "value")
    ),
    (_Q + "attention.output.dense.", "qf.{N}.attn.out."),
    (_Q + "attention.output.LayerNorm.", "qf.{N}.attn.ln."),
    (_Q + "crossattention.output.dense.", "qf.{N}.xattn.out."),
    (_Q + "crossattention.output.LayerNorm.", "qf.{N}.xattn.ln."),
    (_Q + "intermediate_query.dense.", "qf.{N}.ffn_up."),
    (_Q + "output_query.dense.", "qf.{N}.ffn_down."),
    (_Q + "output_query.LayerNorm.", "qf.{N}.ffn_ln."),
    ("query_tokens", "query_tokens"),
    ("proj1.", "proj1."),
    ("proj2.", "proj2."),
)
VISION_PREFIXES = ("vision_model.", "qformer.", "query_tokens", "proj1.", "proj2.")
MAX_NAME_LENGTH = 63  # GGUF_MAX_NAME in ggml is 64 bytes including the terminating NUL


def _compile(template: str) -> re.Pattern:
    body = re.escape(template).replace(re.escape("{N}"), r"(?P<N>\d+)")
    if template.endswith("."):
        body += r"(?P<leaf>weight|bias)"
    return re.compile(body)


def _fill(template: str, match: re.Match) -> str:
    out = template.replace("{N}", match.group("N")) if "{N}" in template else template
    return out + match.group("leaf") if template.endswith(".") else out


def _translate(name: str, rules: Iterable[tuple[str, str]], forward: bool) -> str | None:
    for src, dst in rules:
        a, b = (src, dst) if forward else (dst, src)
        m = _compile(a).fullmatch(name)
        if m:
            return _fill(b, m)
    return None


def torch_to_gguf_llm(name: str) -> str:
    """'language_model.model.layers.3.self_attn.qkv.weight' (prefix optional) -> 'blk.3.attn_qkv.weight'."""
    short = name[len(LLM_PREFIX):] if name.startswith(LLM_PREFIX) else name
    out = _translate(short, LLM_TENSOR_RULES, forward=True)
    if out is None:
        raise KeyError(f"no GGUF name for LLM tensor {name!r}")
    return out


def gguf_to_torch_llm(name: str) -> str:
    """'blk.3.attn_qkv.weight' -> 'model.layers.3.self_attn.qkv.weight' (no 'language_model.' prefix)."""
    out = _translate(name, LLM_TENSOR_RULES, forward=False)
    if out is None:
        raise KeyError(f"unknown LLM GGUF tensor {name!r}")
    return out


def torch_to_gguf_vision(name: str) -> str:
    """'qformer.encoder.layer.7.crossattention.attention.key.weight' -> 'qf.7.xattn.key.weight'."""
    out = _translate(name, VISION_TENSOR_RULES, forward=True)
    if out is None:
        raise KeyError(f"no GGUF name for vision tensor {name!r}")
    return out


def gguf_to_torch_vision(name: str) -> str:
    """Inverse of torch_to_gguf_vision."""
    out = _translate(name, VISION_TENSOR_RULES, forward=False)
    if out is None:
        raise KeyError(f"unknown vision GGUF tensor {name!r}")
    return out


def is_vision_tensor(torch_name: str) -> bool:
    """True for the VLM state-dict entries that belong in vision.gguf."""
    return torch_name.startswith(VISION_PREFIXES)


_EXPERT = re.compile(r"(?:language_model\.)?model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(fc[12])\.(weight|bias)")


def expert_slice(name: str) -> tuple[str, int] | None:
    """'language_model.model.layers.3.mlp.experts.2.fc1.weight' -> ('blk.3.ffn_up_exps.weight', 2): the stacked GGUF
    tensor an expert's parameter goes into, and its index there; None for any other name."""
    m = _EXPERT.fullmatch(name)
    if m is None:
        return None
    part = "ffn_up_exps" if m.group(3) == "fc1" else "ffn_down_exps"
    return f"blk.{m.group(1)}.{part}.{m.group(4)}", int(m.group(2))


def llm_tensor_names(n_layers: int, qk_layernorm: bool, post_attention_rmsnorm: bool,
                     moe_layers: Iterable[int] = ()) -> list[str]:
    """Every GGUF tensor name an LLM file of this shape holds, in file order (MoE layers: MOE_FFN_TENSORS)."""
    moe_layers = set(moe_layers)
    names = ["token_embd.weight"]
    for i in range(n_layers):
        b = f"blk.{i}."
        names += [b + "attn_norm.weight", b + "attn_norm.bias", b + "attn_qkv.weight", b + "attn_qkv.bias"]
        if qk_layernorm:
            names += [b + "attn_q_norm.weight", b + "attn_q_norm.bias",
                      b + "attn_k_norm.weight", b + "attn_k_norm.bias"]
        names += [b + "attn_output.weight", b + "attn_output.bias"]
        if post_attention_rmsnorm:
            names += [b + "post_attention_norm.weight"]
        if i in moe_layers:
            names += [b + t for t in MOE_FFN_TENSORS]
        else:
            names += [b + "ffn_up.weight", b + "ffn_up.bias", b + "ffn_down.weight", b + "ffn_down.bias"]
    names += ["output_norm.weight", "output_norm.bias", "output.weight", "output.bias"]
    return names
