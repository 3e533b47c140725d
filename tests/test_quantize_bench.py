"""`python -m quantize bench`: the machine header, the table's rows for ours and the plain file (with the roofline),
the alternating decode rounds, and its argument errors. Tiny random GGUF files; engines run in child processes
(forked from the bench's forkserver) exactly as for the full-size numbers."""

from __future__ import annotations

import pytest

pytest.importorskip("gguf")

from quantize import bench  # noqa: E402
from quantize.__main__ import main  # noqa: E402
from quantize.bench import format_rounds  # noqa: E402


def test_bench_prints_every_row_and_the_alternating_decode_rounds(random_gguf_pairs, capsys, monkeypatch):
    monkeypatch.setattr(bench, "stock_available", lambda: False)  # same table with or without the optional extra
    # every decode's two bandwidth readings taken as agreeing (a 50 MB probe on a busy machine may not; the other
    # case is test_a_decode_whose_bandwidth_moved_gets_no_share)
    monkeypatch.setattr(bench.roof, "steady", lambda before, after: True)
    code = main(["bench", "--gguf", str(random_gguf_pairs / "modified"),
                 "--plain-gguf", str(random_gguf_pairs / "plain"), "--bandwidth-gb", "0.05",
                 "--prefill-tokens", "8", "--decode-tokens", "4", "--ctx", "128", "--rounds", "2"])
    out, err = capsys.readouterr()
    assert code == 0, err
    cpu, ours, bandwidth, header, *rows = out.splitlines()
    assert cpu.startswith("cpu: ") and "x86 flags:" in cpu
    assert ours.startswith("ours: ggml-python ")
    assert bandwidth.startswith("read bandwidth, 2 threads: ") and float(bandwidth.split()[4]) > 0
    assert "llm-q8_0.gguf" in header and header.count("GgmlLLM") + header.count("TorchLLM") == 2
    names = [row[:34].strip() for row in rows]
    for name in ("load (s)", "vision int8 cache", "image encode, int8 (s)", "first token, image+question (s)",
                 "image attached first: prepare (s)", "then first token, question (s)", "prefill (tok/s)",
                 "decode (ms/token)", "decode, best step (ms)", "decode (tok/s)", "roofline (ms/token)",
                 "read GB/s beside decode", "share of the roofline", "share of the roofline, best step",
                 "roofline, weights + KV cache (ms)", "share of it",
                 "kernel floor, cached weights (ms)",
                 "share of max(roofline, kernel)", "peak RSS (GB)"):
        assert name in names
    kernel_ms = [float(v) for v in rows[names.index("kernel floor, cached weights (ms)")].split()[-2:]]
    roofline_ms = [float(v) for v in rows[names.index("roofline (ms/token)")].split()[-2:]]
    assert all(v > 0 for v in kernel_ms)
    bound = [float(v[:-1]) for v in rows[names.index("share of max(roofline, kernel)")].split()[-2:]]
    share = [float(v[:-1]) for v in rows[names.index("share of the roofline")].split()[-2:]]
    assert all(b >= s for b, s in zip(bound, share))  # the higher floor's share
    decode_ms = [float(v) for v in rows[names.index("decode (ms/token)")].split()[-2:]]
    for k, r, d, b, s in zip(kernel_ms, roofline_ms, decode_ms, bound, share):
        if (k - r - 0.1) / d * 100 >= 1.5:  # a kernel floor above the roofline by more than the printed figures'
            assert b > s                       # rounding (0.1 ms, whole percent): its share is the higher one
    with_kv = [float(v) for v in rows[names.index("roofline, weights + KV cache (ms)")].split()[-2:]]
    assert all(k >= r for k, r in zip(with_kv, roofline_ms))  # more bytes at the same bandwidth (0.1 ms resolution)
    beside = rows[names.index("read GB/s beside decode")][34:].split()  # "before / after" for each engine
    assert len(beside) == 6 and beside[1] == beside[4] == "/" and all(float(beside[i]) > 0 for i in (0, 2, 3, 5))
    rate = [row for row in rows if row.startswith("kernel rate, ours, 2 threads, a 2560x2560 Q8_0 weight in cache")]
    assert len(rate) == 1 and float(rate[0].split("layout): ")[1].split()[0]) > 0  # one file type, measured once
    decode = rows[names.index("decode (ms/token)")].split()
    assert all(float(v) > 0 for v in decode[-2:])  # both engines measured
    assert rows[names.index("vision int8 cache")].split()[-2:] == ["off", "-"]  # tests keep it off (conftest)
    for name in ("first token, image+question (s)", "image attached first: prepare (s)",
                 "then first token, question (s)"):  # measured for ours on the modified pair, not for the plain file
        # (a number: on the tiny model a step can print as 0.00 s)
        assert float(rows[names.index(name)].split()[-2]) >= 0 and rows[names.index(name)].split()[-1] == "-"
    shares = rows[names.index("share of the roofline")].split()[-2:]
    assert all(s.endswith("%") and float(s[:-1]) >= 0 for s in shares)  # tiny weights: a floor of microseconds
    assert "skipping the stock llama.cpp column" in err
    rounds = out[out.index("decode, alternating rounds"):].splitlines()
    assert "ours, llm-q8_0.gguf" in rounds[1] and "ours, plain llm-q8_0.gguf" in rounds[1]
    assert [line.split()[:2] for line in rounds[2:4]] == [["round", "1"], ["round", "2"]]
    for line in rounds[2:4]:  # each decode with its share at the bandwidth read beside it
        assert line.count("% of ") == 2 and line.count(" GB/s)") == 2
    assert err.count(" GB/s)") == 4
    assert rounds[4].split()[0] == "median" and "%)" in rounds[4]
    assert rounds[5].split()[:2] == ["best", "step"] and "%)" in rounds[5]
    ratio_line = [line for line in rounds if "median ratio" in line][0]
    ratio = float(ratio_line.split(": ")[1].split()[0])
    assert 0 < ratio < float("inf")  # a measured ratio: no bound, a busy machine skews tiny rounds
    assert err.count("decode round") == 2


