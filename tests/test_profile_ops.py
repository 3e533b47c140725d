"""`python -m quantize profile`: the per-op profile of one decode step (quantize.profile_ops). Run on the tiny random
GGUF pairs: every layer's matmuls are found and named by their weight, the launch cost is subtracted, a dying child is
reported with its signal and a non-zero exit, and the struct used to read stock llama.cpp's nodes has ggml's layout."""
from __future__ import annotations

import os
import re
import resource
import signal

import pytest

pytest.importorskip("gguf")

from quantize import profile_ops  # noqa: E402
from quantize.__main__ import main  # noqa: E402
from quantize.gguf_file import find_llm_file, llm_hyperparams, open_gguf  # noqa: E402
from quantize import gguf_names as names  # noqa: E402


def segfaulting_child(args: dict, queue) -> None:
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    os.kill(os.getpid(), signal.SIGSEGV)


def test_tensor_head_has_ggml_tensor_layout():
    ggml = pytest.importorskip("ggml")
    for field in ("type", "buffer", "ne", "nb", "op", "op_params", "flags", "src", "view_src", "view_offs", "data",
                  "name"):
        assert getattr(profile_ops.TensorHead, field).offset == getattr(ggml.ggml_tensor, field).offset, field
        assert getattr(profile_ops.TensorHead, field).size == getattr(ggml.ggml_tensor, field).size, field


def test_matmul_flops_count_two_per_multiply_add():
    assert profile_ops.matmul_flops(2560, (10240, 90, 1, 1)) == 2 * 2560 * 10240 * 90


def test_groups_name_matmuls_by_their_weight():
    assert profile_ops.group_of("MUL_MAT", "blk.17.ffn_up.weight") == "matmul ffn_up"
    assert profile_ops.group_of("MUL_MAT", "output.weight") == "matmul output"
    assert profile_ops.group_of("MUL_MAT", None) == "MUL_MAT"  # attention products of two activations
    assert profile_ops.group_of("GELU", None) == "GELU"  # stock's
    assert profile_ops.group_of("SILU", None, "gelu") == "GELU"  # one of quantize.ggml_gelu's five
    assert profile_ops.group_of("MUL", None, "") == "MUL"
    ggml_gelu = pytest.importorskip("quantize.ggml_gelu")
    assert ggml_gelu.NAME.decode() == profile_ops.GELU_NAME


def test_summary_subtracts_the_launch_cost_and_averages_over_repeats():
    nodes = []
    for _ in range(2):  # two repeats of a step: 2 no-op nodes, one matmul, one add
        nodes += [("VIEW", 2e-6), ("RESHAPE", 2e-6), ("matmul ffn_up", 1.002e-3), ("ADD", 5e-6)]
    nodes = [(g, s, 10**6 if g.startswith("matmul") else 0, 8 * 10**6 if g.startswith("matmul") else 0)
             for g, s in nodes]
    out = profile_ops.summarize(nodes, [0.004, 0.002, 0.003], repeats=2)
    assert out["launch_us"] == pytest.approx(2.0)
    assert set(out["groups"]) == {"matmul ffn_up", "ADD"}
    assert out["groups"]["matmul ffn_up"] == {"nodes": 1, "ms": pytest.approx(1.0), "bytes": 10**6,
                                              "flops": 8 * 10**6}
    assert out["groups"]["ADD"]["ms"] == pytest.approx(0.003)
    assert out["sum_ms"] == pytest.approx(1.003)
    assert out["step_ms"] == pytest.approx(3.0)  # median of the whole steps


def _rows(text: str, group: str) -> list[list[str]]:
    """The cells of the group's row: one [nodes, ms, share, (GB/s)] list per engine."""
    line = next(ln for ln in text.splitlines() if ln.startswith(group + " "))
    cells = line[len(group):].split()
    return [cells[i:i + 4] for i in range(0, len(cells), 4)]


@pytest.mark.timeout(600)
def test_profile_of_ours_on_the_modified_and_the_plain_file(random_gguf_pairs, capsys, monkeypatch):
    """One thread: each tiny matmul node takes ~10 us against a ~4 us launch cost, and with two threads on a machine
    busy with other work (a second test worker) every barrier of the two can wait out a time slice, the launch cost
    measured on the no-op nodes then exceeds a node's time and the node's row reads 0.00 ms with no read rate."""
    monkeypatch.setattr("quantize.bench.stock_available", lambda: False)
    code = main(["profile", "--gguf", str(random_gguf_pairs / "modified"), "--plain-gguf",
                 str(random_gguf_pairs / "plain"), "--positions", "8", "--repeats", "2", "--bandwidth-gb", "0.05",
                 "--threads", "1"])
    out, err = capsys.readouterr()
    assert code == 0, err
    # the bandwidth read in each child before and after its steps; a pair that moved (a 50 MB probe on a busy
    # machine) says so and gets no roofline
    read = re.search(r"^read GB/s before / after\s+([\d.]+) / ([\d.]+)( moved)?\s+([\d.]+) / ([\d.]+)( moved)?$",
                     out, re.M)
    assert read and all(float(read.group(i)) > 0 for i in (1, 2, 4, 5))
    if not read.group(3) and not read.group(6):
        assert all(float(v) > 0 for v in re.search(r"^roofline, weights \(ms\)\s+([\d.]+)\s+([\d.]+)$", out,
                                                   re.M).groups())
        assert re.search(r"^step, share of roofline\s+\d+%\s+\d+%$", out, re.M)
    else:
        assert "read bandwidth moved during" in err
    layers = llm_hyperparams(open_gguf(find_llm_file(random_gguf_pairs / "modified"), names.ARCH_LLM)).n_layers
    assert "ours, llm-q8_0.gguf" in out and "skipping stock llama.cpp" in err
    for role in ("attn_qkv", "attn_output", "ffn_up", "ffn_down"):
        cells = _rows(out, "matmul " + role)
        assert [c[0] for c in cells] == [str(layers)] * 2, (role, cells)
        assert all(float(c[1]) > 0 and float(c[3]) > 0 for c in cells)  # time and a read rate
    assert [c[0] for c in _rows(out, "matmul output")] == ["1", "1"]
    assert [c[0] for c in _rows(out, "RMS_NORM")] == [str(layers), "-"]  # the modified file's post-attention norm
    whole = re.search(r"^whole step \(ms\)\s+([\d.]+)\s+([\d.]+)$", out, re.M)
    summed = re.search(r"^sum of the nodes \(ms\)\s+([\d.]+)\s+([\d.]+)$", out, re.M)
    assert whole and summed and all(float(v) > 0 for v in whole.groups() + summed.groups())


