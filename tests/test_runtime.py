"""CPU runtime over exported GGUF files: file validation, the ggml decoder graph, the torch fallback, sampler,
chat session and CLI.

The LLM files here are written directly with gguf.GGUFWriter following the GGUF contract (independent of the
exporter), from random weights; the decoder is checked against an independent NumPy implementation of the
contract's formulas, and (when the PyTorch model is importable) against tinygpt.model.phi.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from tinygpt.errors import UserError  # noqa: E402

from quantize import gguf_names as names  # noqa: E402
from quantize import qtypes  # noqa: E402
from quantize.gguf_file import as_float32, chat_format, llm_hyperparams, load_tokenizer, open_gguf  # noqa: E402

T = gguf.GGMLQuantizationType

# ------------------------------------------------------------------------------------------------ tiny model
TINY = dict(hidden=256, heads=4, layers=2, ffn=512, rot=24, ctx=96)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (the alphabet of byte-level BPE token strings)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def tiny_vocab() -> tuple[list[str], list[int], list[str], int]:
    """256 byte tokens, a few merges ('##', '###', 'Ġ#', ...), <|endoftext|> (control), padded to a multiple of 8."""
    byte_tokens = [_bytes_to_unicode()[b] for b in range(256)]
    merges = ["# #", "## #", "Ġ ###", "H u", "Hu m", "Hum a", "Huma n", "Ġ a"]
    tokens = byte_tokens + [m.replace(" ", "") for m in merges]
    types = [1] * len(tokens)
    eos = len(tokens)
    tokens.append("<|endoftext|>")
    types.append(3)
    while len(tokens) % 8:
        tokens.append(f"[PAD{len(tokens)}]")
        types.append(5)
    return tokens, types, merges, eos


def random_llm_weights(seed: int = 0, qk_norm: bool = True, post_norm: bool = True, vocab: int | None = None,
                       **overrides) -> dict[str, np.ndarray]:
    """Random float32 weights under GGUF names (numpy [out, in] layout), with non-trivial norms."""
    p = {**TINY, **overrides}
    H, F, D = p["hidden"], p["ffn"], p["hidden"] // p["heads"]
    V = vocab or len(tiny_vocab()[0])
    rng = np.random.default_rng(seed)

    def lin(o, i, scale=1.0):
        return (rng.standard_normal((o, i)) * scale / math.sqrt(i)).astype(np.float32)

    def vec(n, mean=0.0, std=0.1):
        return (mean + std * rng.standard_normal(n)).astype(np.float32)

    w = {"token_embd.weight": rng.standard_normal((V, H)).astype(np.float32),
         "output_norm.weight": vec(H, 1.0), "output_norm.bias": vec(H),
         "output.weight": lin(V, H, 2.0), "output.bias": vec(V)}
    for i in range(p["layers"]):
        b = f"blk.{i}."
        w.update({b + "attn_norm.weight": vec(H, 1.0), b + "attn_norm.bias": vec(H),
                  b + "attn_qkv.weight": lin(3 * H, H, 2.0), b + "attn_qkv.bias": vec(3 * H),
                  b + "attn_output.weight": lin(H, H), b + "attn_output.bias": vec(H),
                  b + "ffn_up.weight": lin(F, H), b + "ffn_up.bias": vec(F),
                  b + "ffn_down.weight": lin(H, F), b + "ffn_down.bias": vec(H)})
        if qk_norm:
            w.update({b + "attn_q_norm.weight": vec(D, 1.0, 0.3), b + "attn_q_norm.bias": vec(D, 0.0, 0.3),
                      b + "attn_k_norm.weight": vec(D, 1.0, 0.3), b + "attn_k_norm.bias": vec(D, 0.0, 0.3)})
        if post_norm:
            w[b + "post_attention_norm.weight"] = vec(H, 1.0, 0.2)
    return w


def write_llm_gguf(path: Path, weights: dict[str, np.ndarray], qtype=T.F32, vision_hash: str | None = None,
                   **overrides) -> Path:
    """An LLM GGUF per the contract: 2-D weights in qtype (fallback per qtypes.choose_type), 1-D in F32."""
    p = {**TINY, **overrides}
    tokens, types, merges, eos = tiny_vocab()
    wr = gguf.GGUFWriter(str(path), names.ARCH_LLM)
    wr.add_name("tiny-test")
    wr.add_uint32(names.LLM_CONTEXT_LENGTH, p["ctx"])
    wr.add_uint32(names.LLM_EMBEDDING_LENGTH, p["hidden"])
    wr.add_uint32(names.LLM_FEED_FORWARD_LENGTH, p["ffn"])
    wr.add_uint32(names.LLM_BLOCK_COUNT, p["layers"])
    wr.add_uint32(names.LLM_HEAD_COUNT, p["heads"])
    wr.add_uint32(names.LLM_HEAD_COUNT_KV, p["heads"])
    wr.add_uint32(names.LLM_ROPE_DIMENSION_COUNT, p["rot"])
    wr.add_float32(names.LLM_ROPE_FREQ_BASE, 10000.0)
    wr.add_float32(names.LLM_LAYER_NORM_EPS, 1e-5)
    if "blk.0.post_attention_norm.weight" in weights:
        wr.add_float32(names.LLM_RMS_NORM_EPS, 1e-6)
    wr.add_string("tokenizer.ggml.model", "gpt2")
    wr.add_array("tokenizer.ggml.tokens", tokens)
    wr.add_array("tokenizer.ggml.token_type", types)
    wr.add_array("tokenizer.ggml.merges", merges)
    wr.add_uint32("tokenizer.ggml.bos_token_id", eos)
    wr.add_uint32("tokenizer.ggml.eos_token_id", eos)
    wr.add_uint32("tokenizer.ggml.padding_token_id", eos)
    wr.add_string(names.PROMPT_TEMPLATE, "###Human: {} ###Assistant: ")
    wr.add_string(names.END_SYM, "###")
    wr.add_array(names.STOP_STRINGS, ["###"])
    wr.add_uint32(names.IMAGE_TOKEN_COUNT, 4)
    wr.add_string(names.IMAGE_PLACEHOLDER, "<ImageHere>")
    if vision_hash:
        wr.add_string(names.VISION_HASH, vision_hash)
    for name, arr in weights.items():
        if arr.ndim == 1:
            wr.add_tensor(name, arr.astype(np.float32))
            continue
        q = qtypes.quantize(arr, qtypes.choose_type(qtype, arr.shape)) if qtype != T.F32 else qtypes.Quantized(arr, T.F32)
        if q.qtype in (T.F32, T.F16):
            wr.add_tensor(name, q.data)
        else:
            wr.add_tensor(name, q.data, raw_shape=q.data.shape, raw_dtype=q.qtype)
    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_tensors_to_file()
    wr.close()
    return path


# ------------------------------------------------------------------------------------------------ NumPy reference
def _ln(x, w, b, eps):
    x64 = x.astype(np.float64)
    mu = x64.mean(-1, keepdims=True)
    var = ((x64 - mu) ** 2).mean(-1, keepdims=True)
    return ((x64 - mu) / np.sqrt(var + eps) * w + b)


def _gelu_tanh(x):
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def _rope_neox(x, pos, rot, base):
    """x [S, heads, D]; rotate the first `rot` dims as NeoX halves (rotate_half), positions pos [S]."""
    half = rot // 2
    inv = base ** (-np.arange(half, dtype=np.float64) * 2.0 / rot)
    ang = pos[:, None].astype(np.float64) * inv[None, :]  # [S, half]
    cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    x1, x2 = x[..., :half], x[..., half:rot]
    out = x.copy()
    out[..., :half] = x1 * cos - x2 * sin
    out[..., half:rot] = x2 * cos + x1 * sin
    return out


def numpy_reference_logits(w: dict[str, np.ndarray], embeddings: np.ndarray, rot: int, heads: int,
                           ln_eps=1e-5, rms_eps=1e-6, base=10000.0) -> np.ndarray:
    """All-position logits of the decoder described in the contract, in float64, from embeddings [S, H]."""
    x = embeddings.astype(np.float64)
    S, H = x.shape
    D = H // heads
    pos = np.arange(S)
    n_layers = len({k.split(".")[1] for k in w if k.startswith("blk.")})
    causal = np.triu(np.full((S, S), -np.inf), 1)
    for i in range(n_layers):
        b = f"blk.{i}."
        h = _ln(x, w[b + "attn_norm.weight"], w[b + "attn_norm.bias"], ln_eps)
        qkv = h @ w[b + "attn_qkv.weight"].T.astype(np.float64) + w[b + "attn_qkv.bias"]
        q, k, v = (qkv[:, j * H:(j + 1) * H].reshape(S, heads, D) for j in range(3))
        if b + "attn_q_norm.weight" in w:
            q = _ln(q, w[b + "attn_q_norm.weight"], w[b + "attn_q_norm.bias"], ln_eps)
            k = _ln(k, w[b + "attn_k_norm.weight"], w[b + "attn_k_norm.bias"], ln_eps)
        q, k = _rope_neox(q, pos, rot, base), _rope_neox(k, pos, rot, base)
        scores = np.einsum("qhd,khd->hqk", q, k) / math.sqrt(D) + causal
        scores = np.exp(scores - scores.max(-1, keepdims=True))
        probs = scores / scores.sum(-1, keepdims=True)
        att = np.einsum("hqk,khd->qhd", probs, v).reshape(S, H)
        att = att @ w[b + "attn_output.weight"].T.astype(np.float64) + w[b + "attn_output.bias"]
        if b + "post_attention_norm.weight" in w:
            att = att / np.sqrt((att ** 2).mean(-1, keepdims=True) + rms_eps) * w[b + "post_attention_norm.weight"]
        mlp = _gelu_tanh(h @ w[b + "ffn_up.weight"].T.astype(np.float64) + w[b + "ffn_up.bias"])
        mlp = mlp @ w[b + "ffn_down.weight"].T.astype(np.float64) + w[b + "ffn_down.bias"]
        x = x + att + mlp
    x = _ln(x, w["output_norm.weight"], w["output_norm.bias"], ln_eps)
    return x @ w["output.weight"].T.astype(np.float64) + w["output.bias"]


def file_weights(path: Path) -> dict[str, np.ndarray]:
    """The weights as stored (dequantized), so the reference sees exactly what the runtime sees."""
    f = open_gguf(path, names.ARCH_LLM)
    return {n: as_float32(t) for n, t in f.tensors.items()}


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def tiny_weights():
    return random_llm_weights(seed=0)


@pytest.fixture(scope="module")
def llm_files(tmp_path_factory, tiny_weights):
    d = tmp_path_factory.mktemp("gguf")
    out = {}
    for name, qt in (("f32", T.F32), ("f16", T.F16), ("q8_0", T.Q8_0), ("q4_0", T.Q4_0), ("q4_k", T.Q4_K)):
        out[name] = write_llm_gguf(d / f"llm-{name}.gguf", tiny_weights, qt)
    return out


def _prompt_ids(n: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, n).astype(np.int32)


def _reference_for_ids(path: Path, ids: np.ndarray) -> np.ndarray:
    w = file_weights(path)
    return numpy_reference_logits(w, w["token_embd.weight"][ids], TINY["rot"], TINY["heads"])


def _rel_err(a, b) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


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
    """F32 weights, F32 KV: the only differences are float32 accumulation order and ggml's fp16 GELU table
    (|err| ~1e-3 of the activation), so logits of std ~2 agree to < 1e-2 absolute."""
    ids = _prompt_ids(20)
    ref = _reference_for_ids(llm_files["f32"], ids)
    m = _ggml(llm_files["f32"], kv_type="f32")
    got = m.eval_tokens(ids, all_logits=True)
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() < 1e-2, np.abs(got - ref).max()
    assert ref.std() > 0.5  # the check is not vacuous


@pytest.mark.parametrize("qtype,limit", [("f16", 0.005), ("q8_0", 0.03), ("q4_0", 0.08), ("q4_k", 0.08)])
def test_ggml_quantized_matches_reference_on_dequantized_weights(llm_files, qtype, limit):
    """Against the reference run on the file's own (dequantized) weights, what remains is ggml quantizing the
    activations to Q8 for quantized matmuls (Q8_0/Q4_0: Q8_0 activations; Q4_K: Q8_K) plus the f16 KV cache:
    measured 0.05 % (F16), 1.0 % (Q8_0, Q4_0), 1.4 % (Q4_K) of the largest logit; the limits leave 3-10x margin."""
    ids = _prompt_ids(24, seed=3)
    ref = _reference_for_ids(llm_files[qtype], ids)
    got = _ggml(llm_files[qtype]).eval_tokens(ids, all_logits=True)
    assert _rel_err(got, ref) < limit, _rel_err(got, ref)


def test_ggml_kv_cache_decode_matches_full_prefill_and_chunking(llm_files):
    """Token-by-token decode through the KV cache, chunked prefill (n_batch=5) and one full prefill give the same
    logits at every position (same kernels, same f32 cache: only summation order may differ)."""
    ids = _prompt_ids(17, seed=5)
    full = _ggml(llm_files["q8_0"], kv_type="f32").eval_tokens(ids, all_logits=True)
    step = _ggml(llm_files["q8_0"], kv_type="f32")
    stepwise = np.stack([step.eval_tokens(ids[i:i + 1]) for i in range(len(ids))])
    chunked = _ggml(llm_files["q8_0"], kv_type="f32", n_batch=5).eval_tokens(ids, all_logits=True)
    assert np.abs(stepwise - full).max() < 1e-3
    assert np.abs(chunked - full).max() < 1e-3
    assert step.n_past == len(ids)


def test_ggml_embeddings_input_equals_token_input(llm_files):
    """Feeding the token_embd rows as embeddings (the image-splice path) gives the token path's logits, and a
    prompt split text / embeddings / text through the cache equals one prefill."""
    path = llm_files["f16"]
    ids = _prompt_ids(12, seed=7)
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
    ids = _prompt_ids(10, seed=9)
    other = _prompt_ids(4, seed=10)
    m = _ggml(path)
    m.eval_tokens(ids)
    m.truncate(6)
    got = m.eval_tokens(other)
    want = _ggml(path).eval_tokens(np.concatenate([ids[:6], other]))
    assert np.abs(got - want).max() < 1e-3


def test_ggml_context_overflow_is_user_error(llm_files):
    m = _ggml(llm_files["f32"], n_ctx=8)
    m.eval_tokens(_prompt_ids(6))
    with pytest.raises(UserError, match=r"context length exceeded: 6 cached \+ 3 new > n_ctx 8"):
        m.eval_tokens(_prompt_ids(3))
    assert m.n_past == 6  # nothing half-applied


def test_plain_phi2_file_without_extra_norms_runs(tmp_path):
    w = random_llm_weights(seed=4, qk_norm=False, post_norm=False)
    path = write_llm_gguf(tmp_path / "plain.gguf", w, T.F32)
    hp = llm_hyperparams(open_gguf(path, names.ARCH_LLM))
    assert not hp.qk_layernorm and hp.rms_norm_eps is None
    ids = _prompt_ids(9)
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
    ids = _prompt_ids(79, seed=11)
    rows = file_weights(path)["token_embd.weight"][ids]
    monkeypatch.setenv("TINYGPT_GGML_DECODE_GRAPH", "0")
    off = _ggml(path, n_ctx=70)
    assert not off.decode_graph
    want = _decode_script(off, ids, rows)
    assert off._decode is None
    monkeypatch.delenv("TINYGPT_GGML_DECODE_GRAPH")
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
    assert _rel_err(got, want) < 1e-4, _rel_err(got, want)
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
    ids = _prompt_ids(15, seed=11)
    ref = _reference_for_ids(llm_files["q4_k"], ids)
    t = TorchLLM(open_gguf(llm_files["q4_k"], names.ARCH_LLM), dtype="fp32")
    got = t.eval_tokens(ids[:10], all_logits=True)
    got = np.concatenate([got, t.eval_tokens(ids[10:], all_logits=True)])
    assert np.abs(got - ref).max() < 1e-3
    g = _ggml(llm_files["q4_k"]).eval_tokens(ids, all_logits=True)
    assert _rel_err(g, got) < 0.05


def test_torch_fallback_bf16_is_close(llm_files):
    ids = _prompt_ids(8, seed=12)
    ref = _reference_for_ids(llm_files["f32"], ids)
    got = TorchLLM(open_gguf(llm_files["f32"], names.ARCH_LLM), dtype="bf16").eval_tokens(ids, all_logits=True)
    assert _rel_err(got, ref) < 0.05


# ------------------------------------------------------------------------------------------------ sampler
from quantize.sampler import Sampler, SamplingParams, StopMatcher  # noqa: E402


def test_sampler_greedy_penalty_top_p_and_seed():
    logits = np.array([1.0, 3.0, 2.9, -1.0, 0.5])
    assert Sampler(SamplingParams(temperature=0.0, repetition_penalty=1.0))(logits) == 1
    # penalty 1.1 divides the positive logit 3.0 of the seen token 1 -> 2.73 < 2.9
    assert Sampler(SamplingParams(temperature=0.0, repetition_penalty=1.1))(logits, previous=[1]) == 2
    # top_p 0.5: tokens 1 and 2 hold 0.48 + 0.44 of the mass at T=1 -> only they can be drawn
    s = Sampler(SamplingParams(temperature=1.0, top_p=0.5, repetition_penalty=1.0, seed=0))
    draws = {s(logits) for _ in range(200)}
    assert draws == {1, 2}

    def draw(seed):
        sampler = Sampler(SamplingParams(temperature=1.0, top_p=1.0, seed=seed))
        return [sampler(logits) for _ in range(20)]

    assert draw(7) == draw(7) and len(set(draw(7))) > 1 and draw(7) != draw(8)


@pytest.mark.parametrize("field,value,flag", [("temperature", -1.0, "--temperature"), ("top_p", 0.0, "--top-p"),
                                              ("repetition_penalty", 0.0, "--repetition-penalty"),
                                              ("max_new_tokens", 0, "--max-new-tokens")])
def test_sampler_rejects_bad_params(field, value, flag):
    with pytest.raises(UserError, match=flag):
        Sampler(SamplingParams(**{field: value}))


def test_stop_matcher_holds_back_partial_stop_strings():
    m = StopMatcher(["###", "Human:"])
    assert m.find("a cat ### b") == 6 and m.find("a cat") == -1
    assert m.safe_prefix_length("a cat #") == 6
    assert m.safe_prefix_length("a cat ##") == 6
    assert m.safe_prefix_length("a Hum") == 2
    assert m.safe_prefix_length("a cat") == 5


# ------------------------------------------------------------------------------------------------ session
from quantize.session import ChatSession, load_language_model  # noqa: E402


def _session(path, sampling=None, **kw) -> ChatSession:
    f = open_gguf(path, names.ARCH_LLM)
    llm = ggml_llm.GgmlLLM(f, kv_type="f32", **kw)
    return ChatSession(llm=llm, tokenizer=load_tokenizer(f), fmt=chat_format(f),
                       sampling=sampling or SamplingParams(temperature=0.0, repetition_penalty=1.0, max_new_tokens=6))


class _RecordingSampler:
    """Wraps the session's sampler and keeps the logits it was given."""

    def __init__(self, inner):
        self.inner, self.seen = inner, []

    def __call__(self, logits, previous=()):
        self.seen.append(np.array(logits))
        return self.inner(logits, previous)


