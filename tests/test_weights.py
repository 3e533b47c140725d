"""Weight import: every source layout at tiny sizes with the REAL key names, checked against independent references.

Each test writes a checkpoint in the source's own layout to tmp_path, imports it, and checks that our model computes
the same function as a reference computed directly from the source-named tensors (to 1e-5).
"""

from __future__ import annotations

import json
import math
import os
import pickle

import pytest
import torch
import torch.nn.functional as F

from tinygpt.errors import UserError
from tinygpt.model import TinyGPTPhiConfig, TinyGPTPhiForCausalLM, TinyGPTVForConditionalGeneration, load_vlm
from tinygpt.model.vision import resize_position_embedding
from tinygpt.weights import load_blip2, load_lavis, load_phi2, load_released, read_checkpoint
from tinygpt.weights.build import main as build_main
from tinygpt.weights.build import make_config
from tinygpt.weights.phi2 import open_phi2, phi_text_overrides
from tinygpt.weights.sources import resolve_model_dir

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


# ---------------------------------------------------------------------------------------------------- phi-2


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


@pytest.mark.parametrize("qk_layernorm", [False, True])
def test_phi2_split_qkv_layout_gives_same_logits(tmp_path, qk_layernorm):
    source = hf_phi(qk_layernorm)
    source.save_pretrained(tmp_path, max_shard_size="40KB")  # sharded + index, as microsoft/phi-2
    assert (tmp_path / "model.safetensors.index.json").is_file()
    ours = our_llm(tmp_path)
    assert (ours.model.layers[0].self_attn.q_layernorm is not None) == qk_layernorm
    report = load_phi2(ours, str(tmp_path))
    assert not report.missing
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS).logits, source(IDS).logits, atol=1e-5, rtol=1e-5)


def interleave_qkv(q, k, v, heads):
    """The transformers <= 4.36 / TinyGPT-V fused layout: rows (heads, 3, head_dim)."""
    stacked = torch.stack([q, k, v], 0)
    return stacked.reshape(3, heads, -1, *q.shape[1:]).transpose(0, 1).reshape(3 * q.shape[0], *q.shape[1:])


def test_phi2_old_fused_interleaved_layout_gives_same_logits(tmp_path):
    source = hf_phi(qk_layernorm=True)
    source.save_pretrained(tmp_path / "hf")
    state = {k: v.clone() for k, v in source.state_dict().items()}
    for i in range(LAYERS):
        p = f"model.layers.{i}.self_attn."
        for kind in ("weight", "bias"):
            q, k, v = (state.pop(f"{p}{x}_proj.{kind}") for x in "qkv")
            state[f"{p}query_key_value.{kind}"] = interleave_qkv(q, k, v, HEADS)
    old = tmp_path / "old"
    old.mkdir()
    torch.save(state, old / "pytorch_model.bin")
    (old / "config.json").write_text((tmp_path / "hf" / "config.json").read_text())
    ours = our_llm(old)
    load_phi2(ours, str(old))
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS).logits, source(IDS).logits, atol=1e-5, rtol=1e-5)


def test_phi2_into_vlm_reports_fresh_norms_as_missing(tmp_path):
    hf_phi(qk_layernorm=False).save_pretrained(tmp_path)
    model = tiny_vlm(extra_norms=True)
    report = load_phi2(model, str(tmp_path))
    assert report.missing and all(("layernorm" in k or "post_layernorm" in k) for k in report.missing)
    assert len(report.missing) == LAYERS * 5  # q/k LayerNorm weight+bias, post RMSNorm weight


# ---------------------------------------------------------------------------------------------------- BLIP-2 HF


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


def test_blip2_hf_gives_same_qformer_features(tmp_path):
    source = hf_blip2()
    source.save_pretrained(tmp_path)
    model = tiny_vlm()
    model.vision_model.post_layernorm.eps = source.config.vision_config.layer_norm_eps  # HF's ln eps, for equality
    report = load_blip2(model, str(tmp_path))
    assert not report.missing
    assert any(k.startswith("language_model.") for k in report.unexpected)  # OPT skipped and reported
    assert any(k.startswith("language_projection.") for k in report.unexpected)
    pixels = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = model.qformer_features(pixels)
    torch.testing.assert_close(ours, hf_qformer_features(source, pixels), atol=1e-5, rtol=1e-5)


