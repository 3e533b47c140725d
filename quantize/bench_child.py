"""The bench's child processes: one engine (or the bandwidth probe) per fresh process, and a parent side that never
waits for ever.

Contract:
  * `run_child(target, args, timeout_s, label)` starts `target(args, queue)` in a fresh process (forked from a
    forkserver that imported this module once, `child_context`) and returns the dict
    it puts on the queue. A child that dies before reporting (a segfault in a C library, os._exit, the OOM killer) comes
    back as {"error": "<label>: child died with signal SIGSEGV (exit code -11) before reporting a result"}; a child
    still running after timeout_s is killed and comes back as {"error": "<label>: no result after N s ..."}. So the
    parent returns within about timeout_s + a few seconds whatever the child does.
  * ENGINES maps an engine name to its target; bench resolves targets through it (tests swap in a failing child).
  * Engine targets put {"engine", "load_s", "prefill_tok_s", "decode_ms", "peak_rss_gb", ...} or {"error": ...}, and
    with args["probe_bytes"] "bandwidth_beside_gb_s": (read bandwidth just before, just after the decode steps);
    `measure_bandwidth` puts {"bandwidth_gb_s", "bandwidth_median_gb_s", "bandwidth_bytes", "bandwidth_4k_gb_s",
    "bandwidth_huge_gb_s" (where huge pages are available)}; `measure_kernel` puts {"kernel_gb_s", "layout"}.
"""
from __future__ import annotations

import functools
import multiprocessing as mp
import queue as queue_mod
import resource
import signal
import sys
import time

import numpy as np

from tinygpt.errors import USER_ERROR_EXIT_CODE, UserError

from . import bench_roofline as roof
from . import gguf_names as names
from .engine_choice import load_language_model
from .gguf_file import chat_format, find_llm_file, open_gguf
from .gguf_tokenizer import load_tokenizer
from .llama_cpp_backend import LlamaCppLLM
from .sampler import SamplingParams
from .session import ChatSession, open_session

QUESTION = ("Describe the main objects in this picture, their colours and where they are placed, and say what the "
            "person on the left is doing right now.")


def failure(exc: BaseException) -> dict:
    """What a child puts on the queue when `exc` stopped it: a UserError's own message marked "user_error" (the parent
    prints it as it is and exits 2), anything else with its class name (a crash: exit 1)."""
    if isinstance(exc, UserError):
        return {"error": str(exc), "user_error": True}
    return {"error": f"{type(exc).__name__}: {exc}"}


def report_failures(failures: list[dict]) -> int:
    """Print each failure's `error:` line once (stderr); the exit status: 0 none, 2 when every one is a user's mistake
    (a UserError in a child), else 1 (a crash, a signal, a timeout)."""
    for message in dict.fromkeys(f["error"] for f in failures):
        print(f"error: {message}", file=sys.stderr)
    if not failures:
        return 0
    return USER_ERROR_EXIT_CODE if all(f.get("user_error") for f in failures) else 1


def peak_rss_gb() -> float:
    """The process's peak RSS: VmHWM, which reset_peak_rss() can lower again (Linux), else ru_maxrss."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is KiB on Linux


def reset_peak_rss() -> bool:
    """Lower the peak RSS to the current RSS (Linux: '5' to /proc/self/clear_refs); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def random_ids(n: int, vocab: int) -> np.ndarray:
    """n token ids, the same for every engine and run (below 50000: ids every Phi-2 vocabulary has)."""
    return np.random.default_rng(0).integers(0, min(50000, vocab), n)


