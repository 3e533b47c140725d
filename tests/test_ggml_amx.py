"""ggml's AMX buffer for the LLM's Q4_0 matmul weights (quantize.ggml_amx, quantize.ggml_weights).

* The probe: a child that dies (a miscompiled tile path faults with SIGSEGV) or answers wrongly says so and the
  runtime falls back to the repacked layout; the answer is cached per ggml library; TINYGPT_GGML_AMX overrides it.
* Where this machine has AMX and the build's tile kernels work: prefill (AMX tiles) and cached decode (AVX-512 VNNI
  GEMV) with the weights in the AMX buffer give the logits of the repacked layout. Both layouts quantize activations
  to 8 bits per 32-value block and sum the same integer products, so they differ by float summation order only.
"""

from __future__ import annotations

import numpy as np
import pytest

ggml = pytest.importorskip("ggml")

from quantize import ggml_amx  # noqa: E402


def test_the_probe_reports_a_child_that_dies_or_answers_wrongly(monkeypatch):
    monkeypatch.setattr(ggml_amx, "_PROBE", "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)")
    works, detail = ggml_amx.probe_amx_tiles(timeout=60)
    assert not works and "signal 11" in detail
    monkeypatch.setattr(ggml_amx, "_PROBE", "print('relative difference 0.5'); raise SystemExit(3)")
    works, detail = ggml_amx.probe_amx_tiles(timeout=60)
    assert not works and "exited 3" in detail and "0.5" in detail
    monkeypatch.setattr(ggml_amx, "_PROBE", "import time; time.sleep(30)")
    works, detail = ggml_amx.probe_amx_tiles(timeout=1)
    assert not works and "did not finish" in detail


def test_the_answer_is_cached_per_library_and_the_environment_overrides_it(monkeypatch, tmp_path, capsys):
    calls = []

    def failing_probe(timeout=120.0):
        calls.append(1)
        return False, "the probe died with signal 11 (a miscompiled AMX tile path)"

    monkeypatch.setenv("TINYGPT_CACHE", str(tmp_path))
    monkeypatch.delenv(ggml_amx.ENV, raising=False)
    monkeypatch.setattr(ggml_amx, "has_amx_buffer", lambda: True)
    monkeypatch.setattr(ggml_amx, "probe_amx_tiles", failing_probe)
    assert ggml_amx.amx_tiles_work() is False
    assert "not used: the probe died with signal 11" in capsys.readouterr().err
    assert ggml_amx.amx_tiles_work() is False and len(calls) == 1  # the second answer comes from the cache
    assert (tmp_path / "ggml-amx-probe.json").exists()
    monkeypatch.setenv(ggml_amx.ENV, "1")
    assert ggml_amx.amx_tiles_work() is True and len(calls) == 1
    monkeypatch.setenv(ggml_amx.ENV, "0")
    assert ggml_amx.amx_tiles_work() is False
    monkeypatch.setattr(ggml_amx, "has_amx_buffer", lambda: False)
    monkeypatch.setenv(ggml_amx.ENV, "1")
    assert ggml_amx.amx_tiles_work() is False  # no AMX buffer in this build: nothing to force



@pytest.mark.parametrize("value, where", [("~/probe-cache", "home/probe-cache"), ("", "home/.cache/tinygpt")])
def test_the_probe_is_cached_in_the_tinygpt_cache(tmp_path, monkeypatch, value, where):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # "~" was kept as a folder name, "" wrote to the cwd
    monkeypatch.setenv("TINYGPT_CACHE", value)
    assert ggml_amx._cache_file() == tmp_path / where / "ggml-amx-probe.json"


@pytest.fixture(scope="module")
def tiny_q4_0(tmp_path_factory):
    from quantize.gguf_file import find_llm_file, open_gguf
    from quantize.random_model import write_random_model

    out = tmp_path_factory.mktemp("q4_0")
    write_random_model(out, size="tiny", qtype="q4_0", seed=5, progress=False)
    return open_gguf(find_llm_file(out, "q4_0"), "phi2")


def test_a_build_whose_probe_fails_loads_the_repacked_layout(monkeypatch, tiny_q4_0):
    from quantize import ggml_llm

    monkeypatch.setattr(ggml_llm, "amx_tiles_work", lambda: False)
    llm = ggml_llm.GgmlLLM(tiny_q4_0, n_ctx=32)
    assert llm.in_amx == 0 and llm.repacked > 0
    llm.close()


@pytest.mark.skipif(not ggml_amx.amx_tiles_work(), reason="no AMX buffer here, or this build's AMX tiles fault")
def test_amx_buffer_prefill_and_decode_match_the_repacked_layout(tiny_q4_0):
    from quantize.ggml_llm import GgmlLLM

    ids = list(range(300, 340))
    runs = {}
    for amx in (True, False):
        llm = GgmlLLM(tiny_q4_0, n_ctx=64, amx=amx)
        assert (llm.in_amx > 0) == amx
        prefill = llm.eval_tokens(ids[:32], all_logits=True)  # several tokens: the AMX tile kernels
        steps = np.stack([llm.eval_tokens([i]) for i in ids[32:]])  # one token: the VNNI GEMV
        runs[amx] = (prefill, steps)
        llm.close()
    for got, want in zip(runs[True], runs[False]):
        assert np.abs(got - want).max() < 1e-3 * np.abs(want).max()
    assert (runs[True][1].argmax(-1) == runs[False][1].argmax(-1)).all()


def test_with_several_exports_an_amx_cpu_loads_q4_0_and_is_told_when_there_is_none(monkeypatch, tmp_path, capsys):
    """No --qtype: where the AMX buffer works the session loads llm-q4_0.gguf when the directory has it (else Q4_K, with
    a notice that a Q4_0 export would be faster); elsewhere, or with --qtype, or on another backend, the usual order."""
    from quantize.random_model import write_random_model
    from quantize.session import open_session

    out = tmp_path / "pair"
    write_random_model(out, size="tiny", qtype="q4_k", seed=5, progress=False)

    def loaded(**kw):
        session = open_session(out, with_vision=False, quiet=False, n_ctx=32, **kw)
        return session.llm.file.path.name

    monkeypatch.setattr(ggml_amx, "has_amx_buffer", lambda: True)
    monkeypatch.setattr(ggml_amx, "amx_tiles_work", lambda: True)
    assert loaded() == "llm-q4_k.gguf"
    assert capsys.readouterr().err.count("export with --qtype q4_0") == 1
    write_random_model(out, size="tiny", qtype="q4_0", seed=5, progress=False)
    assert loaded() == "llm-q4_0.gguf"
    assert loaded(qtype="q4_k") == "llm-q4_k.gguf" and loaded(backend="torch") == "llm-q4_k.gguf"
    monkeypatch.setattr(ggml_amx, "amx_tiles_work", lambda: False)
    assert loaded() == "llm-q4_k.gguf"
    assert "export with" not in capsys.readouterr().err