def _image(seed, n=4, h=TINY["hidden"]):
    return np.random.default_rng(seed).standard_normal((n, h)).astype(np.float32)


def test_session_layout_follows_training_format(llm_files):
    s = _session(llm_files["f32"])
    eos = tiny_vocab()[3]
    s.image_vectors.append(_image(0))
    from quantize.session import Turn
    items = s.layout([Turn("<Img><ImageHere></Img> hi", [0], "ok"), Turn("more", [])])
    text_ids = [i for i in items if isinstance(i, int)]
    assert items[0] == eos and [i for i in items if isinstance(i, tuple)] == [(0, j) for j in range(4)]
    decoded = s.tokenizer.decode(text_ids, skip_special_tokens=False)
    assert decoded == ("<|endoftext|>###Human: <Img></Img> hi ###Assistant: ok###"
                       "<|endoftext|>###Human: more ###Assistant: ")


def test_session_greedy_with_cache_equals_recomputation_and_multi_turn_reuse(llm_files):
    """Greedy decoding through the KV cache == greedy recomputed from scratch at every step; the second turn
    evaluates only its new positions, and its logits equal one long prefill of the whole conversation."""
    path = llm_files["q8_0"]
    s = _session(path)
    rec = _RecordingSampler(s.sampler)
    s.sampler = rec
    image = _image(1)
    answer1 = s.ask("what is it?", images=[image])
    first_turn_positions = len(s.layout(s.turns))
    # recompute turn 1 greedily from scratch (no cache reuse at all)
    prompt = s.layout(s.turns[:0] + [type(s.turns[0])(s.turns[0].user, [0])])
    fresh = _session(path)
    fresh.image_vectors.append(image)
    tokens = []
    for step in range(len(rec.seen)):
        m = fresh.llm
        m.reset()
        fresh._cached = []
        logits = fresh._feed(prompt + tokens)
        assert np.abs(logits - rec.seen[step]).max() < 1e-3
        tokens.append(int(np.argmax(logits)))
    assert s.tokenizer.decode(tokens, skip_special_tokens=False).startswith(answer1) or answer1 == ""
    # turn 2 reuses the cache
    rec.seen.clear()
    s.ask("and then?")
    # random weights emit arbitrary bytes, whose text may re-tokenize differently: the first prompt is always kept
    assert len(prompt) <= s.last_stats.reused_tokens <= first_turn_positions
    assert s.last_stats.reused_tokens + s.last_stats.prompt_tokens == len(s.layout(s.turns[:1])) + len(
        s.layout([type(s.turns[1])("and then?", [])]))
    one_shot = _session(path)
    one_shot.image_vectors.append(image)
    turns = [type(t)(t.user, t.images, t.answer) for t in s.turns]
    turns[-1].answer = None
    want = one_shot._feed(one_shot.layout(turns))
    assert np.abs(rec.seen[0] - want).max() < 1e-3


