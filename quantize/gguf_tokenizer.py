"""The Phi-2 tokenizer rebuilt from an LLM GGUF's GPT-2 BPE vocabulary and merges (no hub access); a damaged
vocabulary is a UserError naming the file."""
from __future__ import annotations

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from tinygpt.errors import UserError

from .gguf_file import GGUFContents


def load_tokenizer(llm: GGUFContents):
    """A `tokenizers.Tokenizer` rebuilt from the file's GPT-2 BPE vocabulary and merges (no hub access)."""
    model = llm.require("tokenizer.ggml.model")
    if model != "gpt2":
        raise UserError(f"{llm.path}: tokenizer.ggml.model is {model!r}, only 'gpt2' (BPE) is supported")
    tokens = llm.require("tokenizer.ggml.tokens")
    types = llm.metadata.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    merges = llm.require("tokenizer.ggml.merges")
    vocab: dict[str, int] = {}
    added: list[tuple[str, int, bool]] = []
    for i, (tok, typ) in enumerate(zip(tokens, types)):
        if typ in (3, 4):  # CONTROL / USER_DEFINED: raw-text added tokens
            added.append((tok, i, typ == 3))
        elif typ != 5 and tok not in vocab:  # 5 = UNUSED padding rows
            vocab[tok] = i
    merge_pairs = [tuple(m.split(" ", 1)) for m in merges]
    try:  # a damaged token or merge: tokenizers raises a bare Exception ("Token ... out of vocabulary")
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merge_pairs, fuse_unk=False))
    except Exception as exc:
        raise UserError(f"{llm.path}: damaged GGUF file: its tokenizer (tokenizer.ggml.tokens / merges) does not "
                        f"rebuild ({exc})") from None
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    for content, index, special in sorted(added, key=lambda a: a[1]):
        tok.add_tokens([AddedToken(content, special=special, normalized=False)])
        if tok.token_to_id(content) != index:
            raise UserError(f"{llm.path}: added token {content!r} has id {index} but rebuilds as "
                            f"{tok.token_to_id(content)}")
    return tok