def time_llm(llm, prefill: int, decode: int, out: dict, probe_bytes: int = 0, threads: int = 2) -> None:
    """Prefill `prefill` random ids, then the median of `decode` single-token steps; the peak RSS of the whole process.
    With probe_bytes, the read bandwidth is measured in this process just before and just after the decode steps
    ("bandwidth_beside_gb_s": a shared host moves a guest's CPUs within minutes, and a probe in another process or
    a minute earlier can read another machine), both times over the same array; the probe's memory is kept out of the
    peak RSS, and where the peak cannot be reset (not Linux) the probe is skipped."""
    ids = random_ids(prefill, llm.hp.vocab_size)
    llm.reset()
    t0 = time.perf_counter()
    logits = llm.eval_tokens(ids)
    out["prefill_s"] = time.perf_counter() - t0
    out["prefill_tok_s"] = prefill / out["prefill_s"]
    peak = peak_rss_gb()  # load, image and prefill included
    probe = roof.BandwidthProbe(probe_bytes, threads) if probe_bytes > 0 and reset_peak_rss() else None
    if probe is not None:
        probe.read()
        reset_peak_rss()  # to the current RSS: the probe's array, resident until after the decode, is subtracted
    steps = []
    for _ in range(decode):
        token = int(np.argmax(logits)) % min(50000, llm.hp.vocab_size)
        t0 = time.perf_counter()
        logits = llm.eval_tokens([token])
        steps.append(time.perf_counter() - t0)
    out["decode_ms"] = float(np.median(steps) * 1000)
    out["decode_best_ms"] = float(np.min(steps) * 1000)  # on a shared host: the step least disturbed
    out["decode_tok_s"] = 1000.0 / out["decode_ms"]
    per_position = getattr(llm, "kv_bytes_per_position", None)
    if per_position:  # the K and V a step reads: the steps' mean cached positions, this one's included
        out["kv_bytes_per_token"] = per_position * (prefill + (decode + 1) / 2)
    out["peak_rss_gb"] = max(peak, peak_rss_gb() - (probe.nbytes / 2**30 if probe is not None else 0.0))
    if probe is not None:
        out["bandwidth_beside_gb_s"] = probe.finish()


def ours(args: dict, queue) -> None:
    """Child process: our runtime on the pair in args['gguf'] (or the LLM file only, without with_vision)."""
    try:
        out: dict = {}
        switches = dict(decode_graph=args["decode_graph"], repack=args["repack"])
        t0 = time.perf_counter()
        if args["with_vision"]:
            session = open_session(args["gguf"], backend=args["backend"], qtype=args["qtype"], n_ctx=args["ctx"],
                                   n_threads=args["threads"], sampling=SamplingParams(max_new_tokens=1), quiet=True,
                                   **switches)
        else:
            f = open_gguf(find_llm_file(args["gguf"], args["qtype"]), names.ARCH_LLM)
            llm = load_language_model(f, args["backend"], args["ctx"], args["threads"], quiet=True, **switches)
            session = ChatSession(llm=llm, tokenizer=load_tokenizer(f), fmt=chat_format(f))
        out["load_s"] = time.perf_counter() - t0
        if session.vision is not None:  # the load time depends on it (quantize.vision_cache)
            out["vision_cache"] = session.vision.cache_state
        layout = ", AMX" if getattr(session.llm, "in_amx", 0) else ""  # quantize.ggml_amx
        out["engine"] = f"ours ({type(session.llm).__name__}, {session.llm.file.path.name}{layout})"
        out["file"] = str(session.llm.file.path)
        if args["with_vision"]:
            image = args["image"]
            session.vision.encode(image)  # warm-up (first call allocates)
            t0 = time.perf_counter()
            session.vision.encode(image)
            out["image_s"] = time.perf_counter() - t0
            session.ask(QUESTION, images=[image])
            out["ttft_s"] = session.last_stats.first_token_s
            out["ttft_positions"] = session.last_stats.prompt_tokens
            # as `chat` does when the image is attached before the question is typed: a new conversation, the
            # image (a new one to the cache) prepared first, then only the question's tokens before the first token
            session.reset()
            indices = session.prepare([image])
            out["prepare_s"] = session.last_stats.image_encode_s + session.last_stats.prefill_s
            session.ask(QUESTION, images=indices)
            out["ttft_attached_s"] = session.last_stats.first_token_s
        time_llm(session.llm, args["prefill"], args["decode"], out, args.get("probe_bytes", 0), args["threads"])
        queue.put(out)
    except BaseException as exc:  # report to the parent instead of dying silently
        queue.put(failure(exc))


