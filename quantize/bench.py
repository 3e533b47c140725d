"""`python -m quantize bench --gguf DIR`: load time, image encode time, time to first token, prefill and decode
speed, peak RSS.

Each engine runs in its own fresh process, so load times and peak RSS are that engine's alone:
  * ours: the LLM file on the chosen backend (ggml graph, or the PyTorch fallback) + the int8 vision encoder;
  * with --plain-gguf DIR (a plain-phi2 export, `export`/`random --plain`) and llama-cpp-python importable,
    the same LLM numbers for stock llama.cpp on that file, printed side by side.
Decode speed is the median over --decode-tokens single-token steps after a --prefill-tokens prefill (random ids;
speed does not depend on the values). Time to first token = image encode + prefill of the image vectors and a
~30-token question + the first sampled token, as in `chat`.

A shared host's speed drifts by tens of percent within minutes, so one run of each engine can favour either. With
--rounds N (and --plain-gguf) the decode comparison is repeated N times in alternating fresh processes (ours on the
modified LLM file, then stock llama.cpp on the plain file, LLM only) and the per-round ratios and their median are
printed: drift then hits both sides of a round alike.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from tinygpt.errors import UserError

from . import gguf_names as names
from .chat import add_ggml_switches
from .gguf_file import chat_format, find_llm_file, find_vision_file, load_tokenizer, open_gguf
from .llama_cpp_backend import LlamaCppLLM
from .sampler import SamplingParams
from .session import BACKENDS, ChatSession, load_language_model, open_session

QUESTION = ("Describe the main objects in this picture, their colours and where they are placed, and say what the "
            "person on the left is doing right now.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gguf", required=True, help="directory with llm-<qtype>.gguf and vision.gguf")
    p.add_argument("--qtype", default=None)
    p.add_argument("--image", default=None, help="image for the encode / first-token timing (default: random 224 px)")
    p.add_argument("--backend", default="auto", choices=BACKENDS)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--ctx", type=int, default=1024, help="context length to allocate (default 1024)")
    p.add_argument("--prefill-tokens", type=int, default=128)
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--plain-gguf", default=None,
                   help="directory/file of a plain-phi2 LLM GGUF: also time it on our graph and on llama-cpp-python")
    p.add_argument("--rounds", type=int, default=0,
                   help="with --plain-gguf: repeat the decode comparison (ours vs stock llama.cpp) this many times in "
                        "alternating fresh processes and print the per-round ratios and their median (default 0)")
    add_ggml_switches(p)


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is KiB on Linux


def _time_llm(llm, prefill: int, decode: int, out: dict) -> None:
    rng = np.random.default_rng(0)
    ids = rng.integers(0, min(50000, llm.hp.vocab_size), prefill)
    llm.reset()
    t0 = time.perf_counter()
    logits = llm.eval_tokens(ids)
    out["prefill_s"] = time.perf_counter() - t0
    out["prefill_tok_s"] = prefill / out["prefill_s"]
    steps = []
    for _ in range(decode):
        token = int(np.argmax(logits)) % min(50000, llm.hp.vocab_size)
        t0 = time.perf_counter()
        logits = llm.eval_tokens([token])
        steps.append(time.perf_counter() - t0)
    out["decode_ms"] = float(np.median(steps) * 1000)
    out["decode_tok_s"] = 1000.0 / out["decode_ms"]


def _ours(args: dict, queue) -> None:
    """Child process: our runtime on the pair in args['gguf'] (or the LLM file only, for plain)."""
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
        out["engine"] = f"ours ({type(session.llm).__name__}, {session.llm.file.path.name})"
        if args["with_vision"]:
            image = args["image"]
            session.vision.encode(image)  # warm-up (first call allocates)
            t0 = time.perf_counter()
            session.vision.encode(image)
            out["image_s"] = time.perf_counter() - t0
            session.ask(QUESTION, images=[image])
            out["ttft_s"] = session.last_stats.first_token_s
            out["ttft_positions"] = session.last_stats.prompt_tokens
        _time_llm(session.llm, args["prefill"], args["decode"], out)
        out["peak_rss_gb"] = _peak_rss_gb()
        queue.put(out)
    except BaseException as exc:  # report to the parent instead of dying silently
        queue.put({"error": f"{type(exc).__name__}: {exc}"})


def _llama_cpp(args: dict, queue) -> None:
    try:
        out: dict = {}
        t0 = time.perf_counter()
        llm = LlamaCppLLM(find_llm_file(args["gguf"], args["qtype"]), n_ctx=args["ctx"], n_threads=args["threads"])
        out["load_s"] = time.perf_counter() - t0
        out["engine"] = "llama-cpp-python (stock)"
        _time_llm(llm, args["prefill"], args["decode"], out)
        out["peak_rss_gb"] = _peak_rss_gb()
        llm.close()
        queue.put(out)
    except BaseException as exc:
        queue.put({"error": f"{type(exc).__name__}: {exc}"})


def _in_child(target, args: dict) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=target, args=(args, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def _row(name: str, results: list[dict], key: str, fmt: str) -> str:
    cells = [(fmt.format(r[key]) if key in r else "-") for r in results]
    return f"{name:<34}" + "".join(f"{c:>30}" for c in cells)


def _random_image(directory: str) -> str:
    path = os.path.join(directory, "bench.png")
    pixels = (np.random.default_rng(0).random((224, 224, 3)) * 255).astype(np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def _decode_rounds(base: dict, gguf: str, plain_gguf: str, rounds: int, stock: bool) -> list[dict]:
    """Alternating LLM-only decode runs: ours on the modified file, then the other engine on the plain file."""
    other = (_llama_cpp, dict(base, gguf=plain_gguf, qtype=None)) if stock else \
        (_ours, dict(base, gguf=plain_gguf, qtype=None, with_vision=False))
    out = []
    for r in range(rounds):
        ours = _in_child(_ours, dict(base, gguf=gguf, with_vision=False))
        theirs = _in_child(*other)
        failed = [result["error"] for result in (ours, theirs) if "error" in result]
        if failed:
            print(f"error: decode round {r + 1}: {failed[0]}", file=sys.stderr)
            out.append({"error": failed[0]})
            break
        out.append({"ours_ms": ours["decode_ms"], "other_ms": theirs["decode_ms"], "other": theirs["engine"],
                    "ratio": ours["decode_ms"] / theirs["decode_ms"]})
        print(f"  decode round {r + 1}/{rounds}: ours {ours['decode_ms']:.1f} ms/token, {theirs['engine']} "
              f"{theirs['decode_ms']:.1f} ms/token", file=sys.stderr, flush=True)
    return out


def format_rounds(rounds: list[dict]) -> str:
    rounds = [r for r in rounds if "error" not in r]
    if not rounds:
        return "decode, alternating rounds: no round finished"
    other = rounds[0]["other"]
    lines = [f"decode, alternating rounds (ms/token)   {'ours':>10} {other[:29]:>30} {'ratio':>7}"]
    for i, r in enumerate(rounds, 1):
        lines.append(f"  round {i:<32}{r['ours_ms']:>10.1f} {r['other_ms']:>30.1f} {r['ratio']:>7.2f}")
    ratios = [r["ratio"] for r in rounds]
    lines.append(f"  median ratio (ours / {other.split(' ')[0]}): {float(np.median(ratios)):.2f} "
                 f"(min {min(ratios):.2f}, max {max(ratios):.2f}; below 1 means ours is faster)")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    if args.prefill_tokens < 1 or args.decode_tokens < 1:
        raise UserError("--prefill-tokens and --decode-tokens must be >= 1")
    if args.rounds < 0:
        raise UserError(f"--rounds must be >= 0, got {args.rounds}")
    if args.rounds and not args.plain_gguf:
        raise UserError("--rounds compares against a plain-phi2 file: give --plain-gguf DIR too")
    if args.image is not None and not Path(args.image).is_file():
        raise UserError(f"{args.image}: image file not found")
    find_llm_file(args.gguf, args.qtype), find_vision_file(args.gguf)  # fail fast on a wrong directory
    with tempfile.TemporaryDirectory() as tmp:
        base = dict(qtype=args.qtype, backend=args.backend, threads=args.threads, ctx=args.ctx,
                    prefill=args.prefill_tokens, decode=args.decode_tokens, image=args.image or _random_image(tmp),
                    decode_graph=args.decode_graph, repack=args.repack)
        print(f"bench: {args.threads} threads, prefill {args.prefill_tokens} tokens, median of {args.decode_tokens} "
              "decode steps; each engine in a fresh process", file=sys.stderr)
        results = [_in_child(_ours, dict(base, gguf=args.gguf, with_vision=True))]
        stock = False
        if args.plain_gguf:
            results.append(_in_child(_ours, dict(base, gguf=args.plain_gguf, qtype=None, with_vision=False)))
            try:  # the optional extra: only probed, so a missing one skips its column instead of failing
                import llama_cpp  # noqa: F401
            except Exception:
                print("note: llama-cpp-python is not importable; skipping the stock llama.cpp column", file=sys.stderr)
            else:
                stock = True
                results.append(_in_child(_llama_cpp, dict(base, gguf=args.plain_gguf, qtype=None)))
        rounds = _decode_rounds(base, args.gguf, args.plain_gguf, args.rounds, stock) if args.rounds else []
    for r in results:
        if "error" in r:
            print(f"error: {r['error']}", file=sys.stderr)
    ok = [r for r in results if "error" not in r]
    if not ok:
        return 1
    print(f"{'':<34}" + "".join(f"{r['engine'][:29]:>30}" for r in ok))
    print(_row("load (s)", ok, "load_s", "{:.2f}"))
    print(_row("image encode, int8 (s)", ok, "image_s", "{:.2f}"))
    print(_row("first token, image+question (s)", ok, "ttft_s", "{:.2f}"))
    print(_row("prefill (tok/s)", ok, "prefill_tok_s", "{:.1f}"))
    print(_row("decode (ms/token)", ok, "decode_ms", "{:.1f}"))
    print(_row("decode (tok/s)", ok, "decode_tok_s", "{:.2f}"))
    print(_row("peak RSS (GB)", ok, "peak_rss_gb", "{:.2f}"))
    if rounds:
        print(format_rounds(rounds))
    return 0 if len(ok) == len(results) and not any("error" in r for r in rounds) else 1
