"""Optional: run a stock plain-phi2 LLM GGUF through llama-cpp-python, with the same interface as GgmlLLM.

Only for models trained WITHOUT the extra norms (export writes a stock `phi2` file then); stock llama.cpp refuses
the modified file ("wrong number of tensors"), which is reported as a UserError. Image vectors go in through a
llama_batch that carries embeddings (`llama_batch_init(n, n_embd, 1)`), tokens through one that carries ids.
llama-cpp-python is imported lazily here and is never required by anything else.
"""
from __future__ import annotations

import ctypes
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Sequence

import numpy as np

from tinygpt.errors import UserError

from .llm_backend import LLMBackend


def _import_llama_cpp():
    try:
        import llama_cpp  # optional extra (a source build): imported only when this backend is chosen
    except Exception as exc:
        raise UserError(f"llama-cpp-python is not importable ({type(exc).__name__}: {exc}); "
                        "pip install llama-cpp-python (a source build), or use --backend ggml") from None
    _quiet(llama_cpp)
    return llama_cpp


_LOG_CALLBACK = None  # kept alive for as long as llama.cpp may call it
_GGML_F32, _GGML_F16, _GGML_BF16 = 0, 1, 30  # ggml_type values of the KV cache types whose size the bench knows


def _quiet(llama_cpp) -> None:
    """Drop llama.cpp's own loading/scheduling log (a wall of lines per model); errors still raise here."""
    global _LOG_CALLBACK
    if _LOG_CALLBACK is None:
        _LOG_CALLBACK = llama_cpp.llama_log_callback(lambda level, text, user_data: None)
        llama_cpp.llama_log_set(_LOG_CALLBACK, None)


def cpu_has_amx(cpuinfo: str = "/proc/cpuinfo") -> bool:
    try:
        return any(line.startswith("flags") and " amx_int8" in line for line in Path(cpuinfo).read_text().splitlines())
    except OSError:
        return False


