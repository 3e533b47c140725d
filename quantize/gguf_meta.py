"""Metadata of the two GGUF files: hyper-parameters, tokenizer, prompt format, chat template.

Plain data in, a list of KV out; no model loading here (export.py and random_model.py supply the values).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from gguf import GGML_QUANT_VERSION, GGUFValueType, Keys, TokenType

from . import gguf_names as names
from .gguf_stream import KV, kv_array, kv_bool, kv_f32, kv_str, kv_u32

# BLIP-2 / EVA-CLIP image normalisation (LAVIS blip2_image_* processors).
BLIP2_IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
BLIP2_IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class LLMHyper:
    vocab_size: int
    context_length: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    rotary_dim: int
    rope_base: float
    layer_norm_eps: float
    rms_norm_eps: float
    qk_layernorm: bool
    post_attention_rmsnorm: bool
    attention: str = "causal"  # or "mmca" (names.ATTENTION)
    moe_layers: tuple[int, ...] = ()  # model.moe: the routed layers (empty: a dense model)
    num_experts: int = 0
    top_k: int = 0

    @classmethod
    def from_config(cls, c: Any) -> "LLMHyper":
        """From a TinyGPTPhiConfig (or anything with its attribute names)."""
        return cls(
            vocab_size=int(c.vocab_size), context_length=int(c.max_position_embeddings),
            hidden_size=int(c.hidden_size), intermediate_size=int(c.intermediate_size),
            num_layers=int(c.num_hidden_layers), num_heads=int(c.num_attention_heads),
            rotary_dim=int(c.rotary_dim), rope_base=float(c.rope_base),
            layer_norm_eps=float(c.layer_norm_eps), rms_norm_eps=float(c.rms_norm_eps),
            qk_layernorm=bool(c.qk_layernorm), post_attention_rmsnorm=bool(c.post_attention_rmsnorm),
            attention=str(getattr(c, "attention", None) or "causal"),
            **moe_hyper(getattr(c, "moe", None)),
        )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


def moe_hyper(moe: Any) -> dict[str, Any]:
    """LLMHyper's MoE fields from a config's ``moe`` section (None: dense)."""
    if moe is None:
        return {}
    return {"moe_layers": tuple(int(i) for i in moe["layers"]), "num_experts": int(moe["num_experts"]),
            "top_k": int(moe["top_k"])}


@dataclass(frozen=True)
class VisionHyper:
    image_size: int
    patch_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    layer_norm_eps: float
    ln_vision_eps: float
    qformer_hidden_size: int
    qformer_num_layers: int
    qformer_num_heads: int
    qformer_intermediate_size: int
    qformer_cross_attention_frequency: int
    qformer_encoder_hidden_size: int
    qformer_layer_norm_eps: float
    num_query_tokens: int
    proj_hidden_size: int
    llm_hidden_size: int
    image_mean: tuple[float, float, float] = BLIP2_IMAGE_MEAN
    image_std: tuple[float, float, float] = BLIP2_IMAGE_STD

    @classmethod
    def from_config(cls, c: Any) -> "VisionHyper":
        """From a TinyGPTVConfig (vision_config, qformer_config, text_config and the top-level sizes)."""
        v, q = c.vision_config, c.qformer_config
        return cls(
            image_size=int(v.image_size), patch_size=int(v.patch_size), hidden_size=int(v.hidden_size),
            num_layers=int(v.num_hidden_layers), num_heads=int(v.num_attention_heads),
            intermediate_size=int(v.intermediate_size), layer_norm_eps=float(v.layer_norm_eps),
            ln_vision_eps=float(c.ln_vision_eps),
            qformer_hidden_size=int(q.hidden_size), qformer_num_layers=int(q.num_hidden_layers),
            qformer_num_heads=int(q.num_attention_heads), qformer_intermediate_size=int(q.intermediate_size),
            qformer_cross_attention_frequency=int(q.cross_attention_frequency),
            qformer_encoder_hidden_size=int(q.encoder_hidden_size), qformer_layer_norm_eps=float(q.layer_norm_eps),
            num_query_tokens=int(c.num_query_tokens), proj_hidden_size=int(c.proj_hidden_size),
            llm_hidden_size=int(c.text_config.hidden_size),
            image_mean=tuple(float(x) for x in getattr(c, "image_mean", None) or BLIP2_IMAGE_MEAN),
            image_std=tuple(float(x) for x in getattr(c, "image_std", None) or BLIP2_IMAGE_STD),
        )

    def shape_values(self) -> dict[str, int]:
        """The integer keys of gguf_names.VISION_SHAPE_KEYS (short names) -> values."""
        return {k: int(getattr(self, k.replace(".", "_"))) for k in names.VISION_SHAPE_KEYS}

    def hash(self) -> str:
        return names.vision_hash(self.shape_values())


@dataclass(frozen=True)
class PromptInfo:
    prompt_template: str = "###Human: {} ###Assistant: "
    end_sym: str = "###"
    stop_strings: tuple[str, ...] = ("###",)
    image_token_count: int = 32
    image_placeholder: str = "<ImageHere>"

    @classmethod
    def from_config(cls, c: Any) -> "PromptInfo":
        """From a TinyGPTVConfig. A template without ``{}`` has the user text appended, as training wraps it
        (tinygpt.model.sequence.PromptFormat.wrap): the file always holds the one ``{}``."""
        template = str(c.prompt_template)
        return cls(
            prompt_template=template if "{}" in template else template + "{}", end_sym=str(c.end_sym),
            stop_strings=tuple(str(s) for s in (c.stop_strings or ())),
            image_token_count=int(c.num_query_tokens), image_placeholder=str(c.image_placeholder),
        )


@dataclass(frozen=True)
class TokenizerMeta:
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    bos_id: int
    eos_id: int
    pad_id: int


def tokenizer_metadata(tokenizer: Any, vocab_size: int, bos_id: int, eos_id: int, pad_id: int) -> TokenizerMeta:
    """Token list by id (padded to vocab_size with "[PAD{id}]"), types and merges of a HF fast BPE tokenizer.

    Types as llama.cpp's converter sets them: special added tokens (e.g. <|endoftext|>) CONTROL, other added tokens
    (Phi-2's whitespace runs) USER_DEFINED, the BPE vocabulary NORMAL, padding UNUSED.
    """
    by_id = {int(i): tok for tok, i in tokenizer.get_vocab().items()}
    if not by_id:
        raise ValueError("tokenizer has an empty vocabulary")
    if max(by_id) >= vocab_size:
        raise ValueError(f"tokenizer has id {max(by_id)} but the model's vocab_size is {vocab_size}")
    added = {int(i): t for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items()}
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(int(TokenType.UNUSED))
        elif i in added:
            tokens.append(by_id[i])
            types.append(int(TokenType.CONTROL if added[i].special else TokenType.USER_DEFINED))
        else:
            tokens.append(by_id[i])
            types.append(int(TokenType.NORMAL))
    return TokenizerMeta(tokens, types, _merges(tokenizer), int(bos_id), int(eos_id), int(pad_id))


def _merges(tokenizer: Any) -> list[str]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(f"{type(tokenizer).__name__} is not a fast (tokenizers-backed) tokenizer; merges unknown")
    model = json.loads(backend.to_str()).get("model", {})
    if model.get("type") != "BPE":
        raise ValueError(f"tokenizer model is {model.get('type')!r}, GGUF 'gpt2' needs BPE")
    return [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]


def chat_template(prompt: PromptInfo) -> str:
    """A Jinja chat template that renders exactly what tinygpt.model.sequence builds for generation.

    Each user turn: bos_token + prompt_template with "{}" replaced by the text; each assistant turn: text + end_sym.
    """
    parts = prompt.prompt_template.split("{}")
    if len(parts) == 1:
        parts.append("")
    user = "{{ bos_token }}" + "{{ message['content'] }}".join(_jinja_literal(p) for p in parts)
    return (
        "{% for message in messages %}"
        "{% if message['role'] == 'user' %}" + user +
        "{% elif message['role'] == 'assistant' %}{{ message['content'] }}" + _jinja_literal(prompt.end_sym) +
        "{% endif %}{% endfor %}"
    )


def _jinja_literal(text: str) -> str:
    if not text:
        return ""
    escaped = text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n").replace("\t", "\\t")
    return "{{ '" + escaped + "' }}"


def llm_kv(
    hyper: LLMHyper, tok: TokenizerMeta, prompt: PromptInfo, vision_hash: str, name: str, file_type: int,
    model_id: str,
) -> list[KV]:
    a = names
    kv = [
        kv_str(Keys.General.NAME, name),
        kv_u32(Keys.General.FILE_TYPE, file_type),
        kv_u32(Keys.General.QUANTIZATION_VERSION, GGML_QUANT_VERSION),
        kv_u32(a.LLM_CONTEXT_LENGTH, hyper.context_length),
        kv_u32(a.LLM_EMBEDDING_LENGTH, hyper.hidden_size),
        kv_u32(a.LLM_FEED_FORWARD_LENGTH, hyper.intermediate_size),
        kv_u32(a.LLM_BLOCK_COUNT, hyper.num_layers),
        kv_u32(a.LLM_HEAD_COUNT, hyper.num_heads),
        kv_u32(a.LLM_HEAD_COUNT_KV, hyper.num_heads),
        kv_u32(a.LLM_ROPE_DIMENSION_COUNT, hyper.rotary_dim),
        kv_f32(a.LLM_ROPE_FREQ_BASE, hyper.rope_base),
        kv_f32(a.LLM_LAYER_NORM_EPS, hyper.layer_norm_eps),
    ]
    if hyper.post_attention_rmsnorm:
        kv.append(kv_f32(a.LLM_RMS_NORM_EPS, hyper.rms_norm_eps))
    kv += [
        kv_str(Keys.Tokenizer.MODEL, "gpt2"),
        kv_str(Keys.Tokenizer.PRE, "phi-2"),
        kv_array(Keys.Tokenizer.LIST, tok.tokens, GGUFValueType.STRING),
        kv_array(Keys.Tokenizer.TOKEN_TYPE, tok.token_types, GGUFValueType.INT32),
        kv_array(Keys.Tokenizer.MERGES, tok.merges, GGUFValueType.STRING),
        kv_u32(Keys.Tokenizer.BOS_ID, tok.bos_id),
        kv_u32(Keys.Tokenizer.EOS_ID, tok.eos_id),
        kv_u32(Keys.Tokenizer.PAD_ID, tok.pad_id),
        kv_bool(Keys.Tokenizer.ADD_BOS, False),
        kv_str(Keys.Tokenizer.CHAT_TEMPLATE, chat_template(prompt)),
        kv_str(a.PROMPT_TEMPLATE, prompt.prompt_template),
        kv_str(a.END_SYM, prompt.end_sym),
        kv_array(a.STOP_STRINGS, list(prompt.stop_strings), GGUFValueType.STRING),
        kv_u32(a.IMAGE_TOKEN_COUNT, prompt.image_token_count),
        kv_str(a.IMAGE_PLACEHOLDER, prompt.image_placeholder),
        kv_str(a.VISION_HASH, vision_hash),
        kv_str(a.MODEL_ID, model_id),
        kv_bool(a.QK_LAYERNORM, hyper.qk_layernorm),
        kv_bool(a.POST_ATTENTION_RMSNORM, hyper.post_attention_rmsnorm),
    ]
    if hyper.attention != "causal":  # absent = causal, so a causal file is byte for byte what it was before the key
        kv.append(kv_str(a.ATTENTION, hyper.attention))
    if hyper.moe_layers:  # absent = dense, likewise
        kv += [kv_u32(a.EXPERT_COUNT, hyper.num_experts), kv_u32(a.EXPERT_USED_COUNT, hyper.top_k),
               kv_array(a.MOE_LAYERS, list(hyper.moe_layers), GGUFValueType.INT32)]
    return kv


def vision_kv(hyper: VisionHyper, name: str, model_id: str) -> list[KV]:
    key = names.vision_key
    kv = [kv_str(Keys.General.NAME, name), kv_str(names.VISION_MODEL_ID, model_id)]
    kv += [kv_u32(key(k), v) for k, v in hyper.shape_values().items()]
    kv += [kv_f32(key(k), getattr(hyper, k.replace(".", "_"))) for k in names.VISION_FLOAT_KEYS]
    kv += [kv_array(key(k), list(getattr(hyper, k)), GGUFValueType.FLOAT32) for k in names.VISION_ARRAY_KEYS]
    return kv

