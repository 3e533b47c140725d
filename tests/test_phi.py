"""The modified Phi-2: an independent reference of one decoder layer, KV cache, padding, generation, checkpointing."""

from __future__ import annotations

import math
import threading

import pytest
import torch

from tinygpt.model import TinyGPTPhiConfig, TinyGPTPhiForCausalLM
from tinygpt.model.phi import TinyGPTPhiDecoderLayer, rope_cos_sin


def small_config(**overrides) -> TinyGPTPhiConfig:
    base = dict(
        vocab_size=120, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
        rotary_dim=6, resid_pdrop=0.0, bos_token_id=0, eos_token_id=119, pad_token_id=0,
    )
    base.update(overrides)
    return TinyGPTPhiConfig(**base)


# ---- the reference: formulas only, reading the layer's tensors by name -------------------------------------------
def ref_layernorm(x, weight, bias, eps):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def ref_rms(x, weight, eps):
    return x / torch.sqrt((x**2).mean(-1, keepdim=True) + eps) * weight


def ref_gelu_new(x):
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def ref_rope(x, positions, rotary_dim, base):
    """NeoX rotation of dims (i, i + rotary_dim/2) by angle pos * base^(-2i/rotary_dim), element by element."""
    out = x.clone()
    half = rotary_dim // 2
    for i in range(half):
        theta = positions.double() * base ** (-2.0 * i / rotary_dim)
        cos, sin = torch.cos(theta).float(), torch.sin(theta).float()
        a, b = x[..., i], x[..., i + half]
        out[..., i] = a * cos[:, None] - b * sin[:, None]
        out[..., i + half] = b * cos[:, None] + a * sin[:, None]
    return out


def reference_layer(p, x, cfg, qk_norm=True, post_norm=True):
    """One decoder layer, single sequence x [S, H]; p maps parameter names to tensors."""
    seq, hidden = x.shape
    heads, hd = cfg.num_attention_heads, hidden // cfg.num_attention_heads
    h = ref_layernorm(x, p["input_layernorm.weight"], p["input_layernorm.bias"], cfg.layer_norm_eps)
    qkv = h @ p["self_attn.qkv.weight"].T + p["self_attn.qkv.bias"]
    q, k, v = (qkv[:, i * hidden : (i + 1) * hidden].reshape(seq, heads, hd) for i in range(3))
    if qk_norm:
        q = ref_layernorm(q, p["self_attn.q_layernorm.weight"], p["self_attn.q_layernorm.bias"], cfg.layer_norm_eps)
        k = ref_layernorm(k, p["self_attn.k_layernorm.weight"], p["self_attn.k_layernorm.bias"], cfg.layer_norm_eps)
    pos = torch.arange(seq)
    q, k = ref_rope(q, pos, cfg.rotary_dim, cfg.rope_base), ref_rope(k, pos, cfg.rotary_dim, cfg.rope_base)
    attn = torch.zeros(seq, heads, hd)
    for head in range(heads):
        scores = q[:, head] @ k[:, head].T / math.sqrt(hd)
        scores = scores.masked_fill(torch.triu(torch.ones(seq, seq, dtype=torch.bool), 1), float("-inf"))
        attn[:, head] = torch.softmax(scores, -1) @ v[:, head]
    a = attn.reshape(seq, hidden) @ p["self_attn.dense.weight"].T + p["self_attn.dense.bias"]
    if post_norm:
        a = ref_rms(a, p["post_layernorm.weight"], cfg.rms_norm_eps)
    mlp = ref_gelu_new(h @ p["mlp.fc1.weight"].T + p["mlp.fc1.bias"]) @ p["mlp.fc2.weight"].T + p["mlp.fc2.bias"]
    return x + a + mlp


def randomised_layer(cfg):
    torch.manual_seed(1)
    layer = TinyGPTPhiDecoderLayer(cfg, 0).eval()
    with torch.no_grad():
        for name, param in layer.named_parameters():  # non-trivial norms, so leaving one out changes the output
            scale, offset = (0.5, 1.0 if "norm.weight" in name else 0.0) if "norm" in name else (0.2, 0.0)
            param.copy_(torch.randn_like(param) * scale + offset)
    return layer


