"""Checkpoints in every source's own layout at tiny sizes, with the REAL key names, and references computed
directly from the source-named tensors: what the weight-import tests load and compare against.

* ``hf_phi`` / ``hf_blip2``: transformers' Phi and BLIP-2 models (random weights) to save in the hub layouts;
* ``lavis_files``: LAVIS ``eva_vit_g.pth`` and ``blip2_pretrained_flant5xxl.pth``;
* ``released_state`` + ``reference_logits``: a released TinyGPT-V checkpoint (fused interleaved ``query_key_value``,
  peft 0.2.0 LoRA names) and the original patched Phi forward written from its tensors.
"""

from __future__ import annotations

import json
import math

import torch
import torch.nn.functional as F

from tinygpt.model import TinyGPTPhiConfig, TinyGPTPhiForCausalLM, TinyGPTVForConditionalGeneration
from tinygpt.weights.build import make_config
from tinygpt.weights.phi2 import phi_text_overrides

HEADS, HIDDEN, LAYERS, VOCAB = 4, 32, 2, 120
TEXT = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=LAYERS,
            num_attention_heads=HEADS, rotary_dim=4, resid_pdrop=0.0)
VIT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=28,
           patch_size=14)
QFORMER = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
SIZES = {"vision": VIT, "qformer": QFORMER, "num_query_tokens": 8}


