"""GGUF export: round trip through gguf.GGUFReader, quantization error per type, fallbacks, failure modes.

Tolerances are relative Frobenius errors ||dequant(q(W)) - W|| / ||W|| on Gaussian weights (the models here are
randomly initialised with N(0, 0.02)). Measured on a 2560x10240 Gaussian matrix: Q8_0 0.0054, Q5_0 0.043,
Q4_K 0.071, Q4_0 0.086, F16 0.0002 (an independent measurement with gguf-py and ggml gave the same for Q4_0/Q8_0/Q4_K;
docs/benchmarks.md, "Quantisation error per type"). The bounds sit ~30-60 % above those, and each type also has a
lower bound, so a file that silently kept full precision fails too.
"""
from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader, TokenType

from quantize import gguf_names as names
from quantize.export import export_model, llm_plans
from quantize.gguf_meta import PromptInfo, chat_template
from quantize.gguf_stream import kv_str, plan_tensor, write_gguf
from quantize.qtypes import dequantize, parse_qtype
from quantize.random_model import write_random_model
from tinygpt.errors import UserError

T = GGMLQuantizationType
# (upper, lower) bounds of the relative error per stored type; see the module docstring.
REL_ERROR = {T.F32: (1e-7, -1), T.F16: (1e-3, -1), T.Q8_0: (0.01, 0.002), T.Q5_0: (0.06, 0.02),
             T.Q4_K: (0.10, 0.04), T.Q4_0: (0.12, 0.05)}


