"""`python -m quantize bench --gguf DIR`: load time, image encode time, time to first token, prefill and decode
speed, peak RSS, and decode against the memory roofline.

Each engine runs in its own fresh process (quantize.bench_child), so load times and peak RSS are that engine's alone:
  * ours: the LLM file on the chosen backend (ggml graph, or the PyTorch fallback) + the int8 vision encoder;
  * with --plain-gguf DIR (a plain-phi2 export, `export`/`random --plain`): ours on that file (LLM only) and, with
    llama-cpp-python importable, stock llama.cpp on the same file, printed side by side.
Decode speed is the median over --decode-tokens single-token steps after a --prefill-tokens prefill (random ids;
speed does not depend on the values). Time to first token = image encode + prefill of the image vectors and a
~30-token question + the first sampled token, as in `chat`. With the image attached first (`chat`'s /image: the image
encoded and the prompt evaluated up to it while the question is typed, ChatSession.prepare), the bench prints that
preparation's time and the first token after it (the question's tokens only).

Roofline: a child first measures read bandwidth at --threads threads (torch.sum over --bandwidth-gb of float32, best
of 10 passes on 4 KiB pages and 10 on huge pages) for the header. A decode step must read every weight but the token
embedding once, so weight bytes / bandwidth is the floor of its time, and each engine's "share of the roofline" =
floor / its ms per token (100% = bandwidth-bound). The bandwidth behind each engine's share is read again in that
engine's own process, just before and just after its decode steps (512 MB, quantize.bench_child.time_llm): on a
shared host the hypervisor moves a guest's CPUs, and with them the bandwidth (a 2-vCPU EPYC guest read 37 GB/s with
both vCPUs on one CCD and ~60 GB/s across two, switching every half minute to few minutes; docs/benchmarks.md), so a
probe taken elsewhere pairs a decode with another machine's bandwidth. Where the two readings disagree by more than
15% the engine's share is left out and the table says that the bandwidth moved. "roofline, weights + KV cache" adds
the K and V bytes the timed steps read (their mean cached positions x the engine's bytes per position: our F32 cache,
llama.cpp's F16 one) at the same bandwidth. A second child times our ggml
matmul on a weight of the file's type that sits in cache (quantize.bench_kernel): weight bytes / that rate is the
kernel floor, the higher floor on a CPU whose memory outruns what its cores can dequantise; "share of max(roofline,
kernel)" is the share of the higher one.
The header names the CPU and its x86 SIMD flags, and the ggml builds each engine runs.

A child that dies (segfault, OOM kill) is reported with its exit code and signal name, and one that gives no result
within --child-timeout seconds is killed and reported; the bench then prints what it has and exits with status 1.
A child stopped by a user's mistake (a UserError: a damaged file, an unreadable --image, a --ctx too short for the
prompt, --backend llama-cpp without llama-cpp-python) prints its one `error:` line, and the exit status is 2.

A shared host's speed drifts by tens of percent within minutes, so one run of each engine can favour either. With
--rounds N (and --plain-gguf) the decode comparison is repeated N times in alternating fresh processes (ours on the
modified file, ours on the plain file, stock llama.cpp on the plain file when importable; LLM only) and the per-round
ms/token with each decode's share and bandwidth, the medians and the ratios to the last engine are printed. Every row
of ours times the file a session would load from --gguf (quantize.engine_choice.chosen_qtype: --qtype, else Q4_0
on CPUs whose AMX buffer works when the directory has it, else Q4_K first).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np
from gguf import GGMLQuantizationType
from PIL import Image

from tinygpt.errors import UserError

from . import bench_child
from . import bench_kernel as kernel
from . import bench_roofline as roof
from . import gguf_names as names
from .bench_child import report_failures
from .chat import add_ggml_switches
from .cli_checks import check_ctx, check_image_file, check_threads
from .engine_choice import BACKENDS, chosen_qtype
from .gguf_file import find_llm_file, find_vision_file, llm_hyperparams, open_gguf


PROBE_BYTES = 512 * 2**20  # the read-bandwidth probe in each engine's process, before and after its decode steps


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gguf", required=True, help="directory with llm-<qtype>.gguf and vision.gguf")
    p.add_argument("--qtype", default=None, help="which llm-<qtype>.gguf to time when the directory has several")
    p.add_argument("--image", default=None, help="image for the encode / first-token timing (default: random 224 px)")
    p.add_argument("--backend", default="auto", choices=BACKENDS, help="LLM engine (auto: ggml, else PyTorch)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads of every engine and of the bandwidth probe")
    p.add_argument("--ctx", type=int, default=1024, help="context length to allocate, at most the model's")
    p.add_argument("--prefill-tokens", type=int, default=128, help="random tokens prefilled before the decode steps")
    p.add_argument("--decode-tokens", type=int, default=32, help="single-token decode steps timed (their median)")
    p.add_argument("--plain-gguf", default=None,
                   help="directory/file of a plain-phi2 LLM GGUF: also time it on our graph and on llama-cpp-python")
    p.add_argument("--rounds", type=int, default=0,
                   help="with --plain-gguf: repeat the decode comparison this many times in alternating fresh "
                        "processes and print per-round ms/token, roofline shares and ratios (default 0)")
    p.add_argument("--bandwidth-gb", type=float, default=1.6,
                   help="size of the read-bandwidth probe behind the roofline, in GB (default 1.6; 0 skips it)")
    p.add_argument("--stock-batch", type=int, default=256,
                   help="llama.cpp's batch size for the stock prefill (default 256). 1 prefills token by token, "
                        "which keeps llama.cpp off its AMX tile kernels: their tile configuration faults (SIGSEGV) in "
                        "builds made by some compilers, on AMX CPUs")
    p.add_argument("--child-timeout", type=float, default=1800.0,
                   help="seconds an engine's process may take before it is killed and reported (default 1800)")
    add_ggml_switches(p)


def stock_available() -> bool:
    """Whether llama-cpp-python (the optional extra) imports; only probed, so a missing one skips its column."""
    try:
        import llama_cpp  # noqa: F401
    except Exception:
        return False
    return True


_ROWS = (("load (s)", "load_s", "{:.2f}"), ("  vision int8 cache", "vision_cache", "{}"),
         ("image encode, int8 (s)", "image_s", "{:.2f}"),
         ("first token, image+question (s)", "ttft_s", "{:.2f}"),
         ("image attached first: prepare (s)", "prepare_s", "{:.2f}"),
         ("  then first token, question (s)", "ttft_attached_s", "{:.2f}"),
         ("prefill (tok/s)", "prefill_tok_s", "{:.1f}"),
         ("decode (ms/token)", "decode_ms", "{:.1f}"), ("decode, best step (ms)", "decode_best_ms", "{:.1f}"),
         ("decode (tok/s)", "decode_tok_s", "{:.2f}"),
         ("read GB/s beside decode", "read_beside", "{}"),
         ("roofline (ms/token)", "roofline_ms", "{:.1f}"), ("share of the roofline", "roofline_share", "{:.0%}"),
         ("share of the roofline, best step", "roofline_share_best", "{:.0%}"),
         ("roofline, weights + KV cache (ms)", "roofline_kv_ms", "{:.1f}"),
         ("share of it", "roofline_kv_share", "{:.0%}"),
         ("kernel floor, cached weights (ms)", "kernel_ms", "{:.1f}"),
         ("share of max(roofline, kernel)", "bound_share", "{:.0%}"),
         ("peak RSS (GB)", "peak_rss_gb", "{:.2f}"))


def _row(name: str, results: list[dict], key: str, fmt: str, width: int = 30) -> str:
    cells = [(fmt.format(r[key]) if key in r else "-") for r in results]
    return f"{name:<34}" + "".join(f"{c:>{width}}" for c in cells)


def _random_image(directory: str) -> str:
    path = os.path.join(directory, "bench.png")
    pixels = (np.random.default_rng(0).random((224, 224, 3)) * 255).astype(np.uint8)
    Image.fromarray(pixels).save(path)
    return path


class Runner:
    """Runs engine children with the bench's timeout, adding each result's roofline (file bytes / the bandwidth read in
    the engine's process beside its decode; the header's probe where that was not measured). `measure()` runs the
    header's bandwidth probe."""

    def __init__(self, timeout_s: float, threads: int, bandwidth_bytes: int):
        self.timeout_s, self.threads, self.bandwidth_bytes = timeout_s, threads, bandwidth_bytes
        self.bandwidth: float | None = None
        self._bytes: dict[str, int] = {}
        self.kernels: dict[tuple[int, bool], dict] = {}  # (ggml type, repack) -> measure_kernel's result

    def measure(self) -> dict | None:
        """The probe's result (or {"error": ...}); None when --bandwidth-gb 0 switched it off."""
        if self.bandwidth_bytes <= 0:
            return None
        result = bench_child.run_child(bench_child.ENGINES["bandwidth"], dict(
            threads=self.threads, bandwidth_bytes=self.bandwidth_bytes), self.timeout_s, "bandwidth")
        if "error" not in result:
            self.bandwidth = result["bandwidth_gb_s"]
        return result

    def weight_bytes(self, path: str) -> int:
        if path not in self._bytes:
            self._bytes[path] = roof.weight_bytes_per_token(path)
        return self._bytes[path]

    def floor_ms(self, path: str) -> float | None:
        return None if self.bandwidth is None else roof.roofline_ms(self.weight_bytes(path), self.bandwidth)

    def kernel_floor_ms(self, path: str, repack: bool) -> float | None:
        """Weight bytes / our matmul kernel's rate on a cached weight of the file's type (measured once per type)."""
        if self.bandwidth_bytes <= 0:
            return None
        key = (kernel.matmul_type(path), bool(repack))
        if key not in self.kernels:
            self.kernels[key] = bench_child.run_child(bench_child.ENGINES["kernel"], dict(
                ggml_type=key[0], threads=self.threads, repack=key[1]), self.timeout_s, "kernel rate")
        rate = self.kernels[key].get("kernel_gb_s")
        return None if rate is None else kernel.kernel_floor_ms(self.weight_bytes(path), rate)

    def run(self, engine: str, args: dict, label: str) -> dict:
        args = dict(args, probe_bytes=min(self.bandwidth_bytes, PROBE_BYTES))
        result = bench_child.run_child(bench_child.ENGINES[engine], args, self.timeout_s, label)
        if "error" not in result and "file" in result and "decode_ms" in result:
            floor = self.floor_ms(result["file"])
            if "bandwidth_beside_gb_s" in result:  # read in the engine's process on either side of its decode
                result["read_beside"], read = roof.beside(result["bandwidth_beside_gb_s"])
                if read is not None:
                    result["read_gb_s"] = read
                    floor = roof.roofline_ms(self.weight_bytes(result["file"]), read)
                else:  # the host moved the process's CPUs during the decode: no share to attribute
                    result["bandwidth_moved"] = result["bandwidth_beside_gb_s"]
                    floor = None
            if floor is not None:
                result["roofline_ms"], result["roofline_share"] = floor, roof.share(floor, result["decode_ms"])
                result["roofline_share_best"] = roof.share(floor, result["decode_best_ms"])
                if "kv_bytes_per_token" in result:  # the same bandwidth over the weights and the K/V the step reads
                    with_kv = floor * (1 + result["kv_bytes_per_token"] / self.weight_bytes(result["file"]))
                    result["roofline_kv_ms"], result["roofline_kv_share"] = with_kv, roof.share(with_kv,
                                                                                              result["decode_ms"])
            if "GgmlLLM" in result.get("engine", ""):  # the kernel probe measures our ggml build
                compute = self.kernel_floor_ms(result["file"], args.get("repack", True))
                if compute is not None:
                    result["kernel_ms"] = compute
                    if floor is not None:
                        result["bound_share"] = roof.share(max(floor, compute), result["decode_ms"])
        return result

    def kernel_lines(self) -> list[str]:
        """One line on the kernel rates measured (or why not), for under the table."""
        lines = []
        for (ggml_type, repack), r in self.kernels.items():
            name = GGMLQuantizationType(ggml_type).name
            if "error" in r:
                lines.append(f"kernel rate, {name}: {r['error']}")
            else:
                lines.append(f"kernel rate, ours, {self.threads} threads, a {kernel.SIDE}x{kernel.SIDE} {name} weight "
                             f"in cache ({r['layout']} layout): {r['kernel_gb_s']:.1f} GB/s; kernel floor = weights "
                             "read per token / that rate")
        return lines


