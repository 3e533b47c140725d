"""CPU runtime, language model: GGUF file validation, the ggml decoder graph (quantised, KV cache, cached decode
graph), the torch fallback, and agreement with tinygpt's PyTorch model.

The files are the hand-written tiny GGUFs of ``gguf_reference.py`` (fixtures ``tiny_weights`` / ``llm_files`` in
conftest); the decoder is checked against its independent NumPy implementation of the contract's formulas.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from gguf_reference import (TINY, T, file_weights, image_vectors, numpy_reference_logits, prompt_ids,  # noqa: E402
                            random_llm_weights, reference_for_ids, rel_err, tiny_vocab, write_llm_gguf)
from tinygpt.errors import UserError  # noqa: E402

from quantize import gguf_names as names  # noqa: E402
from quantize.gguf_file import chat_format, llm_hyperparams, open_gguf  # noqa: E402
from quantize.gguf_tokenizer import load_tokenizer  # noqa: E402


# ------------------------------------------------------------------------------------------------ gguf_file
def test_hyperparams_and_chat_format_read_from_file(llm_files):
    f = open_gguf(llm_files["q4_k"], names.ARCH_LLM)
    hp = llm_hyperparams(f)
    assert (hp.hidden_size, hp.n_heads, hp.head_dim, hp.n_layers, hp.rotary_dim) == (256, 4, 64, 2, 24)
    assert hp.qk_layernorm and hp.rms_norm_eps == pytest.approx(1e-6)
    assert hp.vocab_size == len(tiny_vocab()[0])
    fmt = chat_format(f)
    assert fmt.prompt_template == "###Human: {} ###Assistant: " and fmt.stop_strings == ["###"]
    assert fmt.image_token_count == 4 and fmt.bos_id == tiny_vocab()[3]


def test_tokenizer_rebuilt_from_gguf_round_trips(llm_files):
    tok = load_tokenizer(open_gguf(llm_files["f32"], names.ARCH_LLM))
    text = "Human: héllo ### world<|endoftext|>"
    ids = tok.encode(text).ids
    assert tok.token_to_id("Ġ###") in ids and tok.token_to_id("<|endoftext|>") == tiny_vocab()[3]
    assert ids[-1] == tiny_vocab()[3]
    assert tok.decode(ids, skip_special_tokens=False) == text


def test_foreign_truncated_and_wrong_arch_files_are_user_errors(tmp_path, llm_files):
    with pytest.raises(UserError, match="not found"):
        open_gguf(tmp_path / "missing.gguf", names.ARCH_LLM)
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(UserError, match="not a GGUF file"):
        open_gguf(junk, names.ARCH_LLM)
    data = Path(llm_files["q8_0"]).read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) - 1000])
    with pytest.raises(UserError, match=r"cut\.gguf.*truncated|cut\.gguf.*damaged"):
        open_gguf(cut, names.ARCH_LLM)
    with pytest.raises(UserError, match="general.architecture is 'phi2', expected 'tinygptv-vision'"):
        open_gguf(llm_files["f32"], names.ARCH_VISION)


def test_missing_tensor_and_bad_shape_are_user_errors(tmp_path, tiny_weights):
    w = dict(tiny_weights)
    del w["blk.1.ffn_up.bias"]
    path = write_llm_gguf(tmp_path / "m.gguf", w)
    with pytest.raises(UserError, match=r"m\.gguf: tensor 'blk.1.ffn_up.bias' is missing"):
        llm_hyperparams(open_gguf(path, names.ARCH_LLM))
    w = dict(tiny_weights)
    w["blk.0.attn_output.bias"] = np.zeros(7, np.float32)
    path = write_llm_gguf(tmp_path / "s.gguf", w)
    with pytest.raises(UserError, match=r"'blk.0.attn_output.bias' has shape \[7\], expected \[256\]"):
        llm_hyperparams(open_gguf(path, names.ARCH_LLM))


# ------------------------------------------------------------------------------------------------ ggml graph
ggml_llm = pytest.importorskip("quantize.ggml_llm")


def _ggml(path, **kw):
    return ggml_llm.GgmlLLM(open_gguf(path, names.ARCH_LLM), **kw)


def test_ggml_f32_matches_numpy_reference(llm_files):
    """F32 weights, F32 KV: the only difference is float32 accumulation order, so logits of std ~2 agree to < 1e-4
    absolute (measured 2e-6; 1.2e-3 with ggml_gelu's F16 table, before quantize.ggml_gelu)."""
    ids = prompt_ids(20)
    ref = reference_for_ids(llm_files["f32"], ids)
    m = _ggml(llm_files["f32"], kv_type="f32")
    got = m.eval_tokens(ids, all_logits=True)
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() < 1e-4, np.abs(got - ref).max()
    assert ref.std() > 0.5  # the check is not vacuous


@pytest.mark.parametrize("qtype,limit", [("f16", 0.005), ("q8_0", 0.03), ("q4_0", 0.08), ("q4_k", 0.08)])
def test_ggml_quantized_matches_reference_on_dequantized_weights(llm_files, qtype, limit):
    """Against the reference run on the file's own (dequantized) weights, what remains is ggml quantizing the
    activations to Q8 for quantized matmuls (Q8_0/Q4_0: Q8_0 activations; Q4_K: Q8_K) plus the f16 KV cache:
    measured 0.05 % (F16), 1.0 % (Q8_0, Q4_0), 1.4 % (Q4_K) of the largest logit; the limits leave 3-10x margin."""
    ids = prompt_ids(24, seed=3)
    ref = reference_for_ids(llm_files[qtype], ids)
    got = _ggml(llm_files[qtype]).eval_tokens(ids, all_logits=True)
    assert rel_err(got, ref) < limit, rel_err(got, ref)


def test_ggml_kv_cache_decode_matches_full_prefill_and_chunking(llm_files):
    """Token-by-token decode through the KV cache, chunked prefill (n_batch=5) and one full prefill give the same
    logits at every position (same kernels, same f32 cache: only summation order may differ)."""
    ids = prompt_ids(17, seed=5)
    full = _ggml(llm_files["q8_0"], kv_type="f32").eval_tokens(ids, all_logits=True)
    step = _ggml(llm_files["q8_0"], kv_type="f32")
    stepwise = np.stack([step.eval_tokens(ids[i:i + 1]) for i in range(len(ids))])
    chunked = _ggml(llm_files["q8_0"], kv_type="f32", n_batch=5).eval_tokens(ids, all_logits=True)
    assert np.abs(stepwise - full).max() < 1e-3
    assert np.abs(chunked - full).max() < 1e-3
    assert step.n_past == len(ids)


@pytest.mark.parametrize("threads,rows", [(2, 2), (3, 2), (4, 4)])
def test_ggml_decode_gelu_runs_on_a_row_per_thread(llm_files, threads, rows):
    """ggml splits elementwise ops by rows: a decode step's GELU (quantize.ggml_gelu: its SILU node is the costly
    one) is reshaped to as many rows as threads (or the largest count <= threads that divides ffn 512), and the
    logits equal a one-thread run's."""
    import ggml

    ids = prompt_ids(12, seed=8)
    one = _ggml(llm_files["q8_0"], kv_type="f32", n_threads=1)
    many = _ggml(llm_files["q8_0"], kv_type="f32", n_threads=threads)
    for m in (one, many):
        m.eval_tokens(ids[:8])
    want = np.stack([one.eval_tokens(ids[i:i + 1]) for i in range(8, 12)])
    got = np.stack([many.eval_tokens(ids[i:i + 1]) for i in range(8, 12)])
    gf = many._decode.gf
    gelus = [ggml.ggml_graph_node(gf, i) for i in range(ggml.ggml_graph_n_nodes(gf))]
    gelus = [t for t in gelus if ggml.ggml_op_desc(t).decode() == "SILU"]
    assert len(gelus) == TINY["layers"]
    assert {tuple(t.contents.ne[:2]) for t in gelus} == {(TINY["ffn"] // rows, rows)}
    assert np.abs(got - want).max() < 1e-4, np.abs(got - want).max()


def test_ggml_embeddings_input_equals_token_input(llm_files):
    """Feeding the token_embd rows as embeddings (the image-splice path) gives the token path's logits, and a
    prompt split text / embeddings / text through the cache equals one prefill."""
    path = llm_files["f16"]
    ids = prompt_ids(12, seed=7)
    rows = file_weights(path)["token_embd.weight"][ids]
    a = _ggml(path, kv_type="f32").eval_tokens(ids, all_logits=True)
    b = _ggml(path, kv_type="f32").eval_embeddings(rows, all_logits=True)
    assert np.abs(a - b).max() < 1e-4
    m = _ggml(path, kv_type="f32")
    m.eval_tokens(ids[:3])
    m.eval_embeddings(rows[3:9])
    last = m.eval_tokens(ids[9:])
    assert np.abs(last - a[-1]).max() < 1e-3


def test_ggml_truncate_then_reuse_gives_fresh_logits(llm_files):
    """Rolling the cache back and evaluating other tokens equals evaluating that sequence from scratch."""
    path = llm_files["q4_k"]
    ids = prompt_ids(10, seed=9)
    other = prompt_ids(4, seed=10)
    m = _ggml(path)
    m.eval_tokens(ids)
    m.truncate(6)
    got = m.eval_tokens(other)
    want = _ggml(path).eval_tokens(np.concatenate([ids[:6], other]))
    assert np.abs(got - want).max() < 1e-3


def test_ggml_context_overflow_is_user_error(llm_files):
    m = _ggml(llm_files["f32"], n_ctx=8)
    m.eval_tokens(prompt_ids(6))
    with pytest.raises(UserError, match=r"context length exceeded: 6 cached \+ 3 new > n_ctx 8"):
        m.eval_tokens(prompt_ids(3))
    assert m.n_past == 6  # nothing half-applied


def test_plain_phi2_file_without_extra_norms_runs(tmp_path):
    w = random_llm_weights(seed=4, qk_norm=False, post_norm=False)
    path = write_llm_gguf(tmp_path / "plain.gguf", w, T.F32)
    hp = llm_hyperparams(open_gguf(path, names.ARCH_LLM))
    assert not hp.qk_layernorm and hp.rms_norm_eps is None
    ids = prompt_ids(9)
    ref = numpy_reference_logits(w, w["token_embd.weight"][ids], TINY["rot"], TINY["heads"])
    got = _ggml(path, kv_type="f32").eval_tokens(ids, all_logits=True)
    assert np.abs(got - ref).max() < 1e-2


# ------------------------------------------------------------------------------------------------ cached decode graph
def _kv_bytes(m) -> list[bytes]:
    """Every layer's whole K and V cache tensor, raw."""
    import ctypes

    import ggml

    return [ctypes.string_at(t.contents.data, ggml.ggml_nbytes(t)) for t in m.k_cache + m.v_cache]


def _decode_script(m, ids, rows) -> np.ndarray:
    """Prefill 30, decode 40 (buckets 32, 64 and the last one cut at n_ctx 70), overflow, truncate to 45 and decode
    5, truncate to 40 (same bucket) and decode 1, reset and decode 2 tokens and 1 embedding row: the logits of every
    single-token step."""
    m.eval_tokens(ids[:30])
    out = [m.eval_tokens(ids[i:i + 1]) for i in range(30, 70)]
    with pytest.raises(UserError, match="context length exceeded"):
        m.eval_tokens(ids[:1])
    m.truncate(45)
    out += [m.eval_tokens(ids[i:i + 1]) for i in range(70, 75)]
    m.truncate(40)
    out.append(m.eval_tokens(ids[75:76]))
    m.reset()
    out += [m.eval_tokens(ids[i:i + 1], all_logits=True)[0] for i in range(76, 78)]
    out.append(m.eval_embeddings(rows[78:79], all_logits=True)[0])
    assert m.n_past == 3
    return np.stack(out)


def _decode_graph_vs_per_step_graphs(path, monkeypatch):
    ids = prompt_ids(79, seed=11)
    rows = file_weights(path)["token_embd.weight"][ids]
    off = _ggml(path, n_ctx=70, decode_graph=False)
    assert not off.decode_graph
    want = _decode_script(off, ids, rows)
    assert off._decode is None
    built = []

    class Counting(ggml_llm.DecodeGraph):
        def __init__(self, llm, key):
            built.append(key)
            super().__init__(llm, key)

    monkeypatch.setattr(ggml_llm, "DecodeGraph", Counting)
    on = _ggml(path, n_ctx=70)
    got = _decode_script(on, ids, rows)
    return on, off, got, want, built


def test_ggml_decode_graph_with_exact_bucket_is_bitwise_the_per_step_graph(llm_files, monkeypatch):
    """Bucket 1 (attention over exactly n_past + 1 positions): the cached graph computes what the per-step graph
    computes, so logits and the whole KV cache (every K row and V column, written through set_rows index inputs)
    are byte-identical, through truncate and reset."""
    monkeypatch.setattr("quantize.ggml_decode_graph.BUCKET", 1)
    on, off, got, want, built = _decode_graph_vs_per_step_graphs(llm_files["f32"], monkeypatch)
    assert np.array_equal(got, want)
    assert _kv_bytes(on) == _kv_bytes(off)
    assert len(built) == 49  # the bucket changes with every step


def test_ggml_decode_graph_reused_across_a_bucket_matches_per_step_graph(llm_files, monkeypatch):
    """Default bucket (32): one graph per bucket serves every step in it. Positions past n_past add exact zeros to
    the softmax and attention sums, which only changes their SIMD summation order: measured <= 3e-5 of the largest
    logit on F32 weights (bitwise with bucket 1, above). A K/V write to a wrong row would change layer 0's cache
    (which depends only on the tokens) and the logits by O(1)."""
    on, off, got, want, built = _decode_graph_vs_per_step_graphs(llm_files["f32"], monkeypatch)
    assert rel_err(got, want) < 1e-4, rel_err(got, want)
    assert got.std() > 0.5
    n = len(on.k_cache)
    assert _kv_bytes(on)[0] == _kv_bytes(off)[0] and _kv_bytes(on)[n] == _kv_bytes(off)[n]  # layer 0 K and V
    assert built == [(32, True), (64, True), (70, True), (64, True), (32, True), (32, False)]  # truncate(40): reused
    on.close()
    on.close()
    assert on._decode is None


# ------------------------------------------------------------------------------------------------ torch fallback
from quantize.torch_llm import TorchLLM  # noqa: E402


def test_torch_fallback_matches_reference_and_ggml(llm_files):
    """fp32 torch on dequantized weights equals the float64 reference to float32 rounding (< 1e-3); against ggml
    on a Q4_K file the gap is ggml's Q8_K activation rounding (measured ~1.4 %, limit 5 %)."""
    ids = prompt_ids(15, seed=11)
    ref = reference_for_ids(llm_files["q4_k"], ids)
    t = TorchLLM(open_gguf(llm_files["q4_k"], names.ARCH_LLM), dtype="fp32")
    got = t.eval_tokens(ids[:10], all_logits=True)
    got = np.concatenate([got, t.eval_tokens(ids[10:], all_logits=True)])
    assert np.abs(got - ref).max() < 1e-3
    g = _ggml(llm_files["q4_k"]).eval_tokens(ids, all_logits=True)
    assert rel_err(g, got) < 0.05


def test_torch_fallback_bf16_is_close(llm_files):
    ids = prompt_ids(8, seed=12)
    ref = reference_for_ids(llm_files["f32"], ids)
    got = TorchLLM(open_gguf(llm_files["f32"], names.ARCH_LLM), dtype="bf16").eval_tokens(ids, all_logits=True)
    assert rel_err(got, ref) < 0.05


# ------------------------------------------------------------------------------------------------ vs the PyTorch model
def _torch_model_with(weights: dict[str, np.ndarray]):
    """tinygpt's TinyGPTPhiForCausalLM holding exactly `weights` (GGUF names mapped back through gguf_names)."""
    torch = pytest.importorskip("torch")
    phi = pytest.importorskip("tinygpt.model.phi")
    from tinygpt.model.phi_config import TinyGPTPhiConfig

    cfg = TinyGPTPhiConfig(vocab_size=weights["token_embd.weight"].shape[0], hidden_size=TINY["hidden"],
                           intermediate_size=TINY["ffn"], num_hidden_layers=TINY["layers"],
                           num_attention_heads=TINY["heads"], rotary_dim=TINY["rot"],
                           max_position_embeddings=TINY["ctx"], resid_pdrop=0.0, embd_pdrop=0.0)
    model = phi.TinyGPTPhiForCausalLM(cfg).eval()
    state = {names.gguf_to_torch_llm(k): torch.from_numpy(v.copy()) for k, v in weights.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and not missing, (missing, unexpected)
    return model


def _torch_logits(model, embeddings: np.ndarray) -> np.ndarray:
    import torch
    with torch.no_grad():
        out = model(inputs_embeds=torch.from_numpy(embeddings[None]).float(), use_cache=False)
    return out.logits[0].numpy()


@pytest.mark.parametrize("qtype,limit,min_corr", [("f16", 0.005, 0.99999), ("q8_0", 0.05, 0.999),
                                                ("q4_k", 0.4, 0.95)])
def test_runtime_matches_pytorch_model_with_spliced_image_vectors(llm_files, tiny_weights, qtype, limit, min_corr):
    """Next-token logits of the GGUF runtime vs tinygpt's PyTorch model (original fp32 weights) for a prompt
    [text, 4 image vectors, text]. The gap is the file's weight quantization plus ggml's activation rounding.
    Measured max|diff| / max|logit| (correlation): F16 0.07 % (0.9999998), Q8_0 1.7 % (0.99987), Q4_K 17 %
    (0.986) -- 4-bit weights on random Gaussian matrices, a worst case; limits are 2-7x the measured error."""
    model = _torch_model_with(tiny_weights)
    ids = prompt_ids(14, seed=21)
    image = image_vectors(5) * 0.5
    table = tiny_weights["token_embd.weight"]
    emb = np.concatenate([table[ids[:5]], image, table[ids[5:]]])
    want = _torch_logits(model, emb)
    m = _ggml(llm_files[qtype])
    m.eval_tokens(ids[:5])
    m.eval_embeddings(image)
    got_last = m.eval_tokens(ids[5:])
    assert rel_err(got_last, want[-1]) < limit, rel_err(got_last, want[-1])
    assert np.corrcoef(got_last, want[-1])[0, 1] > min_corr
    if qtype == "f16":
        assert np.abs(got_last - want[-1]).max() < 1e-2  # logits std ~2: tight absolute agreement
    # the NumPy reference agrees with the PyTorch model on the same weights (both implement the contract)
    ref = numpy_reference_logits(tiny_weights, emb, TINY["rot"], TINY["heads"])
    assert np.abs(ref - want).max() < 1e-3


def test_torch_fallback_matches_pytorch_model(llm_files, tiny_weights):
    model = _torch_model_with(tiny_weights)
    ids = prompt_ids(10, seed=22)
    want = _torch_logits(model, tiny_weights["token_embd.weight"][ids])
    got = TorchLLM(open_gguf(llm_files["f32"], names.ARCH_LLM), dtype="fp32").eval_tokens(ids, all_logits=True)
    assert np.abs(got - want).max() < 1e-3