def test_session_rejects_over_long_prompt_and_keeps_state(llm_files):
    s = _session(llm_files["f32"])
    s.ask("hi")
    n_turns, n_past = len(s.turns), s.llm.n_past
    with pytest.raises(UserError, match=r"prompt too long: the conversation needs \d+ positions, the context holds 96"):
        s.ask("x" * 200)
    assert len(s.turns) == n_turns and s.llm.n_past == n_past
    with pytest.raises(UserError, match="2 <ImageHere> but 1 image"):
        s.ask("<ImageHere> <ImageHere>", images=[_image(2)])
    assert len(s.image_vectors) == 0


class _ScriptedLLM:
    """Stands in for the decoder: each evaluation returns one-hot logits for the next scripted token."""

    def __init__(self, script, hidden, vocab, n_ctx=200):
        from types import SimpleNamespace
        self.script, self.n_past, self.n_ctx = list(script), 0, n_ctx
        self.hp = SimpleNamespace(hidden_size=hidden, vocab_size=vocab)

    def _next(self, n):
        self.n_past += n
        out = np.zeros(self.hp.vocab_size, np.float32)
        out[self.script.pop(0)] = 10.0
        return out

    def eval_tokens(self, ids):
        return self._next(len(ids))

    def eval_embeddings(self, rows):
        return self._next(len(rows))

    def truncate(self, n):
        self.n_past = n