def stock(args: dict, queue) -> None:
    """Child process: stock llama.cpp (llama-cpp-python) on the plain file in args['gguf']."""
    try:
        out: dict = {}
        t0 = time.perf_counter()
        path = find_llm_file(args["gguf"], args["qtype"])
        llm = LlamaCppLLM(path, n_ctx=args["ctx"], n_threads=args["threads"], n_batch=args.get("stock_batch", 256),
                          extra_bufts=True)  # stock as built, AMX buffer included
        out["load_s"] = time.perf_counter() - t0
        out["engine"] = "llama-cpp-python (stock)"
        out["file"] = str(path)
        time_llm(llm, args["prefill"], args["decode"], out, args.get("probe_bytes", 0), args["threads"])
        llm.close()
        queue.put(out)
    except BaseException as exc:
        queue.put(failure(exc))


def measure_bandwidth(args: dict, queue) -> None:
    """Child process: memory read bandwidth at args['threads'] threads, as torch.sum over args['bandwidth_bytes'] of
    float32 (bench_roofline.BandwidthProbe), once on ordinary 4 KiB pages and once on huge pages (where the kernel
    takes the advice), args['passes'] passes each. Puts the best pass of either page size (the roofline's bandwidth),
    the median pass, and the best of each page size."""
    try:
        out: dict = {}
        times: dict[str, list[float]] = {}
        for pages in ("4k", "huge"):
            probe = roof.BandwidthProbe(int(args["bandwidth_bytes"]), int(args["threads"]), huge=pages == "huge")
            if pages == "4k" or probe.huge:
                times[pages] = probe.seconds(int(args.get("passes", 10)))
                out[f"bandwidth_{pages}_gb_s"] = probe.nbytes / min(times[pages]) / 1e9
            out["bandwidth_bytes"] = probe.nbytes
            probe.close()
        every = [t for ts in times.values() for t in ts]
        out["bandwidth_gb_s"] = out["bandwidth_bytes"] / min(every) / 1e9
        out["bandwidth_median_gb_s"] = out["bandwidth_bytes"] / float(np.median(every)) / 1e9
        queue.put(out)
    except BaseException as exc:
        queue.put(failure(exc))


def measure_kernel(args: dict, queue) -> None:
    """Child process: our one-token matmul's rate on a cached weight of args['ggml_type'] (quantize.bench_kernel)."""
    try:
        from .bench_kernel import kernel_rate

        rate, layout = kernel_rate(args["ggml_type"], args["threads"], repack=args["repack"])
        queue.put({"kernel_gb_s": rate, "layout": layout})
    except BaseException as exc:
        queue.put(failure(exc))


ENGINES = {"ours": ours, "stock": stock, "bandwidth": measure_bandwidth, "kernel": measure_kernel}


def describe_exit(exitcode: int | None) -> str:
    """'signal SIGSEGV (exit code -11)' / 'exit code 3' for a child's multiprocessing exit code."""
    if exitcode is not None and exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        return f"signal {name} (exit code {exitcode})"
    return f"exit code {exitcode}"


@functools.cache
def child_context():
    """A forkserver that has imported this module (torch, transformers, ggml) once; each child is forked from it and
    starts fresh (nothing run, no threads, no model) without importing them again, which took 5-8 s of CPU per child
    on a slow 2-core CPU. Children see the environment of the process when its first child started (the forkserver's).
    Spawn where there is no forkserver."""
    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])
    return ctx


def run_child(target, args: dict, timeout_s: float, label: str) -> dict:
    """`target(args, queue)` in a fresh process (`child_context`): its result, or {"error": ...} if it dies or
    overruns."""
    ctx = child_context()
    queue = ctx.Queue()
    proc = ctx.Process(target=target, args=(args, queue), daemon=True)
    proc.start()
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            try:
                return queue.get(timeout=0.25)
            except queue_mod.Empty:
                pass
            if not proc.is_alive():
                try:  # a result put just before a normal exit may still be in the pipe
                    return queue.get(timeout=1.0)
                except queue_mod.Empty:
                    return {"error": f"{label}: child died with {describe_exit(proc.exitcode)} before reporting a "
                                     "result"}
            if time.monotonic() > deadline:
                proc.kill()
                proc.join(10)
                return {"error": f"{label}: no result after {timeout_s:.0f} s (--child-timeout); child killed"}
    finally:
        proc.join(30)
        if proc.is_alive():
            proc.kill()
            proc.join(10)
        queue.close()