@pytest.mark.timeout(600)
def test_profile_of_a_prefill_chunk(random_gguf_pairs, capsys):
    code = main(["profile", "--gguf", str(random_gguf_pairs / "modified"), "--prefill", "6", "--positions", "0",
                 "--repeats", "2", "--threads", "1"])  # one thread: see the test above
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "per-op profile of a prefill of 6 tokens after 0 cached positions" in out
    layers = llm_hyperparams(open_gguf(find_llm_file(random_gguf_pairs / "modified"), names.ARCH_LLM)).n_layers
    for role in ("attn_qkv", "attn_output", "ffn_up", "ffn_down"):
        assert _rows(out, "matmul " + role)[0][0] == str(layers)
    whole = float(re.search(r"^whole step \(ms\)\s+([\d.]+)$", out, re.M).group(1))
    tok_s = float(re.search(r"^tokens/s, whole step\s+([\d.]+)$", out, re.M).group(1))
    assert 6e3 / (whole + 0.05) - 0.05 <= tok_s <= 6e3 / (whole - 0.05) + 0.05  # both printed to 0.1
    assert "roofline" not in out  # a prefill is bound by compute: no bandwidth probe
    hp = llm_hyperparams(open_gguf(find_llm_file(random_gguf_pairs / "modified"), names.ARCH_LLM))
    assert "GFLOP/s" in out and "GB/s" not in out
    ffn_up = _rows(out, "matmul ffn_up")[0]  # nodes, ms, share, GFLOP/s = 2 * ffn * hidden * 6 * layers / time
    flops, ms = 2 * hp.ffn_size * hp.hidden_size * 6 * hp.n_layers, float(ffn_up[1])  # ms printed to 0.01
    assert flops / (ms + 0.005) / 1e6 - 0.05 <= float(ffn_up[3]) <= flops / (ms - 0.005) / 1e6 + 0.05


@pytest.mark.timeout(300)
def test_a_child_that_dies_is_reported_and_the_profile_exits_non_zero(random_gguf_pairs, capsys, monkeypatch):
    monkeypatch.setitem(profile_ops.CHILDREN, "ours", segfaulting_child)
    code = main(["profile", "--gguf", str(random_gguf_pairs / "modified"), "--child-timeout", "120",
                 "--bandwidth-gb", "0"])
    out, err = capsys.readouterr()
    assert code == 1
    assert "error: ours: child died with signal SIGSEGV (exit code -11) before reporting a result" in err
    assert "whole step" not in out


def test_argument_errors_name_the_flag(random_gguf_pairs, capsys):
    assert main(["profile", "--gguf", str(random_gguf_pairs / "modified"), "--positions", "-1"]) == 2
    assert "--positions" in capsys.readouterr().err
    assert main(["profile", "--gguf", str(random_gguf_pairs / "modified"), "--repeats", "0"]) == 2
    assert "--repeats" in capsys.readouterr().err


@pytest.mark.timeout(600)
def test_stock_llama_cpp_profile_names_its_matmuls_the_same_way(random_gguf_pairs, capsys):
    pytest.importorskip("llama_cpp")
    code = main(["profile", "--gguf", str(random_gguf_pairs / "plain"), "--plain-gguf",
                 str(random_gguf_pairs / "plain"), "--positions", "8", "--repeats", "2", "--bandwidth-gb", "0"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "stock, llm-q8_0.gguf" in out and "read GB/s" not in out
    layers = llm_hyperparams(open_gguf(find_llm_file(random_gguf_pairs / "plain"), names.ARCH_LLM)).n_layers
    for role in ("attn_qkv", "attn_output", "ffn_up", "ffn_down"):
        assert [c[0] for c in _rows(out, "matmul " + role)] == [str(layers)] * 3, role
    plain = str(random_gguf_pairs / "plain")
    code = main(["profile", "--gguf", plain, "--plain-gguf", plain, "--prefill", "6", "--positions", "0",
                 "--repeats", "1"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert [c[0] for c in _rows(out, "matmul ffn_up")] == [str(layers)] * 3