class LlamaCppLLM(LLMBackend):
    """Stateful decoder over llama.cpp's own KV cache (sequence 0).

    extra_bufts: let llama.cpp put weights into its extra CPU buffers (AMX, repacked). None (default) = yes, except on
    CPUs with AMX: there llama.cpp picks its AMX buffer, whose multi-token (tile) kernels fault with SIGSEGV in the
    builds seen so far (docs/gguf-runtime.md, "AMX"), so a chat would die on its first prompt. The bench passes True
    to measure stock llama.cpp as built.

    cb_eval: llama.cpp's scheduler callback, (tensor pointer, ask, user data) -> bool, for quantize.profile_ops."""

    def __init__(self, path: str | os.PathLike, n_ctx: int = 2048, n_threads: int = 2, n_batch: int = 256,
                 extra_bufts: bool | None = None, cb_eval=None):
        self.lib = lib = _import_llama_cpp()
        self.path = Path(path)
        lib.llama_backend_init()
        mparams = lib.llama_model_default_params()
        if extra_bufts is None:
            extra_bufts = not cpu_has_amx()
        if hasattr(mparams, "use_extra_bufts"):
            mparams.use_extra_bufts = bool(extra_bufts)
        self.model = lib.llama_model_load_from_file(str(self.path).encode(), mparams)
        if not self.model:
            raise UserError(f"{self.path}: stock llama.cpp cannot load this file (a model with the extra q/k and "
                            "post-attention norms needs --backend ggml)")
        cparams = lib.llama_context_default_params()
        cparams.n_ctx = int(n_ctx)
        cparams.n_batch = cparams.n_ubatch = int(n_batch)
        cparams.n_threads = cparams.n_threads_batch = int(n_threads)
        self._cb_eval = None
        if cb_eval is not None:  # kept alive on self for as long as the context may call it
            self._cb_eval = cparams.cb_eval = lib.ggml_backend_sched_eval_callback(cb_eval)
        self.ctx = lib.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            raise UserError(f"{self.path}: llama.cpp could not create a context of {n_ctx} positions")
        vocab = lib.llama_model_get_vocab(self.model)
        self.hp = SimpleNamespace(hidden_size=int(lib.llama_model_n_embd(self.model)),
                                  vocab_size=int(lib.llama_vocab_n_tokens(vocab)))
        self.n_ctx, self.n_batch, self.n_past = int(n_ctx), int(n_batch), 0
        # K and V of one position in every layer (the bench's roofline with the cache; phi2 files: as many K/V heads as
        # query heads); None for a cache type not listed
        sizes = {_GGML_F32: 4, _GGML_F16: 2, _GGML_BF16: 2}
        if cparams.type_k in sizes and cparams.type_v in sizes:
            self.kv_bytes_per_position = (int(lib.llama_model_n_layer(self.model)) * self.hp.hidden_size
                                          * (sizes[cparams.type_k] + sizes[cparams.type_v]))
        else:
            self.kv_bytes_per_position = None

    # ------------------------------------------------------------------------------------------ state
    def reset(self) -> None:
        self.truncate(0)

    def truncate(self, n_keep: int) -> None:
        if not 0 <= n_keep <= self.n_past:
            raise ValueError(f"truncate({n_keep}) outside 0..{self.n_past}")
        self.lib.llama_memory_seq_rm(self.lib.llama_get_memory(self.ctx), 0, n_keep, -1)
        self.n_past = n_keep

    def close(self) -> None:
        if getattr(self, "ctx", None):
            self.lib.llama_free(self.ctx)
            self.ctx = None
        if getattr(self, "model", None):
            self.lib.llama_model_free(self.model)
            self.model = None

    # ------------------------------------------------------------------------------------------ eval
    def eval_tokens(self, ids: Sequence[int], all_logits: bool = False) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int32).reshape(-1)
        return self._eval(len(ids), lambda b, s, n: [b.token.__setitem__(i, int(ids[s + i])) for i in range(n)],
                          0, all_logits)

    def eval_embeddings(self, rows: np.ndarray, all_logits: bool = False) -> np.ndarray:
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        if rows.ndim != 2 or rows.shape[1] != self.hp.hidden_size:
            raise UserError(f"embeddings must be [n, {self.hp.hidden_size}], got {list(rows.shape)}")

        def fill(batch, start, n):
            ctypes.memmove(batch.embd, rows[start:start + n].ctypes.data, n * rows.shape[1] * 4)

        return self._eval(rows.shape[0], fill, self.hp.hidden_size, all_logits)

    def _eval(self, n: int, fill, embd: int, all_logits: bool) -> np.ndarray:
        lib = self.lib
        if self.n_past + n > self.n_ctx:
            raise UserError(f"context length exceeded: {self.n_past} cached + {n} new > n_ctx {self.n_ctx}")
        outs = []
        for start in range(0, n, self.n_batch):
            m = min(self.n_batch, n - start)
            batch = lib.llama_batch_init(m, embd, 1)
            try:
                batch.n_tokens = m
                fill(batch, start, m)
                last = start + m == n
                for i in range(m):
                    batch.pos[i] = self.n_past + i
                    batch.n_seq_id[i] = 1
                    batch.seq_id[i][0] = 0
                    batch.logits[i] = 1 if all_logits or (last and i == m - 1) else 0
                rc = lib.llama_decode(self.ctx, batch)
                if rc != 0:
                    raise RuntimeError(f"llama_decode failed with status {rc}")
                self.n_past += m
                rows = range(m) if all_logits else ([m - 1] if last else [])
                for i in rows:
                    ptr = lib.llama_get_logits_ith(self.ctx, i)
                    outs.append(np.ctypeslib.as_array(ptr, shape=(self.hp.vocab_size,)).copy())
            finally:
                lib.llama_batch_free(batch)
        return np.stack(outs) if all_logits else outs[-1]