def test_session_streams_text_and_stops_at_stop_string(llm_files):
    f = open_gguf(llm_files["f32"], names.ARCH_LLM)
    tok = load_tokenizer(f)
    script = tok.encode("Hi there Human ok", add_special_tokens=False).ids + tok.encode("###", add_special_tokens=False).ids
    script += tok.encode(" never shown", add_special_tokens=False).ids
    s = ChatSession(llm=_ScriptedLLM([0] + script, 256, len(tiny_vocab()[0])), tokenizer=tok, fmt=chat_format(f),
                    sampling=SamplingParams(temperature=0.0, repetition_penalty=1.0, max_new_tokens=50))
    s.llm.script = script  # the prompt prefill returns the first scripted token
    chunks = []
    answer = s.ask("hello", on_text=chunks.append)
    assert answer == "Hi there Human ok"
    assert "".join(chunks) == "Hi there Human ok" and all("#" not in c for c in chunks)
    assert s.last_stats.stopped_by == "stop string"
    eos = tiny_vocab()[3]
    s2 = ChatSession(llm=_ScriptedLLM(tok.encode("Yes", add_special_tokens=False).ids + [eos, 5], 256, len(tiny_vocab()[0])),
                     tokenizer=tok, fmt=chat_format(f), sampling=SamplingParams(temperature=0.0, repetition_penalty=1.0))
    assert s2.ask("q") == "Yes" and s2.last_stats.stopped_by == "eos"