def test_blip2_position_embedding_resized_once_for_larger_images(tmp_path):
    source = hf_blip2()
    source.save_pretrained(tmp_path)
    model = tiny_vlm(image_size=56)
    load_blip2(model, str(tmp_path))
    original = source.vision_model.embeddings.position_embedding.detach()
    assert model.vision_model.embeddings.position_embedding.shape[1] == 1 + 4 * 4
    want = resize_position_embedding(original, 56, 14)
    torch.testing.assert_close(model.vision_model.embeddings.position_embedding.detach(), want)
    assert torch.equal(want[:, :1], original[:, :1])  # CLS position kept


# ---------------------------------------------------------------------------------------------------- LAVIS


def lavis_files(tmp_path, prefix: str):
    """eva_vit_g.pth (3 blocks; the model uses 2) and blip2_pretrained_flant5xxl.pth with LAVIS names, tiny sizes."""
    gen = torch.Generator().manual_seed(4)

    def r(*shape, base=0.0):
        return base + torch.randn(*shape, generator=gen) * 0.2

    d, f = 32, 64
    eva = {"cls_token": r(1, 1, d), "pos_embed": r(1, 5, d), "patch_embed.proj.weight": r(d, 3, 14, 14),
           "patch_embed.proj.bias": r(d)}
    for i in range(3):
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
    for i in range(2):
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


def lavis_vit_reference(eva, ln_w, ln_b, pixels, depth=2, heads=4):
    """LAVIS EVA ViT-g forward written from the LAVIS tensors (q_bias/v_bias separate, k bias 0), then ln_vision."""
    x = F.conv2d(pixels, eva["patch_embed.proj.weight"], eva["patch_embed.proj.bias"], stride=14)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([eva["cls_token"].expand(x.shape[0], -1, -1), x], 1) + eva["pos_embed"]
    b_, n, d = x.shape
    for i in range(depth):
        p = f"blocks.{i}."
        h = F.layer_norm(x, (d,), eva[p + "norm1.weight"], eva[p + "norm1.bias"], 1e-6)
        bias = torch.cat([eva[p + "attn.q_bias"], torch.zeros(d), eva[p + "attn.v_bias"]])
        qkv = F.linear(h, eva[p + "attn.qkv.weight"], bias).reshape(b_, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0] * (d // heads) ** -0.5, qkv[1], qkv[2]
        attn = (q @ k.transpose(-2, -1)).softmax(-1)
        x = x + F.linear((attn @ v).transpose(1, 2).reshape(b_, n, d), eva[p + "attn.proj.weight"],
                         eva[p + "attn.proj.bias"])
        h = F.layer_norm(x, (d,), eva[p + "norm2.weight"], eva[p + "norm2.bias"], 1e-6)
        x = x + F.linear(F.gelu(F.linear(h, eva[p + "mlp.fc1.weight"], eva[p + "mlp.fc1.bias"])),
                         eva[p + "mlp.fc2.weight"], eva[p + "mlp.fc2.bias"])
    return F.layer_norm(x, (d,), ln_w, ln_b, 1e-5)  # LAVIS ln_vision: torch default eps


def lavis_qformer_reference(q, image, heads=4):
    """LAVIS Q-Former (BERT, query path; cross-attention in even layers) written from the LAVIS tensors."""
    def attention(prefix, x, ctx):
        def proj(name, t):
            out = F.linear(t, q[f"{prefix}.self.{name}.weight"], q[f"{prefix}.self.{name}.bias"])
            return out.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)
        qq, kk, vv = proj("query", x), proj("key", ctx), proj("value", ctx)
        w = (qq @ kk.transpose(-2, -1) / math.sqrt(qq.shape[-1])).softmax(-1)
        out = (w @ vv).transpose(1, 2).reshape(x.shape)
        out = F.linear(out, q[f"{prefix}.output.dense.weight"], q[f"{prefix}.output.dense.bias"])
        return F.layer_norm(out + x, x.shape[-1:], q[f"{prefix}.output.LayerNorm.weight"],
                            q[f"{prefix}.output.LayerNorm.bias"], 1e-12)

    emb = "Qformer.bert.embeddings.LayerNorm."
    x = q["query_tokens"].expand(image.shape[0], -1, -1)
    x = F.layer_norm(x, x.shape[-1:], q[emb + "weight"], q[emb + "bias"], 1e-12)
    for i in range(2):
        b = f"Qformer.bert.encoder.layer.{i}."
        x = attention(b + "attention", x, x)
        if i % 2 == 0:
            x = attention(b + "crossattention", x, image)
        h = F.gelu(F.linear(x, q[b + "intermediate_query.dense.weight"], q[b + "intermediate_query.dense.bias"]))
        h = F.linear(h, q[b + "output_query.dense.weight"], q[b + "output_query.dense.bias"])
        x = F.layer_norm(h + x, x.shape[-1:], q[b + "output_query.LayerNorm.weight"],
                         q[b + "output_query.LayerNorm.bias"], 1e-12)
    return x


