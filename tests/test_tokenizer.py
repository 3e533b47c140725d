"""The Phi-2 tokenizer: builtin offline rebuild, local directory, hub id errors, cache."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from tinygpt.errors import UserError
from tinygpt.tokenizer import (
    ENDOFTEXT_ID,
    GPT2_DATA_SHA256,
    PHI2_TOKENIZER_SIZE,
    builtin_cache_path,
    gpt2_data_files,
    load_tokenizer,
)

CODE = (
    "def add(a, b):\n"
    "    \"\"\"Add two numbers.\"\"\"\n"
    "    if a  >  b:\n"
    "        return a + b   # three spaces before the comment\n"
    "\tif x:\n"
    "\t\t\tpass\n"
    + " " * 40 + "deep = 1\n"
    "\t\t\t\t\t\t\t\t\t\t\t\tdeeper = 2\r\n"
    "trailing   \n"
)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    cache = tmp_path_factory.mktemp("tinygpt_cache")
    old = os.environ.get("TINYGPT_CACHE")
    os.environ["TINYGPT_CACHE"] = str(cache)
    try:
        yield load_tokenizer()
    finally:
        if old is None:
            os.environ.pop("TINYGPT_CACHE", None)
        else:
            os.environ["TINYGPT_CACHE"] = old


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=True)["input_ids"]


def test_data_files_are_openai_gpt2_files():
    for name, path in gpt2_data_files().items():
        assert hashlib.sha256(path.read_bytes()).hexdigest() == GPT2_DATA_SHA256[name]
    assert hashlib.md5(gpt2_data_files()["encoder.json"].read_bytes()).hexdigest() == "dffec25a898b1f5e569bec4dffd7e5c0"
    assert hashlib.md5(gpt2_data_files()["vocab.bpe"].read_bytes()).hexdigest() == "75a37753dd7a28a2c5df80c28bf06e4e"


def test_known_gpt2_ids(tok):
    assert ids(tok, "Hello world") == [15496, 995]
    assert ids(tok, " Hello world") == [18435, 995]
    assert ids(tok, "###") == [21017]
    assert ids(tok, "\n###") == [198, 21017]
    assert ids(tok, "<|endoftext|>") == [ENDOFTEXT_ID]
    assert ids(tok, "\n") == [198]
    assert ids(tok, " ") == [220]
    assert ids(tok, "\t") == [197]
    assert ids(tok, "!") == [0]


def test_special_tokens_and_sizes(tok):
    assert type(tok).__name__ == "CodeGenTokenizer"
    assert len(tok) == PHI2_TOKENIZER_SIZE == 50295
    assert tok.bos_token == tok.eos_token == tok.unk_token == tok.pad_token == "<|endoftext|>"
    assert tok.bos_token_id == tok.eos_token_id == tok.pad_token_id == tok.unk_token_id == 50256
    assert tok.model_max_length == 2048
    assert ids(tok, "Hi") == [17250]  # no BOS, no EOS added
    assert tok.decode([50256, 17250, 50256], skip_special_tokens=True) == "Hi"


def test_whitespace_tokens_at_phi2_ids(tok):
    for n in range(2, 32):
        assert tok.convert_tokens_to_ids(" " * n) == 50257 + 31 - n
        assert ids(tok, " " * n) == [50257 + 31 - n]
    for n in range(2, 10):
        assert tok.convert_tokens_to_ids("\t" * n) == 50287 + 9 - n
        assert ids(tok, "\t" * n) == [50287 + 9 - n]
    assert ids(tok, " " * 4) == [50284]
    assert ids(tok, " " * 32) == [50257, 220]  # longest run first, then a plain space
    assert ids(tok, "\t" * 10) == [50287, 197]


def test_indented_code_uses_added_tokens(tok):
    # A run of >= 2 spaces becomes one added token and the next word loses its leading space (CodeGen/Phi-2).
    assert ids(tok, "    return x") == [50284, 7783, 2124]
    assert ids(tok, "def f(x):\n    return x") == [4299, 277, 7, 87, 2599, 198, 50284, 7783, 2124]
    assert ids(tok, "\t\tpass") == [50294, 6603]


@pytest.mark.parametrize(
    "text",
    [
        CODE,
        "Grüße aus Köln, naïve café, ½ · — “quotes” ‘single’",
        "中文分词测试，日本語のテキスト、한국어 문장",
        "emoji 😀👍🏽 family 👨‍👩‍👧‍👦 flag 🇫🇷 keycap 1️⃣",
        "mixed \u00a0nbsp \u200bzero-width \u2028line-sep \x00nul \x7f del",
        "<|endoftext|>between<|endoftext|>",
        "",
    ],
)
def test_round_trip(tok, text):
    assert tok.decode(ids(tok, text)) == text


def test_save_pretrained_then_local_dir_load(tok, tmp_path):
    from transformers import AutoTokenizer

    out = tmp_path / "tok"
    tok.save_pretrained(out)
    reloaded = load_tokenizer(str(out))
    assert len(reloaded) == 50295
    assert ids(reloaded, CODE) == ids(tok, CODE)
    assert reloaded.pad_token_id == 50256 and reloaded.model_max_length == 2048
    auto = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    assert ids(auto, CODE) == ids(tok, CODE)


def test_cache_written_and_damaged_cache_rebuilt(tok):
    path = builtin_cache_path()
    assert path.is_file() and path.stat().st_size > 1_000_000
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]
    path.write_text("{not json")
    rebuilt = load_tokenizer("builtin")
    assert ids(rebuilt, CODE) == ids(tok, CODE)
    assert path.read_text(encoding="utf-8").startswith("{") and path.stat().st_size > 1_000_000


def test_missing_path_is_user_error(tmp_path):
    missing = tmp_path / "no" / "such" / "tokenizer"
    with pytest.raises(UserError, match=str(missing)):
        load_tokenizer(str(missing))
    with pytest.raises(UserError, match="no such directory"):
        load_tokenizer("./relative/missing-dir")


def test_file_or_empty_dir_is_user_error(tmp_path):
    afile = tmp_path / "tokenizer.json"
    afile.write_text("{}")
    with pytest.raises(UserError, match="is a file"):
        load_tokenizer(str(afile))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match=str(empty)):
        load_tokenizer(str(empty))


@pytest.mark.parametrize(
    "content", ["{not json", "{}", '{"version": "1.0", "added_tokens": [], "model": {"type": "BPE", "vocab": 5}}']
)
def test_malformed_tokenizer_json_is_user_error(tmp_path, content):
    (tmp_path / "tokenizer.json").write_text(content)
    with pytest.raises(UserError, match=str(tmp_path)):
        load_tokenizer(str(tmp_path))


def test_offline_uncached_hub_id_is_user_error(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import time otherwise
    hub_id = "tinygpt-tests/definitely-not-cached-tokenizer"
    with pytest.raises(UserError, match=hub_id) as err:
        load_tokenizer(hub_id)
    assert "\n" not in str(err.value)


def test_a_hub_id_is_one_snapshot_download_then_a_local_load(monkeypatch, tmp_path, tok):
    """A hub id costs one snapshot_download of the tokenizer files (cache or one request), never transformers' own
    per-file downloads, whose back-off kept an offline user waiting about 50 s before the error."""
    import huggingface_hub
    import transformers

    tok.save_pretrained(tmp_path / "snapshot")
    calls = []

    def fake_snapshot(repo_id, allow_patterns):
        calls.append((repo_id, allow_patterns))
        if repo_id == "someone/offline":
            raise OSError("Name or service not known")
        return str(tmp_path / "snapshot")

    real_from_pretrained = transformers.AutoTokenizer.from_pretrained

    def local_only(source, *args, **kwargs):
        assert kwargs.get("local_files_only") is True and Path(source).is_dir(), source
        return real_from_pretrained(source, *args, **kwargs)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", local_only)
    loaded = load_tokenizer("someone/phi-like")
    assert loaded.get_vocab() == tok.get_vocab() and calls[0][0] == "someone/phi-like"
    assert "tokenizer*" in calls[0][1] and not any("safetensors" in pattern for pattern in calls[0][1])
    with pytest.raises(UserError, match=r"tokenizer 'someone/offline': .*Name or service not known$"):
        load_tokenizer("someone/offline")
    assert len(calls) == 2


@pytest.mark.skipif(not os.environ.get("TINYGPT_PHI2_TOKENIZER"),
                    reason="set TINYGPT_PHI2_TOKENIZER to a microsoft/phi-2 dir or hub id to compare")
def test_matches_real_phi2_tokenizer(tok):
    real = load_tokenizer(os.environ["TINYGPT_PHI2_TOKENIZER"])
    assert len(real) == len(tok)
    assert real.get_vocab() == tok.get_vocab()
    for text in [CODE, "Hello world", "emoji 😀👍🏽", "Question: what is in the image? ###Assistant:"]:
        assert ids(real, text) == ids(tok, text)