def test_backend_auto_falls_back_to_torch_with_notice(llm_files, monkeypatch, capsys):
    import builtins
    real_import = builtins.__import__

    def no_ggml(name, *args, **kwargs):
        if name == "ggml" or name.endswith("ggml_llm") or (args and args[2] and "ggml_llm" in args[2]):
            raise ImportError("ggml-python is not installed")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ggml)
    llm = load_language_model(open_gguf(llm_files["f32"], names.ARCH_LLM), backend="auto")
    assert type(llm).__name__ == "TorchLLM"
    assert capsys.readouterr().err.count("notice: ggml-python unavailable") == 1
    with pytest.raises(UserError, match="--backend ggml: ggml-python cannot be imported"):
        load_language_model(open_gguf(llm_files["f32"], names.ARCH_LLM), backend="ggml")


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
    ids = _prompt_ids(14, seed=21)
    image = _image(5) * 0.5
    emb = np.concatenate([tiny_weights["token_embd.weight"][ids[:5]], image, tiny_weights["token_embd.weight"][ids[5:]]])
    want = _torch_logits(model, emb)
    m = _ggml(llm_files[qtype])
    m.eval_tokens(ids[:5])
    m.eval_embeddings(image)
    got_last = m.eval_tokens(ids[5:])
    assert _rel_err(got_last, want[-1]) < limit, _rel_err(got_last, want[-1])
    assert np.corrcoef(got_last, want[-1])[0, 1] > min_corr
    if qtype == "f16":
        assert np.abs(got_last - want[-1]).max() < 1e-2  # logits std ~2: tight absolute agreement
    # the NumPy reference agrees with the PyTorch model on the same weights (both implement the contract)
    ref = numpy_reference_logits(tiny_weights, emb, TINY["rot"], TINY["heads"])
    assert np.abs(ref - want).max() < 1e-3