def test_format_rounds_reports_shares_and_the_median_ratio_to_the_last_engine():
    def entry(a, b, c):
        return {"ms": {"ours, q4_k": a, "ours, q4_0": b, "stock, q4_0": c},
                "share": {"ours, q4_k": 60 / a, "ours, q4_0": 70 / b, "stock, q4_0": 70 / c}}

    rounds = [entry(90.0, 95.0, 100.0), entry(130.0, 120.0, 100.0), entry(95.0, 100.0, 100.0), {"error": "died"}]
    text = format_rounds(rounds)
    assert "median ratio (ours, q4_k / stock, q4_0): 0.95 (min 0.90, max 1.30" in text
    assert "median ratio (ours, q4_0 / stock, q4_0): 1.00 (min 0.95, max 1.20" in text
    assert text.count("round ") == 3
    median = [line for line in text.splitlines() if line.split()[0] == "median"][0]
    assert median.split() == ["median", "95.0", "(63%)", "100.0", "(70%)", "100.0", "(70%)"]
    assert "GB/s" not in text and "moved" not in text  # no bandwidth read beside the decodes


def test_format_rounds_uses_each_decodes_own_bandwidth_and_leaves_out_a_decode_whose_bandwidth_moved():
    def entry(ms, bandwidth, moved=False):  # a floor of 50 ms at 30 GB/s: the same file on a host that moves its CPUs
        floor = 50.0 * 30.0 / bandwidth
        r = {"ms": {"ours": ms, "stock": 2 * ms}, "best": {"ours": ms - 5, "stock": 2 * ms - 5},
             "floor": {"ours": floor, "stock": floor}, "share": {"ours": floor / ms, "stock": floor / (2 * ms)},
             "read": {"ours": bandwidth, "stock": bandwidth}, "moved": {}}
        if moved:  # ours read 30 GB/s before its decode and 60 after: no floor, no share
            for key in ("floor", "share", "read"):
                del r[key]["ours"]
            r["moved"]["ours"] = (30.0, 60.0)
        return r

    text = format_rounds([entry(50.0, 30.0), entry(40.0, 60.0), entry(60.0, 30.0), entry(45.0, 30.0, moved=True)])
    lines = text.splitlines()
    assert lines[2].split() == ["round", "1", "50.0", "(100%", "of", "30", "GB/s)", "100.0", "(50%", "of", "30",
                                "GB/s)"]
    assert lines[3].split() == ["round", "2", "40.0", "(62%", "of", "60", "GB/s)", "80.0", "(31%", "of", "60",
                                "GB/s)"]  # a 25 ms floor at 60 GB/s
    assert lines[5].split()[:5] == ["round", "4", "45.0", "(moved", "30->60)"]
    # medians: ms over all four rounds, ours' share over the three rounds that have one (100%, 62%, 83%), stock's
    # over all four (50%, 31%, 42%, 56%)
    assert lines[6].split() == ["median", "47.5", "(83%)", "95.0", "(46%)"]
    # best steps 35 ms (round 2) and 75 ms; best shares: ours round 1's 50 / 45 ms, stock round 4's 50 / 85 ms
    assert lines[7].split() == ["best", "step", "35.0", "(111%)", "75.0", "(59%)"]
    assert "1 decode(s) saw the read bandwidth move" in lines[8]