def run_layer(layer, cfg, x):
    pos = torch.arange(x.shape[1])[None]
    mask = torch.ones(1, 1, x.shape[1], x.shape[1], dtype=torch.bool).tril()
    return layer(x, cos_sin=rope_cos_sin(pos, cfg.rotary_dim, cfg.rope_base, torch.float32), attn_mask=mask)


def test_decoder_layer_matches_independent_reference_and_needs_both_norms():
    cfg = small_config()
    layer = randomised_layer(cfg)
    params = {n: t.detach() for n, t in layer.named_parameters()}
    x = torch.randn(1, 9, cfg.hidden_size)
    with torch.no_grad():
        got = run_layer(layer, cfg, x)[0]
    want = reference_layer(params, x[0], cfg)
    assert torch.allclose(got, want, atol=1e-5, rtol=0), (got - want).abs().max()
    # The check sees the extra norms: a layer without either one would be far from the reference.
    without_qk = reference_layer(params, x[0], cfg, qk_norm=False)
    without_post = reference_layer(params, x[0], cfg, post_norm=False)
    assert (without_qk - want).abs().max() > 1e-2
    assert (without_post - want).abs().max() > 1e-2


def test_plain_phi_switch_removes_the_extra_norms():
    cfg = small_config(qk_layernorm=False, post_attention_rmsnorm=False)
    layer = randomised_layer(cfg)
    names = {n for n, _ in layer.named_parameters()}
    assert not any("q_layernorm" in n or "k_layernorm" in n or "post_layernorm" in n for n in names)
    params = {n: t.detach() for n, t in layer.named_parameters()}
    x = torch.randn(1, 7, cfg.hidden_size)
    with torch.no_grad():
        got = run_layer(layer, cfg, x)[0]
    want = reference_layer(params, x[0], cfg, qk_norm=False, post_norm=False)
    assert torch.allclose(got, want, atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def lm():
    torch.manual_seed(0)
    return TinyGPTPhiForCausalLM(small_config()).eval()


def full_forward_greedy(lm, prompt: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy decoding by hand: one full forward per token, no cache, no transformers generation code."""
    ids = prompt
    with torch.no_grad():
        for _ in range(steps):
            logits = lm(ids, use_cache=False).logits[:, -1]
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    return ids


def test_greedy_generate_with_and_without_cache_equals_a_hand_rolled_loop(lm):
    prompt = torch.randint(1, 119, (2, 6))
    want = full_forward_greedy(lm, prompt, 12)
    with_cache = lm.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=True)
    without = lm.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=False)
    assert torch.equal(with_cache, want)
    assert torch.equal(without, want)


@pytest.mark.parametrize("mode", [dict(do_sample=True, top_p=0.9, temperature=0.8), dict(num_beams=3),
                                  dict(do_sample=False, repetition_penalty=1.3)])
def test_sampling_beams_and_penalties_give_the_same_tokens_with_and_without_cache(lm, mode):
    prompt = torch.randint(1, 119, (2, 5))
    torch.manual_seed(11)
    with_cache = lm.generate(prompt, max_new_tokens=10, use_cache=True, **mode)
    torch.manual_seed(11)
    without = lm.generate(prompt, max_new_tokens=10, use_cache=False, **mode)
    assert torch.equal(with_cache, without)


@pytest.mark.parametrize("name", ["cache", "past_key_values"])
def test_the_cache_is_taken_and_returned_under_each_name_transformers_has_used(lm, name):
    ids = torch.randint(1, 119, (1, 9))
    with torch.no_grad():
        full = lm(ids, use_cache=False).logits[0, -1]
        first = lm(ids[:, :8], use_cache=True)
        assert first.cache is first.past_key_values and first.cache.get_seq_length() == 8
        assert "cache" in first and "past_key_values" in first
        step = lm(ids[:, 8:], use_cache=True, **{name: first[name]})
    assert step.cache is first.cache and step.cache.get_seq_length() == 9
    assert torch.allclose(step.logits[0, -1], full, atol=1e-5)


def test_two_different_caches_are_refused(lm):
    from tinygpt.model.kv_cache import KVCache

    with pytest.raises(ValueError, match="two different KV caches"):
        lm(torch.randint(1, 119, (1, 3)), cache=KVCache(), past_key_values=KVCache())


def test_right_padded_batch_gives_same_logits_as_single_inputs(lm):
    a, b = torch.randint(1, 119, (1, 9)), torch.randint(1, 119, (1, 4))
    batch = torch.zeros(2, 9, dtype=torch.long)
    mask = torch.zeros(2, 9, dtype=torch.long)
    batch[0], mask[0] = a[0], 1
    batch[1, :4], mask[1, :4] = b[0], 1
    with torch.no_grad():
        padded = lm(batch, attention_mask=mask).logits
        assert torch.allclose(padded[0], lm(a).logits[0], atol=1e-5)
        assert torch.allclose(padded[1, :4], lm(b).logits[0], atol=1e-5)


def test_left_padded_generation_matches_unpadded(lm):
    a, b = torch.randint(1, 119, (1, 8)), torch.randint(1, 119, (1, 5))
    batch = torch.zeros(2, 8, dtype=torch.long)
    mask = torch.zeros(2, 8, dtype=torch.long)
    batch[0], mask[0] = a[0], 1
    batch[1, 3:], mask[1, 3:] = b[0], 1
    out = lm.generate(batch, attention_mask=mask, max_new_tokens=6, do_sample=False)
    alone = lm.generate(b, max_new_tokens=6, do_sample=False)
    assert torch.equal(out[1, 8:], alone[0, 5:])


def test_beam_search_and_sampling_run_and_sampling_is_seeded(lm):
    prompt = torch.randint(1, 119, (1, 5))
    beams = lm.generate(prompt, max_new_tokens=5, num_beams=3, do_sample=False)
    assert beams.shape[1] == 10
    torch.manual_seed(3)
    s1 = lm.generate(prompt, max_new_tokens=8, do_sample=True, top_p=0.9, temperature=1.0)
    torch.manual_seed(3)
    s2 = lm.generate(prompt, max_new_tokens=8, do_sample=True, top_p=0.9, temperature=1.0)
    assert torch.equal(s1, s2)


def test_streaming_yields_the_generated_text(tokenizer):
    from transformers import TextIteratorStreamer

    torch.manual_seed(0)
    model = TinyGPTPhiForCausalLM(small_config(vocab_size=51200, bos_token_id=50256, eos_token_id=50256,
                                               pad_token_id=50256)).eval()
    prompt = torch.tensor([tokenizer("Hello world")["input_ids"]])
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True)
    kwargs = dict(max_new_tokens=8, do_sample=False, streamer=streamer)
    thread = threading.Thread(target=model.generate, args=(prompt,), kwargs=kwargs)
    thread.start()
    streamed = "".join(streamer)
    thread.join()
    full = model.generate(prompt, max_new_tokens=8, do_sample=False)
    assert streamed == tokenizer.decode(full[0, prompt.shape[1] :])


def test_stop_strings_end_generation(tokenizer):
    """A model that always emits '###' stops right after it when told to stop on that string."""
    torch.manual_seed(0)
    model = TinyGPTPhiForCausalLM(small_config(vocab_size=51200, bos_token_id=50256, eos_token_id=50256,
                                               pad_token_id=50256)).eval()
    hashes = tokenizer("###", add_special_tokens=False)["input_ids"]
    assert len(hashes) == 1
    with torch.no_grad():
        model.lm_head.bias.zero_()
        model.lm_head.bias[hashes[0]] = 100.0
    prompt = torch.tensor([tokenizer("Question")["input_ids"]])
    out = model.generate(prompt, max_new_tokens=10, do_sample=False, stop_strings=["###"], tokenizer=tokenizer)
    assert out.shape[1] == prompt.shape[1] + 1


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = TinyGPTPhiForCausalLM(small_config()).train()
    ids = torch.randint(1, 119, (2, 10))

    def grads():
        model.zero_grad()
        model(ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = grads()
    model.gradient_checkpointing_enable()
    assert model.model.gradient_checkpointing
    checkpointed = grads()
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        assert torch.allclose(plain[name], checkpointed[name], atol=1e-6), name


def test_bad_head_split_is_refused():
    with pytest.raises(ValueError, match="divisible"):
        TinyGPTPhiForCausalLM(small_config(hidden_size=66))