@pytest.mark.parametrize("prefix", ["", "visual_encoder."])
def test_lavis_eva_and_qformer_match_reference_forward(tmp_path, prefix, caplog):
    eva, q = lavis_files(tmp_path, prefix)
    model = tiny_vlm()
    assert model.vision_model.post_layernorm.eps == 1e-5
    with caplog.at_level("INFO", logger="tinygpt.weights"):
        eva_report, q_report = load_lavis(model, str(tmp_path / "eva_vit_g.pth"),
                                          str(tmp_path / "blip2_pretrained_flant5xxl.pth"))
    assert not eva_report.missing and not q_report.missing
    assert prefix + "blocks.2.attn.qkv.weight" in eva_report.unexpected  # the 3rd block is dropped, with a note
    assert "dropped ViT block(s) 2" in caplog.text
    assert {"Qformer.bert.embeddings.position_ids", "t5_proj.weight"} <= set(q_report.unexpected)
    pixels = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(5))
    attn = model.vision_model.encoder.layers[0].self_attn
    torch.testing.assert_close(attn.qkv.bias[32:64].detach(), torch.zeros(32))  # k bias is zero
    with torch.no_grad():
        image = model.vision_model(pixel_values=pixels).last_hidden_state
        want_image = lavis_vit_reference(eva, q["ln_vision.weight"], q["ln_vision.bias"], pixels)
        torch.testing.assert_close(image, want_image, atol=1e-5, rtol=1e-5)
        features = model.qformer_features(pixels)
        torch.testing.assert_close(features, lavis_qformer_reference(q, want_image), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------- released


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


@pytest.mark.parametrize("stage", [1, 3])
def test_released_checkpoint_matches_original_layout(tmp_path, stage):
    state, prefix, head = released_state(stage)
    path = tmp_path / f"TinyGPT-V_for_Stage{stage}.pth"
    torch.save({"model": state, "optimizer": {"state": {}}, "epoch": 0}, path)
    model = tiny_vlm()
    report = load_released(model, str(path))
    assert not report.missing
    assert report.unexpected == ["Qformer.bert.embeddings.position_ids"]
    assert (model.config.lora is not None) == (stage > 1)
    if stage > 1:
        assert model.config.lora["r"] == 64 and model.config.lora["alpha"] == 16
    with torch.no_grad():
        ours = model.language_model(input_ids=IDS).logits
        torch.testing.assert_close(ours, reference_logits(state, prefix, head, IDS), atol=1e-5, rtol=1e-5)
        features = torch.randn(2, 8, 32)
        want = F.linear(F.linear(features, state["llama_proj.weight"], state["llama_proj.bias"]),
                        state["llama_proj2.weight"], state["llama_proj2.bias"])
        torch.testing.assert_close(model.project(features), want, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------- bad inputs


class RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pwned > " + os.environ.get("TINYGPT_TEST_MARKER", "/nonexistent/marker"),))


def test_pickle_with_code_is_refused_and_never_runs(tmp_path, monkeypatch):
    marker = tmp_path / "marker"
    monkeypatch.setenv("TINYGPT_TEST_MARKER", str(marker))
    for name, write in (("evil.pth", lambda f: torch.save({"model": {"x": RunsCode()}}, f)),
                        ("evil_plain.pth", lambda f: pickle.dump({"x": RunsCode()}, open(f, "wb")))):
        path = tmp_path / name
        write(path)
        with pytest.raises(UserError, match=f"{name}.*(refused|weights_only)"):
            read_checkpoint(path)
    assert not marker.exists()


def test_random_bytes_and_truncated_files_are_user_errors(tmp_path):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(os.urandom(4096))
    with pytest.raises(UserError, match="junk.pth"):
        read_checkpoint(junk)
    good = tmp_path / "good.pth"
    torch.save({"w": torch.randn(64, 64)}, good)
    cut = tmp_path / "cut.pth"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(UserError, match="cut.pth"):
        read_checkpoint(cut)
    bad_st = tmp_path / "model.safetensors"
    bad_st.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......")
    with pytest.raises(UserError, match="model.safetensors"):
        read_checkpoint(bad_st)
    with pytest.raises(UserError, match="does not exist"):
        read_checkpoint(tmp_path / "absent.pth")


def test_wrong_shape_and_nothing_matched_are_user_errors(tmp_path):
    state, _, _ = released_state(1)
    state["llama_proj.weight"] = torch.zeros(512, 31)
    wrong = tmp_path / "wrong.pth"
    torch.save({"model": state}, wrong)
    with pytest.raises(UserError, match=r"wrong.pth.*llama_proj|wrong.pth.*proj1.*shape|wrong.pth.*shape"):
        load_released(tiny_vlm(), str(wrong))
    unrelated = tmp_path / "unrelated.pth"
    torch.save({"state_dict": {"encoder.weight": torch.zeros(3)}}, unrelated)
    with pytest.raises(UserError, match="unrelated.pth.*no tensor matched"):
        load_released(tiny_vlm(), str(unrelated))


def test_hub_id_offline_and_not_cached_is_a_user_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    with pytest.raises(UserError, match="nobody-here/no-such-model.*local directory"):
        open_phi2("nobody-here/no-such-model")
    with pytest.raises(UserError, match="no such directory"):
        resolve_model_dir(str(tmp_path / "missing" / "dir" / "x"), "--llm")


# ---------------------------------------------------------------------------------------------------- build CLI


def test_build_cli_from_phi_and_blip2_dirs(tmp_path, capsys):
    phi = hf_phi(qk_layernorm=False)
    phi.save_pretrained(tmp_path / "phi")
    blip = hf_blip2()
    blip.save_pretrained(tmp_path / "blip2")
    out = tmp_path / "built"
    rc = build_main(["--llm", str(tmp_path / "phi"), "--vision", str(tmp_path / "blip2"), "--preset", "tiny",
                     "--no-extra-norms", "--lora", "--dtype", "fp32", "--image-size", "28", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "[build 6/6" in printed
    assert f"fresh (not in any file): {4 + 4 * LAYERS} tensors" in printed  # proj1/proj2 + LoRA A/B only
    model = load_vlm(out)
    assert model.config.lora["r"] == 64 and not model.language_model.model.layers[0].self_attn.dense.lora_B[
        "default"].weight.any()  # fresh LoRA: B = 0, so the function is Phi-2's
    with torch.no_grad():
        torch.testing.assert_close(model.language_model(input_ids=IDS).logits, phi(IDS).logits, atol=1e-5, rtol=1e-5)
        pixels = torch.randn(1, 3, 28, 28)
        # ln_vision eps is LAVIS's 1e-5 in our model, HF's 1e-6 in the reference: equal to ~1e-5
        torch.testing.assert_close(model.qformer_features(pixels), hf_qformer_features(blip, pixels),
                                   atol=1e-4, rtol=1e-4)


def test_build_cli_lavis_plus_released_stage3(tmp_path, capsys):
    hf_phi(qk_layernorm=False).save_pretrained(tmp_path / "phi")
    lavis_files(tmp_path, "")
    state, _, _ = released_state(3)
    torch.save({"model": state}, tmp_path / "stage3.pth")
    out = tmp_path / "built"
    rc = build_main(["--llm", str(tmp_path / "phi"), "--eva", str(tmp_path / "eva_vit_g.pth"),
                     "--qformer", str(tmp_path / "blip2_pretrained_flant5xxl.pth"), "--preset", "tiny",
                     "--released", str(tmp_path / "stage3.pth"), "--image-size", "28", "--out", str(out)])
    assert rc == 0, capsys.readouterr()
    config = json.loads((out / "config.json").read_text())
    assert config["lora"]["r"] == 64 and config["text_config"]["qk_layernorm"] is True
    model = load_vlm(out)
    assert model.language_model.model.layers[0].self_attn.qkv.base_layer.weight.dtype == torch.float32  # load dtype
    _, prefix, head = released_state(3)
    with torch.no_grad():
        want = reference_logits(state, prefix, head, IDS)
        torch.testing.assert_close(model.language_model(input_ids=IDS).logits, want, atol=0.05, rtol=0.02)  # bf16


def test_build_cli_bad_source_exits_2_without_output(tmp_path, capsys):
    out = tmp_path / "built"
    (tmp_path / "phi").mkdir()
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint at all")
    rc = build_main(["--llm", str(tmp_path / "phi"), "--eva", str(tmp_path / "junk.pth"), "--qformer",
                     str(tmp_path / "junk.pth"), "--preset", "tiny", "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == 2 and captured.err.startswith("error: junk.pth".replace("junk.pth", str(tmp_path / "junk.pth")))
    assert "not a PyTorch checkpoint" in captured.err and "Traceback" not in captured.err
    assert not out.exists()