# --------------------------------------------------------------------------------------------- fixtures
def _toy_tokenizer():
    """A 259-token byte-level BPE (256 bytes, 2 merges, <|endoftext|>): keeps small test files fast to parse."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab["he"] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[("h", "e")]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")


SMALL_VOCAB = dict(vocab_size=512, bos_token_id=257, eos_token_id=257, pad_token_id=257)


def _save_tiny(directory: Path, lora: bool = False, extra_norms: bool = True, text_overrides: dict | None = None):
    from tinygpt.model.checkpoint_io import save_vlm
    from tinygpt.model.presets import build_config
    from tinygpt.model.vlm import TinyGPTVForConditionalGeneration
    from tinygpt.tokenizer import load_tokenizer

    torch.manual_seed(0)
    config = build_config("tiny", lora={"r": 4} if lora else None, extra_norms=extra_norms)
    for key, value in (text_overrides or {}).items():
        setattr(config.text_config, key, value)
    model = TinyGPTVForConditionalGeneration(config)
    with torch.no_grad():  # trained-like values: BLIP-2's init is N(0, 1e-10), below fp16 scales' range;
        for name, p in model.named_parameters():  # non-trivial norms and LoRA deltas make a dropped tensor visible
            if p.ndim == 1 and name.endswith("weight"):
                p.copy_(1 + torch.randn_like(p) * 0.05)
            else:
                p.copy_(torch.randn_like(p) * 0.02)
    small = (text_overrides or {}).get("vocab_size", 51200) < 51200
    model.tokenizer = _toy_tokenizer() if small else load_tokenizer(None)
    save_vlm(model, directory)
    return model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    model = _save_tiny(root / "model")
    return root, model


@pytest.fixture(scope="module")
def q4k(tiny):
    root, model = tiny
    summary = export_model(root / "model", root / "out", "q4_k", progress=False)
    return root / "out", model, summary


@functools.lru_cache(maxsize=4)
def _reader(path: Path) -> GGUFReader:
    """GGUFReader parses the 51200 tokens + 50000 merges in seconds, so each file is opened once."""
    return GGUFReader(path)


def _fields(reader: GGUFReader) -> dict:
    return {k: f.contents() for k, f in reader.fields.items()}


def _tensors(reader: GGUFReader) -> dict:
    return {t.name: t for t in reader.tensors}


def _rel_error(tensor, original: np.ndarray) -> float:
    values = dequantize(tensor.data, T(tensor.tensor_type)).reshape(original.shape)
    return float(np.linalg.norm(values - original) / np.linalg.norm(original))


# ------------------------------------------------------------------------------------------------ names
def test_name_tables_are_invertible_unique_and_short(tiny):
    _, model = tiny
    seen = set()
    for name in model.state_dict():
        if name.startswith(names.LLM_PREFIX):
            g = names.torch_to_gguf_llm(name)
            assert names.LLM_PREFIX + names.gguf_to_torch_llm(g) == name
        else:
            assert names.is_vision_tensor(name), name
            g = names.torch_to_gguf_vision(name)
            assert names.gguf_to_torch_vision(g) == name
        assert g not in seen
        seen.add(g)
    assert "qf.0.xattn.key.weight" in seen and "v.enc.3.attn.qkv.weight" in seen and "qf.1.ffn_ln.bias" in seen
    assert len(seen) == len(model.state_dict())
    # full-size layer numbers stay far below ggml's 64-byte name limit
    longest = max((n.replace(".0.", ".38.").replace(".1.", ".39.") for n in seen), key=len)
    assert len(longest) <= names.MAX_NAME_LENGTH - 20, longest


def test_unknown_gguf_name_is_rejected():
    with pytest.raises(KeyError):
        names.gguf_to_torch_vision("v.enc.3.attn.qkv.scale")
    with pytest.raises(KeyError):
        names.torch_to_gguf_llm("model.layers.0.self_attn.qkv.lora_A.default.weight")


# ------------------------------------------------------------------------------------------- LLM file
def test_llm_file_metadata(q4k):
    out, model, _ = q4k
    c = model.config.text_config
    f = _fields(_reader(out / "llm-q4_k.gguf"))
    assert f["general.architecture"] == "phi2" and f["general.file_type"] == 14  # MOSTLY_Q4_K_S
    assert f["phi2.context_length"] == c.max_position_embeddings and f["phi2.embedding_length"] == c.hidden_size
    assert f["phi2.feed_forward_length"] == c.intermediate_size and f["phi2.block_count"] == c.num_hidden_layers
    assert f["phi2.attention.head_count"] == f["phi2.attention.head_count_kv"] == c.num_attention_heads
    assert f["phi2.rope.dimension_count"] == 32 and f["phi2.rope.freq_base"] == pytest.approx(1e4)
    assert f["phi2.attention.layer_norm_epsilon"] == pytest.approx(1e-5)
    assert f["phi2.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-6)
    assert f["tinygptv.prompt_template"] == "###Human: {} ###Assistant: " and f["tinygptv.end_sym"] == "###"
    assert f["tinygptv.stop_strings"] == ["###"] and f["tinygptv.image_token_count"] == 32
    assert f["tinygptv.image_placeholder"] == "<ImageHere>"
    # tokenizer: GPT-2 BPE + Phi-2's whitespace tokens, padded to the 51200 embedding rows
    tokens, types = f["tokenizer.ggml.tokens"], f["tokenizer.ggml.token_type"]
    assert f["tokenizer.ggml.model"] == "gpt2" and len(tokens) == len(types) == 51200
    assert tokens[50256] == "<|endoftext|>" and types[50256] == TokenType.CONTROL
    assert tokens[50257] == " " * 31 and types[50257] == TokenType.USER_DEFINED
    assert tokens[50294] == "\t\t" and types[50294] == TokenType.USER_DEFINED
    assert tokens[50295] == "[PAD50295]" and types[51199] == TokenType.UNUSED
    assert tokens[15496] == "Hello" and types[15496] == TokenType.NORMAL
    assert len(f["tokenizer.ggml.merges"]) == 50000 and f["tokenizer.ggml.merges"][0] == "Ġ t"
    assert f["tokenizer.ggml.bos_token_id"] == f["tokenizer.ggml.eos_token_id"] == 50256
    assert f["tokenizer.ggml.padding_token_id"] == 50256


def test_llm_tensors_names_shapes_types_and_values(q4k):
    out, model, summary = q4k
    tensors = _tensors(_reader(out / "llm-q4_k.gguf"))
    c = model.config.text_config
    assert list(tensors) == names.llm_tensor_names(c.num_hidden_layers, True, True)
    state = model.state_dict()
    for name, t in tensors.items():
        original = state[names.LLM_PREFIX + names.gguf_to_torch_llm(name)].float().numpy()
        assert list(t.shape) == list(original.shape[::-1])  # ggml ne = numpy shape reversed, no transpose
        expected_type = T.Q4_K if original.ndim == 2 else T.F32
        assert T(t.tensor_type) == expected_type, name
        high, low = REL_ERROR[expected_type]
        assert low < _rel_error(t, original) < high, name
    assert summary.llm.fallbacks == [] and summary.llm.tensors_per_type == {"Q4_K": 18, "F32": 47}
    assert summary.llm.bits_per_weight_2d == pytest.approx(4.5)


def test_qkv_rows_are_q_then_k_then_v(q4k):
    out, model, _ = q4k
    t = _tensors(_reader(out / "llm-q4_k.gguf"))["blk.1.attn_qkv.bias"]
    qkv = model.language_model.model.layers[1].self_attn.qkv.bias.detach().numpy()
    np.testing.assert_array_equal(t.data, qkv)  # F32 bias: exact, same row order


# ---------------------------------------------------------------------------------------- vision file
def test_vision_file_keys_tensors_and_hash(q4k):
    out, model, summary = q4k
    reader = _reader(out / "vision.gguf")
    f = _fields(reader)
    assert f["general.architecture"] == "tinygptv-vision"
    key = names.vision_key
    assert f[key("image_size")] == 112 and f[key("patch_size")] == 14 and f[key("num_layers")] == 4
    assert f[key("qformer.cross_attention_frequency")] == 2 and f[key("qformer.encoder_hidden_size")] == 128
    assert f[key("num_query_tokens")] == 32 and f[key("proj_hidden_size")] == 512 and f[key("llm_hidden_size")] == 256
    assert f[key("layer_norm_eps")] == pytest.approx(1e-6) and f[key("ln_vision_eps")] == pytest.approx(1e-5)
    assert f[key("qformer.layer_norm_eps")] == pytest.approx(1e-12)
    assert f[key("image_mean")] == pytest.approx([0.48145466, 0.4578275, 0.40821073])
    assert len(f[key("image_std")]) == 3
    llm_fields = _fields(_reader(out / "llm-q4_k.gguf"))
    assert llm_fields[names.VISION_HASH] == names.vision_hash({k: f[key(k)] for k in names.VISION_SHAPE_KEYS})

    state = model.state_dict()
    tensors = _tensors(reader)
    assert {names.gguf_to_torch_vision(n) for n in tensors} == {n for n in state if names.is_vision_tensor(n)}
    for name, t in tensors.items():
        original = state[names.gguf_to_torch_vision(name)].float().numpy()
        assert list(t.shape) == list(original.shape[::-1])
        linear = original.ndim == 2 and name.endswith(".weight")
        assert T(t.tensor_type) == (T.Q8_0 if linear else T.F32), name
        high, low = REL_ERROR[T(t.tensor_type)]
        assert low < _rel_error(t, original) < high, name
    assert summary.vision.tensors_per_type["Q8_0"] == 34
    assert {n.split(".")[2] for n in tensors if n.startswith("v.enc.")} == {"0", "1", "2", "3"}
    assert sum(n.startswith("qf.") and ".xattn.key.weight" in n for n in tensors) == 1  # layer 0 of 2 (every 2nd)


def test_summary_file_and_permissions(q4k):
    out, _, summary = q4k
    data = json.loads((out / "export.json").read_text())
    assert data["qtype"] == "q4_k" and data["llm"]["size_bytes"] == (out / "llm-q4_k.gguf").stat().st_size
    assert data["llm"]["bits_per_weight_2d"] == pytest.approx(4.5)
    assert sorted(p.name for p in out.iterdir()) == ["export.json", "llm-q4_k.gguf", "vision.gguf"]
    assert all(p.stat().st_mode & 0o044 for p in out.iterdir())  # readable by others, unlike 0600 temp files


def test_chat_template_renders_what_training_builds(tiny):
    import jinja2

    from tinygpt.model.sequence import sample_ids

    _, model = tiny
    tok = model.tokenizer
    fmt = model.prompt_format()
    turns = [{"user": "What's this?\tit's 'quoted'", "assistant": "A red square."}, {"user": "Where is it?"}]
    ids, _, _ = sample_ids(turns, tok, fmt, None, 0, "test")
    messages = [{"role": "user", "content": turns[0]["user"]}, {"role": "assistant", "content": "A red square."},
                {"role": "user", "content": "Where is it?"}]
    text = jinja2.Template(chat_template(PromptInfo.from_config(model.config))).render(
        messages=messages, bos_token="<|endoftext|>")
    # the same text; the runtime tokenizes prompt and answer pieces separately, exactly as sample_ids does
    assert text == tok.decode(ids)
    assert text.count("<|endoftext|>") == 2 and text.endswith("###Human: Where is it? ###Assistant: ")


# ------------------------------------------------------------------------------------------- other types
@pytest.mark.slow
@pytest.mark.parametrize("qtype", ["q4_0", "q8_0", "f16", "f32"])
def test_other_qtypes_round_trip(tiny, qtype):
    root, model = tiny
    export_model(root / "model", root / f"out_{qtype}", qtype, progress=False)
    reader = _reader(root / f"out_{qtype}" / f"llm-{qtype}.gguf")
    stored = parse_qtype(qtype)
    state = model.state_dict()
    for name in ("token_embd.weight", "blk.0.attn_qkv.weight", "blk.3.ffn_down.weight", "output.weight"):
        t = _tensors(reader)[name]
        expected = T.F32 if (stored == T.F16 and name == "output.weight") else stored  # F16 keeps the head F32
        assert T(t.tensor_type) == expected
        high, low = REL_ERROR[expected]
        assert low < _rel_error(t, state[names.LLM_PREFIX + names.gguf_to_torch_llm(name)].numpy()) < high


def test_row_length_not_fitting_blocks_falls_back_and_is_reported(tmp_path):
    # hidden 96: rows of 96 do not divide into Q4_K's 256-blocks -> Q5_0 (32-blocks), as llama.cpp's quantizer does
    _save_tiny(tmp_path / "model", text_overrides=dict(hidden_size=96, num_attention_heads=4, rotary_dim=8,
                                                        intermediate_size=256, num_hidden_layers=1, **SMALL_VOCAB))
    summary = export_model(tmp_path / "model", tmp_path / "out", "q4_k", progress=False)
    assert "blk.0.attn_qkv.weight [288, 96]: Q4_K -> Q5_0" in summary.llm.fallbacks
    assert len(summary.llm.fallbacks) == 5  # token_embd, attn_qkv, attn_output, ffn_up, output; not ffn_down (256)
    assert summary.llm.tensors_per_type == {"F32": 14, "Q5_0": 5, "Q4_K": 1}
    assert any("fell back" in line for line in summary.lines())
    assert json.loads((tmp_path / "out" / "export.json").read_text())["llm"]["fallbacks"] == summary.llm.fallbacks
    # a row length that fits no 32-block either goes to F16
    assert [p.qtype for p in llm_plans([("x", (4, 100)), ("y", (4, 96)), ("z", (4, 512))], T.Q4_K)] == \
        [T.F16, T.Q5_0, T.Q4_K]
    assert plan_tensor("w", (4, 100), T.Q8_0).qtype == T.F16


def test_fallback_tensors_are_stored_widened_and_read_back(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {"a": rng.standard_normal((8, 96), np.float32), "b": rng.standard_normal((8, 100), np.float32),
              "c": rng.standard_normal((8, 256), np.float32)}
    plans = [plan_tensor(n, a.shape, T.Q4_K) for n, a in arrays.items()]
    summary = write_gguf(tmp_path / "f.gguf", "test", [], plans, lambda p: arrays[p.name], progress=False)
    tensors = _tensors(GGUFReader(tmp_path / "f.gguf"))
    assert {n: T(t.tensor_type) for n, t in tensors.items()} == {"a": T.Q5_0, "b": T.F16, "c": T.Q4_K}
    for name, t in tensors.items():
        high, low = REL_ERROR[T(t.tensor_type)]
        assert low < _rel_error(t, arrays[name]) < high
    assert summary.fallbacks == ["a [8, 96]: Q4_K -> Q5_0", "b [8, 100]: Q4_K -> F16"]


def test_plain_phi2_model_with_lora_exports_stock_layout_with_lora_merged(tmp_path):
    from tinygpt.model.lora import merge_lora

    model = _save_tiny(tmp_path / "model", lora=True, extra_norms=False, text_overrides=SMALL_VOCAB)
    export_model(tmp_path / "model", tmp_path / "out", "f16", progress=False)
    reader = _reader(tmp_path / "out" / "llm-f16.gguf")
    tensors = _tensors(reader)
    # without the extra norms: exactly stock llama.cpp phi2 tensors, and no RMS-norm key
    assert not any(k in n for n in tensors for k in ("attn_q_norm", "attn_k_norm", "post_attention_norm", "lora"))
    assert list(tensors) == names.llm_tensor_names(4, False, False) and len(tensors) == 4 * 10 + 5
    fields = _fields(reader)
    assert "phi2.attention.layer_norm_rms_epsilon" not in fields
    assert len(fields["tokenizer.ggml.tokens"]) == 512 and fields["tokenizer.ggml.tokens"][257] == "<|endoftext|>"
    assert fields["tokenizer.ggml.token_type"][257] == TokenType.CONTROL and fields["tokenizer.ggml.merges"] == ["h e"]
    # LoRA folded into the base weights before export
    base = model.language_model.model.layers[2].self_attn.qkv.base_layer.weight.detach().clone()
    merged = merge_lora(model).language_model.model.layers[2].self_attn.qkv.weight.detach()
    got = torch.from_numpy(np.asarray(tensors["blk.2.attn_qkv.weight"].data, dtype=np.float32))
    assert (merged - base).abs().max() > 1e-3  # the LoRA delta is not negligible
    torch.testing.assert_close(got, merged, atol=2e-4, rtol=1e-3)


# ----------------------------------------------------------------------------------------- failure modes
def test_interrupted_export_leaves_no_final_file(tiny, monkeypatch):
    import quantize.gguf_stream as stream

    root, _ = tiny
    calls = {"n": 0}
    real = stream.quantize

    def dying(array, qtype):
        calls["n"] += 1
        if calls["n"] == 120:  # inside the LLM file, after vision.gguf was complete
            raise KeyboardInterrupt
        return real(array, qtype)

    monkeypatch.setattr(stream, "quantize", dying)
    out = root / "out_interrupted"
    with pytest.raises(KeyboardInterrupt):
        export_model(root / "model", out, "q8_0", progress=False)
    assert not out.exists()  # the pair is one transaction: no vision, llm or temp file, and no new directory


def test_not_a_model_dir_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="missing_dir"):
        export_model(tmp_path / "missing_dir", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="empty.*config.json"):
        export_model(tmp_path / "empty", tmp_path / "out")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(UserError, match="other.*model_type"):
        export_model(tmp_path / "other", tmp_path / "out")
    with pytest.raises(UserError, match="--qtype"):
        export_model(tmp_path / "other", tmp_path / "out", "q3_k")
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------- random model
def test_random_tiny_model_matches_export_layout_and_is_reproducible(tmp_path, q4k):
    out, _, exported = q4k
    a = write_random_model(tmp_path / "a", "tiny", "q8_0", seed=3, progress=False)
    write_random_model(tmp_path / "b", "tiny", "q8_0", seed=3, progress=False)
    for file in ("llm-q8_0.gguf", "vision.gguf"):
        assert (tmp_path / "a" / file).read_bytes() == (tmp_path / "b" / file).read_bytes()
    assert (a.llm.n_tensors, a.llm.n_params) == (exported.llm.n_tensors, exported.llm.n_params)
    vision = _reader(tmp_path / "a" / "vision.gguf")
    assert {n: list(t.shape) for n, t in _tensors(vision).items()} == \
        {n: list(t.shape) for n, t in _tensors(_reader(out / "vision.gguf")).items()}
    assert a.vision.tensors_per_type == exported.vision.tensors_per_type
    with pytest.raises(UserError, match="--size"):
        write_random_model(tmp_path / "c", "huge", "q4_k")


def test_write_gguf_rejects_a_tensor_of_the_wrong_shape(tmp_path):
    plan = plan_tensor("w", (2, 32), T.Q8_0)
    with pytest.raises(ValueError, match="planned"):
        write_gguf(tmp_path / "x.gguf", "test", [kv_str("general.name", "x")], [plan],
                   lambda p: np.zeros((3, 32), np.float32), progress=False)
    assert os.listdir(tmp_path) == []