def test_a_decode_whose_bandwidth_moved_gets_no_share(monkeypatch, capsys):
    """Runner.run on a child that read 30 GB/s before its decode and 60 after: the table row says so, no roofline or
    share comes out of it (either reading would pair the decode with another placement), the kernel floor still does;
    a steady pair gives the share at the higher reading."""
    def child(target, args, timeout_s, label):
        if label == "kernel rate":
            return {"kernel_gb_s": 40.0, "layout": "CPU_REPACK"}
        return {"engine": "ours (GgmlLLM, llm.gguf)", "file": "llm.gguf", "decode_ms": 50.0, "decode_best_ms": 48.0,
                "bandwidth_beside_gb_s": args["beside"], "kv_bytes_per_token": 150_000_000}

    monkeypatch.setattr(bench.bench_child, "run_child", child)
    monkeypatch.setattr(bench.kernel, "matmul_type", lambda path: 12)
    runner = bench.Runner(timeout_s=10, threads=2, bandwidth_bytes=2**30)
    runner.bandwidth = 45.0  # the header's probe: not used where the decode's own readings exist
    runner._bytes["llm.gguf"] = 1_500_000_000
    moved = runner.run("ours", {"beside": (30.0, 60.0)}, "ours")
    assert moved["read_beside"] == "30.0 / 60.0 moved" and moved["bandwidth_moved"] == (30.0, 60.0)
    assert "roofline_share" not in moved and "roofline_ms" not in moved and "bound_share" not in moved
    assert moved["kernel_ms"] == 1_500_000_000 / 40e9 * 1000
    steady = runner.run("ours", {"beside": (36.0, 37.0)}, "ours")
    assert steady["read_gb_s"] == 37.0 and steady["roofline_ms"] == 1_500_000_000 / 37e9 * 1000
    assert steady["roofline_share"] == steady["roofline_ms"] / 50.0
    assert steady["roofline_kv_ms"] == pytest.approx(1_650_000_000 / 37e9 * 1000)  # weights + 150 MB of K/V
    assert "roofline_kv_ms" not in moved


def test_steady_bandwidth_readings():
    from quantize.bench_roofline import BandwidthProbe, steady

    assert steady(36.0, 37.0) and steady(60.0, 52.0) and not steady(37.0, 60.0) and not steady(60.0, 36.0)
    probe = BandwidthProbe(32 * 2**20, 2)
    assert probe.nbytes == 32 * 2**20 and probe.read(passes=2) > 0.1  # GB/s: a real pass over 32 MB


@pytest.mark.parametrize("extra, message", [(["--rounds", "2"], "give --plain-gguf"),
                                            (["--rounds", "-1"], "--rounds must be >= 0"),
                                            (["--decode-tokens", "0"], "must be >= 1"),
                                            (["--stock-batch", "0"], "--stock-batch >= 1")])
def test_bench_argument_errors_name_the_flag(random_gguf_pairs, capsys, extra, message):
    assert main(["bench", "--gguf", str(random_gguf_pairs / "modified"), *extra]) == 2
    assert message in capsys.readouterr().err
