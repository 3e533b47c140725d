"""The modified Phi-2 of TinyGPT-V as a transformers ``PreTrainedModel``.

Decoder layer (parallel residual, as the original code runs it, not as the paper figure draws it)::

    h  = LN_in(x)
    a  = RMSNorm_post(Attn(h))          # RMSNorm only on the attention branch
    x' = x + a + MLP(h)

Attention: fused ``qkv`` Linear (rows ``[q; k; v]``) -> per-head LayerNorm on q and k (over head_dim, shared by heads)
-> partial NeoX RoPE on the first ``rotary_dim`` dims -> causal SDPA -> ``dense``. With ``attention: mmca`` in the
config the SDPA is multi-modal causal attention (``mmca.py``; which positions are image tokens: ``image_mask``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer

from .kv_cache import (
    CausalLMOutput,
    DecoderOutput,
    KVCache,
    cache_image_keys,
    cache_length,
    cache_update,
    take_cache,
    with_cache,
)
from .mmca import MMCAMask, mmca_attention, mmca_mask
from .phi_config import TinyGPTPhiConfig, attention_kind


class RMSNorm(nn.Module):
    """Weight-only RMSNorm with statistics in fp32; the output has the input's dtype."""

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_cos_sin(position_ids: torch.Tensor, rotary_dim: int, base: float, dtype: torch.dtype):
    """cos/sin of shape [B, S, rotary_dim] for NeoX-style rotation (frequencies repeated twice)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, device=position_ids.device).float() / rotary_dim))
    freqs = position_ids.float()[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_partial_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, H, S, D]; rotates the first cos.shape[-1] dims, passes the rest through."""
    rd = cos.shape[-1]
    rot, rest = x[..., :rd], x[..., rd:]
    cos, sin = cos[:, None], sin[:, None]
    return torch.cat((rot * cos + rotate_half(rot) * sin, rest), dim=-1)


class TinyGPTPhiAttention(nn.Module):
    def __init__(self, config: TinyGPTPhiConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.rotary_dim = config.rotary_dim
        self.rope_base = config.rope_base
        hidden = config.hidden_size
        self.qkv = nn.Linear(hidden, 3 * hidden, bias=True)
        self.dense = nn.Linear(hidden, hidden, bias=True)
        if config.qk_layernorm:
            self.q_layernorm = nn.LayerNorm(self.head_dim, eps=config.layer_norm_eps)
            self.k_layernorm = nn.LayerNorm(self.head_dim, eps=config.layer_norm_eps)
        else:
            self.q_layernorm = self.k_layernorm = None

    def forward(
        self,
        hidden_states: torch.Tensor,
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        attn_mask: torch.Tensor,
        cache,
    ) -> torch.Tensor:
        bsz, seq, _ = hidden_states.shape
        q, k, v = self.qkv(hidden_states).view(bsz, seq, 3, self.num_heads, self.head_dim).unbind(2)
        if self.q_layernorm is not None:
            q = self.q_layernorm(q)
            k = self.k_layernorm(k)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, S, D]
        cos, sin = cos_sin
        q = apply_partial_rope(q, cos, sin).to(v.dtype)
        k = apply_partial_rope(k, cos, sin).to(v.dtype)
        if cache is not None:
            k, v = cache_update(cache, k, v, self.layer_idx)
        if isinstance(attn_mask, MMCAMask):
            out = mmca_attention(q, k, v, attn_mask, self.head_dim**-0.5)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=self.head_dim**-0.5)
        return self.dense(out.transpose(1, 2).reshape(bsz, seq, -1))


