"""`python -m quantize bench`: the table's rows for ours and the plain file, the alternating decode rounds, and its
argument errors. Tiny random GGUF files; engines run in spawned processes exactly as for the full-size numbers."""

from __future__ import annotations

import pytest

pytest.importorskip("gguf")

from quantize.__main__ import main  # noqa: E402
from quantize.bench import format_rounds  # noqa: E402


def test_bench_prints_every_row_and_the_alternating_decode_rounds(random_gguf_pairs, capsys, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_llama_cpp(name, *args, **kwargs):  # same table with or without the optional extra installed
        if name == "llama_cpp":
            raise ImportError("hidden for the test")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_llama_cpp)
    code = main(["bench", "--gguf", str(random_gguf_pairs / "modified"),
                 "--plain-gguf", str(random_gguf_pairs / "plain"),
                 "--prefill-tokens", "8", "--decode-tokens", "4", "--ctx", "128", "--rounds", "2"])
    out, err = capsys.readouterr()
    assert code == 0, err
    header, *rows = out.splitlines()
    assert "llm-q8_0.gguf" in header and header.count("GgmlLLM") + header.count("TorchLLM") == 2
    names = [row[:34].strip() for row in rows]
    for name in ("load (s)", "image encode, int8 (s)", "first token, image+question (s)", "prefill (tok/s)",
                 "decode (ms/token)", "decode (tok/s)", "peak RSS (GB)"):
        assert name in names
    decode = rows[names.index("decode (ms/token)")].split()
    assert all(float(v) > 0 for v in decode[-2:])  # both engines measured
    assert "skipping the stock llama.cpp column" in err
    rounds = out[out.index("decode, alternating rounds"):].splitlines()
    assert [line.split()[:2] for line in rounds[1:3]] == [["round", "1"], ["round", "2"]]
    ratios = [float(line.split()[-1]) for line in rounds[1:3]]
    assert all(0 < r < float("inf") for r in ratios)  # a measured ratio: no bound, a busy machine skews tiny rounds
    assert "median ratio" in rounds[3] and err.count("decode round") == 2


def test_format_rounds_reports_the_median_ratio_of_each_round():
    rounds = [{"ours_ms": 90.0, "other_ms": 100.0, "other": "llama-cpp-python (stock)", "ratio": 0.9},
              {"ours_ms": 130.0, "other_ms": 100.0, "other": "llama-cpp-python (stock)", "ratio": 1.3},
              {"ours_ms": 95.0, "other_ms": 100.0, "other": "llama-cpp-python (stock)", "ratio": 0.95},
              {"error": "child died"}]
    text = format_rounds(rounds)
    assert "median ratio (ours / llama-cpp-python): 0.95 (min 0.90, max 1.30" in text
    assert text.count("round ") == 3


@pytest.mark.parametrize("extra, message", [(["--rounds", "2"], "give --plain-gguf"),
                                            (["--rounds", "-1"], "--rounds must be >= 0"),
                                            (["--decode-tokens", "0"], "must be >= 1")])
def test_bench_argument_errors_name_the_flag(random_gguf_pairs, capsys, extra, message):
    assert main(["bench", "--gguf", str(random_gguf_pairs / "modified"), *extra]) == 2
    assert message in capsys.readouterr().err
