"""The bench's children never leave it waiting: a child that dies (here: the stock engine's child killing itself with
SIGSEGV, as llama-cpp-python's batched prefill does on some AVX-512/AMX machines) is reported with its signal and the
bench exits non-zero; a child that hangs is killed after --child-timeout. Engines are swapped through
quantize.bench_child.ENGINES; the replacement targets below live in this module, which the child imports. Children are
forked from one forkserver that imported the bench's modules once (quantize.bench_child.child_context)."""

from __future__ import annotations

import os
import resource
import signal
import threading
import time

import pytest

pytest.importorskip("gguf")

from quantize import bench, bench_child  # noqa: E402
from quantize.__main__ import main  # noqa: E402


def segfaulting_engine(args: dict, queue) -> None:
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # no core file
    os.kill(os.getpid(), signal.SIGSEGV)


def hanging_engine(args: dict, queue) -> None:
    time.sleep(3600)


def exiting_engine(args: dict, queue) -> None:
    os._exit(3)


def reporting_engine(args: dict, queue) -> None:
    queue.put({"value": args["value"]})


def _bench_in_thread(argv: list[str], timeout_s: float) -> int:
    """main(argv) in a daemon thread: its status, or a test failure if it has not returned within timeout_s."""
    result: dict = {}
    thread = threading.Thread(target=lambda: result.setdefault("code", main(argv)), daemon=True)
    thread.start()
    thread.join(timeout_s)
    assert not thread.is_alive(), f"bench still running after {timeout_s} s"
    return result["code"]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_stock_child_that_segfaults_is_reported_and_the_bench_exits_non_zero(random_gguf_pairs, capsys, monkeypatch):
    monkeypatch.setattr(bench, "stock_available", lambda: True)
    monkeypatch.setitem(bench_child.ENGINES, "stock", segfaulting_engine)
    t0 = time.monotonic()
    code = _bench_in_thread(["bench", "--gguf", str(random_gguf_pairs / "modified"), "--plain-gguf",
                             str(random_gguf_pairs / "plain"), "--bandwidth-gb", "0", "--prefill-tokens", "4",
                             "--decode-tokens", "2", "--ctx", "64", "--rounds", "1", "--child-timeout", "120"], 240)
    out, err = capsys.readouterr()
    assert code == 1
    assert "error: stock llama.cpp: child died with signal SIGSEGV (exit code -11) before reporting a result" in err
    assert "error: decode round 1: stock, plain llm-q8_0.gguf: child died with signal SIGSEGV" in err
    assert err.count("SIGSEGV") == 2  # each failure once: the first column, then the round
    assert "decode (ms/token)" in out  # what finished is still printed: our two columns
    assert time.monotonic() - t0 < 240


def test_run_child_kills_a_child_that_hangs_past_the_timeout():
    t0 = time.monotonic()
    result = bench_child.run_child(hanging_engine, {}, timeout_s=3, label="stuck engine")
    assert result == {"error": "stuck engine: no result after 3 s (--child-timeout); child killed"}
    assert time.monotonic() - t0 < 30


def parent_engine(args: dict, queue) -> None:
    queue.put({"ppid": os.getppid()})


def test_children_fork_from_one_forkserver_that_has_the_bench_imported():
    first, second = (bench_child.run_child(parent_engine, {}, 60, "x") for _ in range(2))
    assert first["ppid"] == second["ppid"] != os.getpid()  # not this process: the forkserver, reused


def test_run_child_reports_an_exit_code_and_passes_a_result_through():
    assert bench_child.run_child(exiting_engine, {}, 60, "x") == {
        "error": "x: child died with exit code 3 before reporting a result"}
    assert bench_child.run_child(reporting_engine, {"value": 7}, 60, "x") == {"value": 7}


def test_describe_exit_names_the_signal():
    assert bench_child.describe_exit(-signal.SIGSEGV) == "signal SIGSEGV (exit code -11)"
    assert bench_child.describe_exit(-signal.SIGKILL) == "signal SIGKILL (exit code -9)"
    assert bench_child.describe_exit(1) == "exit code 1"


def test_cpu_flags_and_amx_come_from_cpuinfo(tmp_path):
    from quantize.bench_roofline import cpu_flags
    from quantize.llama_cpp_backend import cpu_has_amx

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: Test CPU\nflags\t\t: fpu sse2 avx2 fma avx512f avx512_vnni amx_tile "
                    "amx_int8\n\nprocessor\t: 1\nmodel name\t: Test CPU\nflags\t\t: fpu\n")
    assert cpu_flags(str(info)) == ("Test CPU", ["avx2", "fma", "avx512f", "avx512_vnni", "amx_tile", "amx_int8"])
    assert cpu_has_amx(str(info))
    info.write_text("model name\t: Old CPU\nflags\t\t: fpu sse2 avx2\n")
    assert cpu_flags(str(info)) == ("Old CPU", ["avx2"]) and not cpu_has_amx(str(info))
    assert cpu_flags(str(tmp_path / "missing")) == ("unknown", []) and not cpu_has_amx(str(tmp_path / "missing"))


def qtype_reporting_engine(args: dict, queue) -> None:
    queue.put({"error": f"asked for qtype {args['qtype']}"})


@pytest.mark.timeout(300)
def test_every_row_of_ours_runs_the_file_a_session_would_load(tmp_path, capsys, monkeypatch):
    # on a CPU whose AMX buffer works a session loads Q4_0 when the directory has it; the bench's first column chose
    # it through open_session while its alternating rounds timed Q4_K, so the rounds' figures were another file's
    from quantize import ggml_amx
    from quantize.random_model import write_random_model

    for qtype in ("q4_k", "q4_0"):
        write_random_model(tmp_path / "pair", size="tiny", qtype=qtype, seed=5, progress=False)
    write_random_model(tmp_path / "plain", size="tiny", qtype="q4_0", seed=5, extra_norms=False, progress=False)
    monkeypatch.setattr(ggml_amx, "has_amx_buffer", lambda: True)
    monkeypatch.setattr(ggml_amx, "amx_tiles_work", lambda: True)
    monkeypatch.setattr(bench, "stock_available", lambda: False)
    monkeypatch.setitem(bench_child.ENGINES, "ours", qtype_reporting_engine)
    code = _bench_in_thread(["bench", "--gguf", str(tmp_path / "pair"), "--plain-gguf", str(tmp_path / "plain"),
                             "--bandwidth-gb", "0", "--rounds", "1", "--child-timeout", "120"], 240)
    err = capsys.readouterr().err
    assert code == 1
    assert "error: asked for qtype q4_0\n" in err  # the first column (with the image)
    assert "error: decode round 1: asked for qtype q4_0\n" in err
    assert "asked for qtype q4_k" not in err