class TinyGPTPhiMLP(nn.Module):
    def __init__(self, config: TinyGPTPhiConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        # Phi-2's "gelu_new" is the tanh approximation of GELU; torch's fused kernel computes the same function in one
        # pass (transformers' version is seven element-wise ops; speed-up: docs/benchmarks.md, "Tiny training speed").
        act = "gelu_pytorch_tanh" if config.hidden_act == "gelu_new" else config.hidden_act
        self.act = ACT2FN[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class TinyGPTPhiDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: TinyGPTPhiConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = TinyGPTPhiAttention(config, layer_idx)
        self.post_layernorm = (
            RMSNorm(config.hidden_size, config.rms_norm_eps) if config.post_attention_rmsnorm else None
        )
        if config.moe is not None and layer_idx in config.moe["layers"]:
            from .moe import MoEFeedForward  # lazy: moe.py builds its experts from TinyGPTPhiMLP (this module)

            self.mlp = MoEFeedForward(config)
        else:
            self.mlp = TinyGPTPhiMLP(config)
        self.resid_dropout = nn.Dropout(config.resid_pdrop)

    def forward(self, hidden_states, cos_sin=None, attn_mask=None, cache=None, token_mask=None, **kwargs):
        """``token_mask`` [B, S]: the real (not padding) positions, which alone an MoE FFN routes (None: all)."""
        h = self.input_layernorm(hidden_states)
        a = self.self_attn(h, cos_sin, attn_mask, cache)
        if self.post_layernorm is not None:
            a = self.post_layernorm(a)
        f = self.mlp(h) if isinstance(self.mlp, TinyGPTPhiMLP) else self.mlp(h, token_mask)
        return hidden_states + self.resid_dropout(a) + self.resid_dropout(f)


def build_attention_mask(
    attention_mask: torch.Tensor | None, batch: int, seq: int, past: int, device: torch.device
) -> torch.Tensor:
    """Boolean [B, 1, S, past+S] mask (True = may attend): causal AND key not padding.

    A query always sees itself, so a padding query never has an empty row (which would give NaN). A 4-D mask is
    taken as that mask already (packed rows: block-diagonal causal, ``packing.py``).
    """
    if attention_mask is not None and attention_mask.dim() == 4:
        return attention_mask.bool()
    total = past + seq
    q_pos = torch.arange(past, total, device=device)[:, None]
    k_pos = torch.arange(total, device=device)[None, :]
    mask = (k_pos <= q_pos)[None, None].expand(batch, 1, seq, total)
    if attention_mask is not None:
        keys = attention_mask[:, -total:].bool()
        mask = mask & keys[:, None, None, :]
    return mask | (k_pos == q_pos)[None, None]


def _new_image_flags(image_mask: torch.Tensor | None, batch: int, seq: int, device) -> torch.Tensor:
    if image_mask is None:
        return torch.zeros((batch, seq), dtype=torch.bool, device=device)
    if tuple(image_mask.shape) != (batch, seq):
        raise ValueError(f"image_mask must be [batch, new positions] = {[batch, seq]}, got {list(image_mask.shape)}")
    return image_mask.to(device=device, dtype=torch.bool)


def default_position_ids(attention_mask: torch.Tensor | None, batch: int, seq: int, past: int, device):
    """Positions count only real tokens, so left and right padding both give the unpadded positions."""
    if attention_mask is None:
        return torch.arange(past, past + seq, device=device)[None].expand(batch, seq)
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.clamp(min=0)[:, -seq:]


class TinyGPTPhiPreTrainedModel(PreTrainedModel):
    config_class = TinyGPTPhiConfig
    config: TinyGPTPhiConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["TinyGPTPhiDecoderLayer"]
    _skip_keys_device_placement = ["cache", "past_key_values"]
    _supports_sdpa = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            module.weight.normal_(0.0, std)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.normal_(0.0, std)
        elif isinstance(module, nn.LayerNorm):
            module.weight.fill_(1.0)
            module.bias.zero_()
        elif isinstance(module, RMSNorm):
            module.weight.fill_(1.0)


class TinyGPTPhiModel(TinyGPTPhiPreTrainedModel):
    def __init__(self, config: TinyGPTPhiConfig):
        super().__init__(config)
        config.validate_shapes()
        attention_kind(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.embed_dropout = nn.Dropout(config.embd_pdrop)
        self.layers = nn.ModuleList(TinyGPTPhiDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.final_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        image_mask: torch.Tensor | None = None,
        token_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> DecoderOutput:
        """``cache``: a KV cache (``kv_cache.py``), also accepted as ``past_key_values``; returned under both names.
        ``image_mask`` [B, S]: which of the new positions are image embeddings (read only with ``attention: mmca``;
        none given = all text); the cache remembers it for later steps. ``token_mask`` [B, S]: which new positions
        are real tokens, not padding (read only by MoE layers; none given: a 2-D ``attention_mask``'s last S
        columns, else all); a packed batch's 4-D mask does not say, so packing passes it."""
        cache = take_cache(cache, kwargs)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            use_cache = False  # no backward, no replay: generating from a model in training mode keeps its cache
        if use_cache and cache is None:
            cache = KVCache()
        if not use_cache:
            cache = None
        batch, seq, _ = inputs_embeds.shape
        past = cache_length(cache)
        device = inputs_embeds.device
        if position_ids is None:
            if attention_mask is not None and attention_mask.dim() == 4:
                raise ValueError("a 4-D attention_mask needs position_ids")
            position_ids = default_position_ids(attention_mask, batch, seq, past, device)
        mask = build_attention_mask(attention_mask, batch, seq, past, device)
        if attention_kind(self.config) == "mmca":
            key_is_image = cache_image_keys(cache, _new_image_flags(image_mask, batch, seq, device), past)
            mask = mmca_mask(mask, key_is_image, past)
        cos_sin = rope_cos_sin(position_ids, self.config.rotary_dim, self.config.rope_base, torch.float32)
        if self.config.moe is None:
            token_mask = None
        elif token_mask is None and attention_mask is not None and attention_mask.dim() == 2:
            token_mask = attention_mask[:, -seq:].to(device=device, dtype=torch.bool)
        hidden = self.embed_dropout(inputs_embeds)
        for layer in self.layers:
            hidden = layer(hidden, cos_sin=cos_sin, attn_mask=mask, cache=cache, token_mask=token_mask)
        hidden = self.final_layernorm(hidden)
        return with_cache(DecoderOutput, cache, last_hidden_state=hidden)


class TinyGPTPhiForCausalLM(TinyGPTPhiPreTrainedModel, GenerationMixin):
    def __init__(self, config: TinyGPTPhiConfig):
        super().__init__(config)
        self.model = TinyGPTPhiModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=True)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def prepare_inputs_for_generation(self, input_ids, inputs_embeds=None, image_mask=None, **kwargs):
        """transformers' step inputs, plus ``image_mask`` cut to this step's new positions: ``generate`` hands the
        prompt's mask [B, prompt] to every step; positions past the prompt (generated tokens) are text."""
        inputs = super().prepare_inputs_for_generation(input_ids, inputs_embeds=inputs_embeds, **kwargs)
        if image_mask is not None:
            new = inputs.get("inputs_embeds")
            seq = (new if new is not None else inputs["input_ids"]).shape[1]
            past = cache_length(inputs.get("cache", inputs.get("past_key_values")))
            flags = image_mask[:, past:past + seq].bool()
            inputs["image_mask"] = F.pad(flags, (0, seq - flags.shape[1]), value=False)
        return inputs

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        loss_only: bool = False,
        image_mask: torch.Tensor | None = None,
        token_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> CausalLMOutput:
        """``loss_only``: with labels, project to the vocabulary only where a label is supervised (training speed:
        the 51,200-wide lm_head dominates small models); ``logits`` is then None. Same loss either way."""
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=take_cache(cache, kwargs),
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            image_mask=image_mask,
            token_mask=token_mask,
        )
        hidden = out.last_hidden_state
        if loss_only and labels is not None:
            return CausalLMOutput(loss=self._with_aux(supervised_loss(self.lm_head, hidden, labels)), logits=None)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden).float()
        loss = None
        if labels is not None:
            loss = self._with_aux(causal_lm_loss(logits, labels))
        return with_cache(CausalLMOutput, out.cache, loss=loss, logits=logits)

    def _with_aux(self, loss: torch.Tensor) -> torch.Tensor:
        """The language-model loss plus the MoE layers' auxiliary losses of this forward (``moe.py``)."""
        if self.config.moe is None:
            return loss
        from .moe import moe_aux_loss  # lazy: see TinyGPTPhiDecoderLayer

        aux = moe_aux_loss(self)
        return loss if aux is None else loss + aux.to(loss.dtype)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Shifted cross-entropy, mean over supervised (label != -100) tokens of the whole batch."""
    shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1])
    shift_labels = labels[:, 1:].reshape(-1).to(logits.device)
    return F.cross_entropy(shift_logits, shift_labels, ignore_index=-100)


def supervised_loss(lm_head: nn.Linear, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The shifted cross-entropy of ``causal_lm_loss``, projecting only the positions that predict a label."""
    targets = labels[:, 1:].to(hidden.device)
    keep = targets != -100
    logits = lm_head(hidden[:, :-1][keep]).float()
    return F.cross_entropy(logits, targets[keep])
