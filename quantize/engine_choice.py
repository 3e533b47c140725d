"""Which engine runs the LLM file (`load_language_model`, `BACKENDS`) and which exported file it runs
(`chosen_qtype`): the choices made before a session is built (quantize.session), and before the bench and the
profile start their children, so that every row of theirs runs the file a session would."""
from __future__ import annotations

import os
import sys
from pathlib import Path

from tinygpt.errors import UserError

from . import gguf_names as names
from .gguf_file import GGUFContents, llm_hyperparams
from .llama_cpp_backend import LlamaCppLLM
from .llm_backend import LLMBackend

BACKENDS = ("auto", "ggml", "torch", "llama-cpp")


def load_language_model(llm: GGUFContents, backend: str = "auto", n_ctx: int | None = None, n_threads: int = 2,
                        quiet: bool = False, decode_graph: bool = True, repack: bool = True,
                        kv_type: str | None = None) -> LLMBackend:
    """GgmlLLM when ggml-python imports (or backend='ggml'), else the PyTorch fallback with a one-line notice.

    backend='llama-cpp' runs a stock plain-phi2 file through llama-cpp-python (quantize.llama_cpp_backend).
    decode_graph, repack and kv_type (the KV cache's precision, f32 or f16; None: GgmlLLM's default) are GgmlLLM's
    switches (see there); the other backends have no such choice."""
    if backend not in BACKENDS:
        raise UserError(f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "llama-cpp":
        if llm_hyperparams(llm).attention != "causal":
            raise UserError(f"{llm.path}: stock llama.cpp has no multi-modal causal attention (attention mmca); "
                            "use --backend ggml or torch")
        if llm_hyperparams(llm).moe_layers:
            raise UserError(f"{llm.path}: stock llama.cpp's phi2 has no MoE layers (tinygptv.moe_layers); use "
                            "--backend ggml or torch")
        n_ctx = llm_hyperparams(llm).context_length if n_ctx is None else n_ctx
        return LlamaCppLLM(llm.path, n_ctx=n_ctx, n_threads=n_threads)
    if backend in ("auto", "ggml"):
        try:  # lazy: ggml-python's shared library may be missing or fail to load, and then torch_llm serves
            from .ggml_llm import GgmlLLM
        except Exception as exc:  # ImportError, or OSError when the shared library cannot load
            if backend == "ggml":
                raise UserError(f"--backend ggml: ggml-python cannot be imported "
                                f"({type(exc).__name__}: {exc})") from None
            if not quiet:
                print(f"notice: ggml-python unavailable ({type(exc).__name__}); using the PyTorch fallback (slower)",
                      file=sys.stderr)
        else:
            kv = {} if kv_type is None else {"kv_type": kv_type}
            return GgmlLLM(llm, n_ctx=n_ctx, n_threads=n_threads, decode_graph=decode_graph, repack=repack, **kv)
    from .torch_llm import TorchLLM  # lazy: torch (seconds) only when it is the engine

    return TorchLLM(llm, n_ctx=n_ctx, n_threads=n_threads, progress=not quiet)


def chosen_qtype(gguf_dir: str | os.PathLike, qtype: str | None, backend: str, quiet: bool) -> str | None:
    """The LLM type a session loads from `gguf_dir`: `qtype` when given; else, for the ggml backend (auto or ggml),
    the one fastest on this CPU (quantize.ggml_amx.preferred_qtype: Q4_0 where ggml's AMX buffer works); None:
    find_llm_file's order (Q4_K first)."""
    if qtype is not None or backend not in ("auto", "ggml"):
        return qtype
    d = Path(gguf_dir)
    if not d.is_dir():
        return None
    available = [q for q in names.QTYPES if (d / names.llm_file_name(q)).is_file()]
    try:  # lazy, like the ggml backend itself: without ggml-python there is nothing to choose
        from .ggml_amx import preferred_qtype
    except Exception:
        return None
    return preferred_qtype(available, quiet)
