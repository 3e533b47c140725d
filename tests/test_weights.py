"""Weight import: every source layout at tiny sizes with the REAL key names, checked against independent references.

Each test writes a checkpoint in the source's own layout (``weight_sources.py``) to tmp_path, imports it, and checks
that our model computes the same function as a reference computed directly from the source-named tensors (to 1e-5).
Bad inputs and the build CLI are in ``test_weights_build.py``.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tinygpt.model.vision import resize_position_embedding
from tinygpt.weights import load_blip2, load_lavis, load_phi2, load_released
from weight_sources import (HEADS, IDS, LAYERS, hf_blip2, hf_phi, hf_qformer_features, lavis_files, our_llm,
                            reference_logits, released_state, tiny_vlm)


# -------------------------------------------------------------------------------------------------------------- phi-2

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


# ---------------------------------------------------------------------------------------------------------- BLIP-2 HF


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


# -------------------------------------------------------------------------------------------------------------- LAVIS


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


# ----------------------------------------------------------------------------------------------------------- released


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