def _round_engines(base: dict, gguf: str, plain_gguf: str, stock: bool) -> list[tuple[str, str, dict]]:
    """(label, engine, child args) of one alternating round, in the order they run; the last is the reference."""
    plain = dict(base, gguf=plain_gguf, qtype=None)
    engines = [("ours, " + find_llm_file(gguf, base["qtype"]).name, "ours", dict(base, gguf=gguf, with_vision=False)),
               ("ours, plain " + find_llm_file(plain_gguf).name, "ours", dict(plain, with_vision=False))]
    if stock:
        engines.append(("stock, plain " + find_llm_file(plain_gguf).name, "stock", plain))
    return engines


def decode_rounds(runner: Runner, engines: list[tuple[str, str, dict]], rounds: int) -> list[dict]:
    """Each round runs every engine once, in order: {"ms", "best", "share", "floor", "read", "moved"} (each keyed by
    label; "read" the bandwidth read beside that engine's decode, "moved" the two readings where they disagreed) or
    {"error": ...}."""
    out = []
    for r in range(rounds):
        entry: dict = {"ms": {}, "share": {}, "best": {}, "floor": {}, "read": {}, "moved": {}}
        for label, engine, args in engines:
            result = runner.run(engine, args, label)
            if "error" in result:  # printed with the others at the end (a user's mistake as it is)
                out.append(result if result.get("user_error") else
                           {"error": f"decode round {r + 1}: {result['error']}"})
                return out
            entry["ms"][label] = result["decode_ms"]
            entry["best"][label] = result.get("decode_best_ms", result["decode_ms"])
            if "roofline_share" in result:
                entry["share"][label] = result["roofline_share"]
                entry["floor"][label] = result["roofline_ms"]
            if "read_gb_s" in result:
                entry["read"][label] = result["read_gb_s"]
            if "bandwidth_moved" in result:
                entry["moved"][label] = result["bandwidth_moved"]
        out.append(entry)
        print(f"  decode round {r + 1}/{rounds}: " + ", ".join(
            f"{k} {v:.1f}" + (f" ({entry['read'][k]:.0f} GB/s)" if k in entry["read"] else "")
            for k, v in entry["ms"].items()) + " ms/token", file=sys.stderr, flush=True)
    return out