def test_torch_fallback_matches_pytorch_model(llm_files, tiny_weights):
    model = _torch_model_with(tiny_weights)
    ids = _prompt_ids(10, seed=22)
    want = _torch_logits(model, tiny_weights["token_embd.weight"][ids])
    got = TorchLLM(open_gguf(llm_files["f32"], names.ARCH_LLM), dtype="fp32").eval_tokens(ids, all_logits=True)
    assert np.abs(got - want).max() < 1e-3


# ------------------------------------------------------------------------------------------------ exported tiny VLM
@pytest.fixture(scope="module")
def exported_tiny(tmp_path_factory):
    """The tiny TinyGPT-V preset (seeded random init, norms perturbed), saved and exported as F16 with quantize.export."""
    import torch
    from tinygpt.model import TinyGPTVForConditionalGeneration, build_config
    from tinygpt.model.checkpoint_io import save_vlm
    from tinygpt.tokenizer import load_tokenizer as load_hf_tokenizer
    export = pytest.importorskip("quantize.export")

    torch.manual_seed(0)
    model = TinyGPTVForConditionalGeneration(build_config("tiny")).eval()
    model.tokenizer = load_hf_tokenizer(None)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name.lower() and p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
        model.language_model.lm_head.weight.mul_(50.0)  # logits of O(1) instead of O(0.01)
    d = tmp_path_factory.mktemp("tiny_vlm")
    save_vlm(model, d / "model")
    export.export_model(d / "model", d / "gguf", qtype="f16", progress=False)
    from PIL import Image
    Image.fromarray((np.random.default_rng(0).random((90, 130, 3)) * 255).astype(np.uint8)).save(d / "img.png")
    (d / "notes.txt").write_text("not an image")
    return model, d