def randomise(module: torch.nn.Module, std: float = 0.3, seed: int = 0) -> None:
    """Every parameter random (norm weights around 1), so a wrong mapping cannot go unnoticed."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * std
            p.copy_(1.0 + noise if ("norm" in name.lower() and name.endswith("weight")) else noise)


def tiny_vlm(extra_norms: bool = True, image_size: int | None = None, lora=None) -> TinyGPTVForConditionalGeneration:
    config = make_config("tiny", TEXT, SIZES, image_size, extra_norms, lora)
    return TinyGPTVForConditionalGeneration(config).eval()


def hf_phi(qk_layernorm: bool):
    from transformers import PhiConfig, PhiForCausalLM

    config = PhiConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=LAYERS,
                       num_attention_heads=HEADS, partial_rotary_factor=0.5, qk_layernorm=qk_layernorm,
                       resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0)
    model = PhiForCausalLM(config).eval()
    randomise(model, std=0.2, seed=1)
    return model


def our_llm(directory, post_norm: bool = False) -> TinyGPTPhiForCausalLM:
    overrides = phi_text_overrides(json.loads((directory / "config.json").read_text()), "config.json")
    overrides.setdefault("qk_layernorm", False)
    config = TinyGPTPhiConfig(**overrides, post_attention_rmsnorm=post_norm, resid_pdrop=0.0)
    return TinyGPTPhiForCausalLM(config).eval()


IDS = torch.tensor([[5, 17, 3, 99, 42, 7, 1, 64], [8, 8, 9, 100, 2, 30, 11, 0]])


def hf_blip2():
    from transformers import Blip2Config, Blip2ForConditionalGeneration, OPTConfig

    config = Blip2Config(
        vision_config=dict(VIT), qformer_config=dict(QFORMER, encoder_hidden_size=32), num_query_tokens=8,
        text_config=OPTConfig(hidden_size=16, num_hidden_layers=1, ffn_dim=32, num_attention_heads=2,
                              vocab_size=50, word_embed_proj_dim=16).to_dict(),
    )
    model = Blip2ForConditionalGeneration(config).eval()
    randomise(model, std=0.2, seed=2)
    return model


def hf_qformer_features(model, pixels):
    with torch.no_grad():
        image = model.vision_model(pixel_values=pixels).last_hidden_state
        queries = model.query_tokens.expand(pixels.shape[0], -1, -1)
        return model.qformer(query_embeds=queries, encoder_hidden_states=image).last_hidden_state


def lavis_files(tmp_path, prefix: str, eva_blocks: int = 4, qformer_layers: int = 2):
    """eva_vit_g.pth and blip2_pretrained_flant5xxl.pth with LAVIS names, tiny sizes: 4 ViT blocks (the tiny preset's
    depth; ``tiny_vlm`` uses 2) and 2 Q-Former layers by default."""
    gen = torch.Generator().manual_seed(4)

    def r(*shape, base=0.0):
        return base + torch.randn(*shape, generator=gen) * 0.2

    d, f = 32, 64
    eva = {"cls_token": r(1, 1, d), "pos_embed": r(1, 5, d), "patch_embed.proj.weight": r(d, 3, 14, 14),
           "patch_embed.proj.bias": r(d)}
    for i in range(eva_blocks):
        b = f"blocks.{i}."
        eva.update({b + "norm1.weight": r(d, base=1), b + "norm1.bias": r(d), b + "attn.qkv.weight": r(3 * d, d),
                    b + "attn.q_bias": r(d), b + "attn.v_bias": r(d), b + "attn.proj.weight": r(d, d),
                    b + "attn.proj.bias": r(d), b + "norm2.weight": r(d, base=1), b + "norm2.bias": r(d),
                    b + "mlp.fc1.weight": r(f, d), b + "mlp.fc1.bias": r(f), b + "mlp.fc2.weight": r(d, f),
                    b + "mlp.fc2.bias": r(d)})
    eva = {prefix + k: v for k, v in eva.items()}
    q = {"query_tokens": r(1, 8, d), "ln_vision.weight": r(d, base=1), "ln_vision.bias": r(d),
         "Qformer.bert.embeddings.LayerNorm.weight": r(d, base=1), "Qformer.bert.embeddings.LayerNorm.bias": r(d),
         "Qformer.bert.embeddings.position_ids": torch.arange(512)[None], "t5_proj.weight": r(16, d)}
    for i in range(qformer_layers):
        b = f"Qformer.bert.encoder.layer.{i}."
        parts = ["attention"] + (["crossattention"] if i % 2 == 0 else [])
        for part in parts:
            for name in ("query", "key", "value"):
                q[f"{b}{part}.self.{name}.weight"] = r(d, d)
                q[f"{b}{part}.self.{name}.bias"] = r(d)
            q[f"{b}{part}.output.dense.weight"], q[f"{b}{part}.output.dense.bias"] = r(d, d), r(d)
            q[f"{b}{part}.output.LayerNorm.weight"], q[f"{b}{part}.output.LayerNorm.bias"] = r(d, base=1), r(d)
        q[b + "intermediate_query.dense.weight"], q[b + "intermediate_query.dense.bias"] = r(f, d), r(f)
        q[b + "output_query.dense.weight"], q[b + "output_query.dense.bias"] = r(d, f), r(d)
        q[b + "output_query.LayerNorm.weight"], q[b + "output_query.LayerNorm.bias"] = r(d, base=1), r(d)
    torch.save(eva, tmp_path / "eva_vit_g.pth")
    torch.save({"model": q, "epoch": 3}, tmp_path / "blip2_pretrained_flant5xxl.pth")
    return {k.removeprefix(prefix): v for k, v in eva.items()}, q


def released_state(stage: int, rank: int = 64):
    """A TinyGPT-V checkpoint with the original names: fused interleaved query_key_value, peft 0.2.0 LoRA names."""
    gen = torch.Generator().manual_seed(10 + stage)

    def r(*shape, base=0.0):
        return base + torch.randn(*shape, generator=gen) * 0.2

    prefix = "llama_model.model." if stage == 1 else "llama_model.base_model.model.model."
    head = "llama_model.lm_head." if stage == 1 else "llama_model.base_model.model.lm_head."
    h, hd = HIDDEN, HIDDEN // HEADS
    s = {"llama_proj.weight": r(512, 32), "llama_proj.bias": r(512), "llama_proj2.weight": r(h, 512),
         "llama_proj2.bias": r(h), prefix + "embed_tokens.weight": r(VOCAB, h), head + "weight": r(VOCAB, h),
         head + "bias": r(VOCAB), prefix + "final_layernorm.weight": r(h, base=1),
         prefix + "final_layernorm.bias": r(h), "Qformer.bert.embeddings.position_ids": torch.arange(512)[None]}
    for i in range(LAYERS):
        p = f"{prefix}layers.{i}."
        s.update({p + "input_layernorm.weight": r(h, base=1), p + "input_layernorm.bias": r(h),
                  p + "self_attn.query_key_value.weight": r(3 * h, h), p + "self_attn.query_key_value.bias": r(3 * h),
                  p + "self_attn.dense.weight": r(h, h), p + "self_attn.dense.bias": r(h),
                  p + "self_attn.q_layernorm.weight": r(hd, base=1), p + "self_attn.q_layernorm.bias": r(hd),
                  p + "self_attn.k_layernorm.weight": r(hd, base=1), p + "self_attn.k_layernorm.bias": r(hd),
                  p + "post_layernorm.weight": r(h, base=1), p + "mlp.fc1.weight": r(64, h),
                  p + "mlp.fc1.bias": r(64), p + "mlp.fc2.weight": r(h, 64), p + "mlp.fc2.bias": r(h)})
        if stage > 1:
            for module, out in (("query_key_value", 3 * h), ("dense", h)):
                s[f"{p}self_attn.{module}.lora_A.weight"] = r(rank, h)
                s[f"{p}self_attn.{module}.lora_B.weight"] = r(out, rank)
    return s, prefix, head


def reference_logits(s, prefix, head, ids, lora_scale=16 / 64):
    """TinyGPT-V's patched Phi forward in the original layout: view(B,S,heads,3,head_dim) split, dW = 0.25 B A."""
    def w(name):
        return s[prefix + name]

    def linear(x, name):
        weight = w(name + ".weight")
        if prefix + name + ".lora_A.weight" in s:
            weight = weight + lora_scale * w(name + ".lora_B.weight") @ w(name + ".lora_A.weight")
        return F.linear(x, weight, w(name + ".bias"))

    x = w("embed_tokens.weight")[ids]
    b_, n, h = x.shape
    hd, rot = h // HEADS, 4
    inv = 1.0 / (10000 ** (torch.arange(0, rot, 2).float() / rot))
    ang = torch.arange(n).float()[:, None] * inv
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()

    def rope(t):
        r, rest = t[..., :rot], t[..., rot:]
        rotated = torch.cat([-r[..., rot // 2:], r[..., : rot // 2]], -1)
        return torch.cat([r * cos + rotated * sin, rest], -1)

    causal = torch.ones(n, n, dtype=torch.bool).tril()
    for i in range(LAYERS):
        p = f"layers.{i}."
        hn = F.layer_norm(x, (h,), w(p + "input_layernorm.weight"), w(p + "input_layernorm.bias"), 1e-5)
        fused = linear(hn, p + "self_attn.query_key_value").view(b_, n, HEADS, 3, hd)
        q, k, v = fused[..., 0, :], fused[..., 1, :], fused[..., 2, :]
        q = F.layer_norm(q, (hd,), w(p + "self_attn.q_layernorm.weight"), w(p + "self_attn.q_layernorm.bias"), 1e-5)
        k = F.layer_norm(k, (hd,), w(p + "self_attn.k_layernorm.weight"), w(p + "self_attn.k_layernorm.bias"), 1e-5)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        scores = (rope(q) @ rope(k).transpose(-2, -1) / math.sqrt(hd)).masked_fill(~causal, float("-inf"))
        a = linear((scores.softmax(-1) @ v).transpose(1, 2).reshape(b_, n, h), p + "self_attn.dense")
        a = a * torch.rsqrt(a.pow(2).mean(-1, keepdim=True) + 1e-6) * w(p + "post_layernorm.weight")
        m = F.linear(F.gelu(F.linear(hn, w(p + "mlp.fc1.weight"), w(p + "mlp.fc1.bias")), approximate="tanh"),
                     w(p + "mlp.fc2.weight"), w(p + "mlp.fc2.bias"))
        x = x + a + m
    x = F.layer_norm(x, (h,), w("final_layernorm.weight"), w("final_layernorm.bias"), 1e-5)
    return F.linear(x, s[head + "weight"], s[head + "bias"])
