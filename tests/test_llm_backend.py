"""quantize.llm_backend.LLMBackend: the three LLM backends implement it, the chat session uses nothing else, and the
ggml backend's two switches reach it as arguments (constructor, open_session / load_language_model, CLI flags).

Backends are built on the hand-written tiny GGUF files (conftest ``llm_files``); ggml-python and llama-cpp-python
may be absent, and then their cases skip.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import inspect

import numpy as np
import pytest

pytest.importorskip("gguf")

from quantize import bench, chat, session  # noqa: E402
from quantize import gguf_names as names  # noqa: E402
from quantize.gguf_file import open_gguf  # noqa: E402
from quantize.llm_backend import LLMBackend, ModelShape  # noqa: E402
from quantize.engine_choice import load_language_model  # noqa: E402
from quantize.torch_llm import TorchLLM  # noqa: E402

HAS_GGML = importlib.util.find_spec("ggml") is not None
HAS_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None


def _members(protocol) -> set[str]:
    return set(getattr(protocol, "__annotations__", {})) | {n for n in vars(protocol) if not n.startswith("_")}


def _check_backend(llm) -> None:
    assert isinstance(llm, LLMBackend) and isinstance(llm.hp, ModelShape)
    assert LLMBackend in type(llm).__mro__  # declared, not only duck-typed
    logits = llm.eval_tokens([1, 2, 3])
    assert logits.shape == (llm.hp.vocab_size,) and llm.n_past == 3
    rows = np.zeros((2, llm.hp.hidden_size), np.float32)
    assert llm.eval_embeddings(rows, all_logits=True).shape == (2, llm.hp.vocab_size) and llm.n_past == 5
    llm.truncate(1)
    assert llm.n_past == 1
    llm.reset()
    assert llm.n_past == 0
    llm.close()
    llm.close()


def test_torch_backend_is_an_llm_backend(llm_files):
    _check_backend(TorchLLM(open_gguf(llm_files["f32"], names.ARCH_LLM), dtype="fp32"))


@pytest.mark.skipif(not HAS_GGML, reason="ggml-python not installed")
def test_ggml_backend_is_an_llm_backend(llm_files):
    from quantize.ggml_llm import GgmlLLM

    _check_backend(GgmlLLM(open_gguf(llm_files["f32"], names.ARCH_LLM)))


@pytest.mark.skipif(not HAS_LLAMA_CPP, reason="llama-cpp-python (optional extra) not installed")
def test_llama_cpp_backend_is_an_llm_backend(random_gguf_pairs):
    from quantize.gguf_file import find_llm_file
    from quantize.llama_cpp_backend import LlamaCppLLM

    _check_backend(LlamaCppLLM(find_llm_file(random_gguf_pairs / "plain"), n_ctx=64))


def test_session_uses_only_the_protocol_members():
    """Every `self.llm.X` in quantize/session.py is an LLMBackend member, every `self.llm.hp.Y` a ModelShape one."""
    tree = ast.parse(inspect.getsource(session))
    used, used_hp = set(), set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute):
            continue
        base = node.value
        if isinstance(base, ast.Attribute) and base.attr == "llm" and isinstance(base.value, ast.Name) \
                and base.value.id == "self":
            used.add(node.attr)
        if isinstance(base, ast.Attribute) and base.attr == "hp" and isinstance(base.value, ast.Attribute) \
                and base.value.attr == "llm":
            used_hp.add(node.attr)
    assert {"eval_tokens", "eval_embeddings", "truncate", "n_past", "n_ctx", "hp"} <= used  # the scan sees them
    assert used <= _members(LLMBackend), used - _members(LLMBackend)
    assert used_hp <= _members(ModelShape), used_hp - _members(ModelShape)
    assert session.ChatSession.__annotations__["llm"] == "LLMBackend"


@pytest.mark.skipif(not HAS_GGML, reason="ggml-python not installed")
def test_ggml_switches_are_arguments_of_load_language_model(llm_files):
    f = open_gguf(llm_files["q4_k"], names.ARCH_LLM)
    on = load_language_model(f, backend="ggml", quiet=True)
    off = load_language_model(f, backend="ggml", quiet=True, decode_graph=False, repack=False)
    assert on.decode_graph and on.repacked > 0
    assert not off.decode_graph and off.repacked == 0
    on.close()
    off.close()


@pytest.mark.parametrize("module", [chat, bench])
def test_chat_and_bench_flags_for_the_ggml_switches(module):
    p = argparse.ArgumentParser()
    module.add_arguments(p)
    default = p.parse_args(["--gguf", "d"])
    assert default.decode_graph is True and default.repack is True
    off = p.parse_args(["--gguf", "d", "--no-decode-graph", "--no-repack"])
    assert off.decode_graph is False and off.repack is False
    text = " ".join(p.format_help().split())
    assert "--no-decode-graph ggml backend:" in text and "--no-repack ggml backend:" in text