def test_vision_runtime_matches_pytorch_vision_path(exported_tiny):
    """The vision GGUF (Linear weights Q8_0) run through VisionEncoder reproduces model.encode_images: fp32 mode
    within Q8_0 weight rounding (measured ~0.3 % of the largest output), int8 mode within ~2 % (limit 6 %)."""
    import torch
    from quantize.vision_runtime import VisionEncoder
    model, d = exported_tiny
    vfile = open_gguf(d / "gguf" / names.VISION_FILE_NAME, names.ARCH_VISION)
    fp32 = VisionEncoder(vfile, int8=False)
    pixels = fp32.preprocess(d / "img.png")
    assert tuple(pixels.shape) == (1, 3, 112, 112)
    with torch.no_grad():
        want = model.encode_images(pixels)[0].numpy()
    got = fp32.encode_pixels(pixels)
    assert got.shape == (32, 256)
    assert _rel_err(got, want) < 0.02, _rel_err(got, want)
    q8 = VisionEncoder(vfile, int8=True).encode_pixels(pixels)
    assert _rel_err(q8, want) < 0.06, _rel_err(q8, want)


def test_session_layout_equals_training_sequence_and_logits_match_model(exported_tiny):
    """The chat session lays out a two-turn conversation exactly as tinygpt.model.sequence does for training,
    and its next-token logits (F16 file, ggml) match the PyTorch model on the same input: F16 weights and ggml's
    F16 activation rounding give ~0.1 % of the largest logit (|logit| up to ~40 here); limit 0.5 %."""
    import torch
    from tinygpt.model.sequence import IMAGE_SLOT, sample_ids
    from quantize.session import Turn, open_session
    model, d = exported_tiny
    s = open_session(d / "gguf", quiet=True)
    vectors = model.encode_images(s.vision.preprocess(d / "img.png"))[0].detach().numpy()
    idx = s.add_image(vectors)
    turns = [Turn("<Img><ImageHere></Img> What is this?", [idx], " A red square."), Turn("Where is it?", [])]
    items = s.layout(turns)
    fmt = model.prompt_format()
    conv = [{"user": t.user, "assistant": t.answer} for t in turns]
    ids, _, _ = sample_ids(conv, model.tokenizer, fmt, None, 1, where="test")
    assert [IMAGE_SLOT if isinstance(i, tuple) else i for i in items] == ids
    got = s._sync_cache(items)
    with torch.no_grad():
        emb = model.language_model.get_input_embeddings()(torch.tensor([max(i, 0) for i in ids]))
        emb[torch.tensor(ids) == IMAGE_SLOT] = torch.from_numpy(vectors)
        want = model.language_model(inputs_embeds=emb[None], use_cache=False).logits[0, -1].numpy()
    assert want.std() > 0.1
    assert _rel_err(got, want) < 5e-3, _rel_err(got, want)
    assert int(np.argmax(got)) == int(np.argmax(want))