def _cell(ms: float, share: float | None, read: float | None = None, moved: tuple | None = None) -> str:
    if moved is not None:
        return f"{ms:.1f} (moved {moved[0]:.0f}->{moved[1]:.0f})"
    if share is None:
        return f"{ms:.1f}"
    return f"{ms:.1f} ({share:.0%}" + (f" of {read:.0f} GB/s)" if read is not None else ")")


def format_rounds(rounds: list[dict]) -> str:
    """Per-round ms/token with the share of the roofline at the bandwidth read beside that decode (or, where it moved
    during the decode, the two readings and no share), the medians (shares over the rounds that have one), the best
    single step of all rounds (its share: the best of any round), and each engine's median ratio to the last one."""
    rounds = [r for r in rounds if "error" not in r]
    if not rounds:
        return "decode, alternating rounds: no round finished"
    labels = list(rounds[0]["ms"])
    ref = labels[-1]
    lines = ["decode, alternating rounds: ms/token (share of the roofline at the read bandwidth beside it)",
             f"{'':<12}" + "".join(f"{label[:31]:>32}" for label in labels)]
    for i, r in enumerate(rounds, 1):
        lines.append(f"  round {i:<4}" + "".join(
            f"{_cell(r['ms'][k], r['share'].get(k), r.get('read', {}).get(k), r.get('moved', {}).get(k)):>32}"
            for k in labels))
    medians = {k: float(np.median([r["ms"][k] for r in rounds])) for k in labels}
    shares = {k: float(np.median(v)) for k in labels if (v := [r["share"][k] for r in rounds if k in r["share"]])}
    lines.append(f"  {'median':<10}" + "".join(f"{_cell(medians[k], shares.get(k)):>32}" for k in labels))
    if all("best" in r and k in r["best"] for r in rounds for k in labels):
        best = {k: min(r["best"][k] for r in rounds) for k in labels}
        best_share = {k: max(v) for k in labels
                      if (v := [r["floor"][k] / r["best"][k] for r in rounds if k in r.get("floor", {})])}
        lines.append(f"  {'best step':<10}" + "".join(f"{_cell(best[k], best_share.get(k)):>32}" for k in labels))
    moved = sum(len(r.get("moved", {})) for r in rounds)
    if moved:
        lines.append(f"  {moved} decode(s) saw the read bandwidth move (the host moved this guest's CPUs or memory): "
                     "no share for those; the medians use the others")
    for k in labels[:-1]:
        ratios = [r["ms"][k] / r["ms"][ref] for r in rounds]
        lines.append(f"  median ratio ({k} / {ref}): {float(np.median(ratios)):.2f} (min {min(ratios):.2f}, "
                     f"max {max(ratios):.2f}; below 1 means faster)")
    return "\n".join(lines)