def _run_cli(args, stdin_text=None, monkeypatch=None, capsys=None):
    import io
    from quantize.__main__ import main
    if stdin_text is not None:
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin_text))
    rc = main(args)
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_chat_cli_one_shot_and_interactive_survives_bad_input(exported_tiny, monkeypatch, capsys):
    _, d = exported_tiny
    g = str(d / "gguf")
    rc, out, err = _run_cli(["chat", "--gguf", g, "--image", str(d / "img.png"), "--prompt", "What is it?",
                             "--max-new-tokens", "4", "--verbose"], capsys=capsys)
    assert rc == 0 and out.strip() and "first token" in err
    lines = "\n".join([f"/image {d / 'missing.png'}", f"/image {d / 'notes.txt'}", "x " * 1500, "/bogus",
                       f"/image {d / 'img.png'}", "hello there", "/stats", "/quit"]) + "\n"
    rc, out, err = _run_cli(["chat", "--gguf", g, "--max-new-tokens", "3"], stdin_text=lines,
                            monkeypatch=monkeypatch, capsys=capsys)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert rc == 0 and len(errors) == 4, err
    assert "missing.png: image file not found" in errors[0]
    assert "notes.txt: not a readable image" in errors[1]
    assert "prompt too long" in errors[2] and "unknown command '/bogus'" in errors[3]
    assert out.strip()  # the valid question got an answer


def test_cli_user_errors_exit_2_with_one_line(tmp_path, exported_tiny, capsys):
    _, d = exported_tiny
    rc, out, err = _run_cli(["chat", "--gguf", str(tmp_path / "nope"), "--prompt", "hi"], capsys=capsys)
    assert rc == 2 and err.strip().count("\n") == 0 and "error:" in err and "not found" in err
    rc, out, err = _run_cli(["chat", "--gguf", str(d / "gguf"), "--image", str(d / "notes.txt"), "--prompt", "hi"],
                            capsys=capsys)
    assert rc == 2 and "notes.txt: not a readable image" in err
    rc, out, err = _run_cli(["chat", "--gguf", str(d / "gguf"), "--temperature", "-1", "--prompt", "hi"], capsys=capsys)
    assert rc == 2 and "--temperature" in err


def test_llama_cpp_backend_absent_is_a_user_error(llm_files, monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp -> ImportError
    with pytest.raises(UserError, match="llama-cpp-python is not importable"):
        load_language_model(open_gguf(llm_files["f32"], names.ARCH_LLM), backend="llama-cpp")