def _header(args: argparse.Namespace, stock: bool, bandwidth: dict | None) -> list[str]:
    model, flags = roof.cpu_flags()
    lines = [f"cpu: {model}, {os.cpu_count()} cpus; x86 flags: {' '.join(flags) or '-'}",
             f"ours: {roof.ggml_features()}"]
    if stock:
        lines.append(f"stock: {roof.stock_features()}")
    if bandwidth is not None:
        pages = ", ".join(f"{k} pages {bandwidth[f'bandwidth_{k}_gb_s']:.1f}" for k in ("4k", "huge")
                          if f"bandwidth_{k}_gb_s" in bandwidth)
        lines.append(f"read bandwidth, {args.threads} threads: {bandwidth['bandwidth_gb_s']:.1f} GB/s best ({pages}), "
                     f"{bandwidth['bandwidth_median_gb_s']:.1f} median (torch.sum over "
                     f"{bandwidth['bandwidth_bytes'] / 1e9:.1f} GB); roofline = weights read per token / the read "
                     "bandwidth measured beside each engine's decode (this best where none was)")
    return lines


def run(args: argparse.Namespace) -> int:
    if args.prefill_tokens < 1 or args.decode_tokens < 1:
        raise UserError("--prefill-tokens and --decode-tokens must be >= 1")
    if args.rounds < 0:
        raise UserError(f"--rounds must be >= 0, got {args.rounds}")
    if args.rounds and not args.plain_gguf:
        raise UserError("--rounds compares against a plain-phi2 file: give --plain-gguf DIR too")
    if args.bandwidth_gb < 0 or args.child_timeout <= 0 or args.stock_batch < 1:
        raise UserError("--bandwidth-gb must be >= 0, --child-timeout > 0 and --stock-batch >= 1")
    check_threads(args.threads)
    check_ctx(args.ctx)
    if args.image is not None:
        check_image_file(args.image)
    find_vision_file(args.gguf)  # fail fast on a wrong directory, a damaged LLM file or a --ctx past the model's
    # the file a session would load (Q4_0 on AMX CPUs when exported): every row of ours times that one
    args.qtype = chosen_qtype(args.gguf, args.qtype, args.backend, quiet=False)
    for gguf, qtype in [(args.gguf, args.qtype)] + ([(args.plain_gguf, None)] if args.plain_gguf else []):
        llm = open_gguf(find_llm_file(gguf, qtype), names.ARCH_LLM)
        check_ctx(args.ctx, llm.path, llm_hyperparams(llm).context_length)
    failures: list[dict] = []
    runner = Runner(args.child_timeout, args.threads, int(args.bandwidth_gb * 1e9))
    bandwidth = runner.measure()
    if bandwidth is not None and "error" in bandwidth:
        failures.append(bandwidth)
        bandwidth = None
    stock = bool(args.plain_gguf) and stock_available()
    if args.plain_gguf and not stock:
        print("note: llama-cpp-python is not importable; skipping the stock llama.cpp column", file=sys.stderr)
    for line in _header(args, stock, bandwidth):
        print(line)
    with tempfile.TemporaryDirectory() as tmp:
        base = dict(qtype=args.qtype, backend=args.backend, threads=args.threads, ctx=args.ctx,
                    stock_batch=args.stock_batch,
                    prefill=args.prefill_tokens, decode=args.decode_tokens, image=args.image or _random_image(tmp),
                    decode_graph=args.decode_graph, repack=args.repack)
        print(f"bench: {args.threads} threads, prefill {args.prefill_tokens} tokens, median of {args.decode_tokens} "
              "decode steps; each engine in a fresh process", file=sys.stderr, flush=True)
        results = [runner.run("ours", dict(base, gguf=args.gguf, with_vision=True), "ours")]
        if args.plain_gguf:
            results.append(runner.run("ours", dict(base, gguf=args.plain_gguf, qtype=None, with_vision=False),
                                      "ours, plain file"))
            if stock:
                results.append(runner.run("stock", dict(base, gguf=args.plain_gguf, qtype=None), "stock llama.cpp"))
        rounds = []
        if args.rounds:
            rounds = decode_rounds(runner, _round_engines(base, args.gguf, args.plain_gguf, stock), args.rounds)
    status = report_failures(failures + [r for r in results + rounds if "error" in r])
    ok = [r for r in results if "error" not in r]
    if ok:
        width = max(30, *(len(r["engine"]) + 2 for r in ok))  # engine names whole (layout included)
        print(f"{'':<34}" + "".join(f"{r['engine']:>{width}}" for r in ok))
        for name, key, fmt in _ROWS:
            print(_row(name, ok, key, fmt, width))
    for line in runner.kernel_lines():
        print(line)
    for r in ok:
        if "bandwidth_moved" in r:
            before, after = r["bandwidth_moved"]
            print(f"note: the read bandwidth moved during {r['engine']}'s decode ({before:.1f} -> {after:.1f} GB/s: "
                  "the host moved this guest's CPUs or memory); no roofline share for it, run again")
    if rounds:
        print(format_rounds(rounds))
    return status
