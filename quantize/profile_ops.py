"""Where a decode step's time goes: a per-op profile of one single-token step (or of a prefill chunk), ours and stock
llama.cpp side by side.

    python -m quantize profile --gguf DIR [--plain-gguf DIR] [--positions 128] [--threads 2] [--prefill N]

Method. Each engine runs in its own fresh process (quantize.bench_child.run_child: a crash or a hang comes back as an
error line). It prefills `positions` random tokens, then times one decode step (with --prefill N: a chunk of N more
tokens) as a whole (the median of `repeats`), then computes the same step node by node and times each node:
  * ours: the cached decode graph (quantize.ggml_decode_graph), or the chunk's graph (GgmlLLM.chunk_graph), is
    computed one node at a time through ggml_graph_view;
  * stock: llama.cpp's scheduler callback (cb_eval) asks for every node, which makes the scheduler compute the graph
    one node at a time and call back after each. The callback stays installed for stock's whole-step timing too
    (answering "no" to every node: one Python call per node, a few hundred microseconds per step).
A node launched alone pays a fixed cost its place in the whole graph does not (waking the threads, and for stock a
Python callback): it is measured on the graph's no-op nodes (views, reshapes, permutes: nothing computed) and
subtracted from every node. Nodes are grouped by op, matmuls by the weight they read ("blk.N." dropped), with the
weight bytes and the rate they were read at (for a prefill: the matmuls' GFLOP/s instead). The per-node sum differs
from the whole step by what running alone changes (caches, the overlap of one op's tail with the next); the whole
step is printed beside it. For a decode step each child reads the memory bandwidth in its own process just before
and just after its timed steps (quantize.bench_roofline.BandwidthProbe, as the bench does): the step's share of the
weights-only roofline, and what each matmul group's rate compares with; where the two readings disagree (the host
moved the CPUs) there is no share (a prefill is bound by compute, and gets a tokens/s row instead).

Contract: `profile(args)` -> {engine label: result dict from the child}; `format_profiles(results, positions, threads,
prefill)` -> the table; `run(args)` prints it and returns 1 when an engine failed (2 when
only because of a user's mistake, a UserError in the child).
"""
from __future__ import annotations

import argparse
import ctypes
import re
import statistics
import sys
import time

from tinygpt.errors import UserError

from . import bench
from . import bench_roofline as roof
from . import gguf_names as names
from .bench_child import failure, random_ids, report_failures, run_child
from .cli_checks import check_threads
from .engine_choice import chosen_qtype
from .gguf_file import find_llm_file, open_gguf

NO_OPS = {"NONE", "VIEW", "RESHAPE", "PERMUTE", "TRANSPOSE"}
GELU_NAME = "gelu"  # quantize.ggml_gelu.NAME (that module imports ggml; this one only in its children)
_MAX_SRC, _MAX_NAME = 10, 64  # ggml.h: GGML_MAX_SRC, GGML_MAX_NAME (the same in ggml 0.15 and llama.cpp's ggml)


class TensorHead(ctypes.Structure):
    """The leading fields of ggml.h's struct ggml_tensor, to read stock llama.cpp's nodes without importing a second
    ggml into its process (tests check the offsets against ggml-python's own struct)."""

    _fields_ = [("type", ctypes.c_int), ("buffer", ctypes.c_void_p), ("ne", ctypes.c_int64 * 4),
                ("nb", ctypes.c_size_t * 4), ("op", ctypes.c_int), ("op_params", ctypes.c_int32 * 16),
                ("flags", ctypes.c_int32), ("src", ctypes.c_void_p * _MAX_SRC), ("view_src", ctypes.c_void_p),
                ("view_offs", ctypes.c_size_t), ("data", ctypes.c_void_p), ("name", ctypes.c_char * _MAX_NAME)]


def group_of(op: str, weight_name: str | None, node_name: str = "") -> str:
    """'matmul ffn_up' for a matmul reading blk.N.ffn_up.weight, 'GELU' for one of quantize.ggml_gelu's five ops,
    else the op ('GELU', 'FLASH_ATTN_EXT', ...)."""
    if node_name == GELU_NAME:
        return "GELU"
    if op == "MUL_MAT" and weight_name:
        role = re.sub(r"^blk\.\d+\.", "", weight_name)
        return "matmul " + re.sub(r"\.weight$", "", role)
    return op


def matmul_flops(k: int, out_ne) -> int:
    """2 * k multiply-adds per output element of a matmul whose weight rows are k long."""
    return 2 * int(k) * int(out_ne[0]) * int(out_ne[1]) * int(out_ne[2]) * int(out_ne[3])


def summarize(nodes: list[tuple[str, float, int]], step_s: list[float], repeats: int) -> dict:
    """nodes: (group, seconds, weight bytes, flops) per node launched alone, over `repeats` node-by-node runs of the
    step; step_s: the whole step's times. -> the child's result (per step: nodes, ms, bytes and flops of each group)."""
    launch = [s for g, s, _, _ in nodes if g in NO_OPS]
    launch_s = statistics.median(launch) if launch else 0.0
    groups: dict[str, dict] = {}
    for group, seconds, nbytes, flops in nodes:
        if group in NO_OPS:
            continue
        g = groups.setdefault(group, {"nodes": 0, "ms": 0.0, "bytes": 0, "flops": 0})
        g["nodes"] += 1
        g["ms"] += max(0.0, seconds - launch_s) * 1e3
        g["bytes"] += nbytes
        g["flops"] += flops
    for g in groups.values():  # per step
        g["nodes"] //= repeats
        g["ms"] /= repeats
        g["bytes"] //= repeats
        g["flops"] //= repeats
    return {"groups": groups, "step_ms": statistics.median(step_s) * 1e3, "launch_us": launch_s * 1e6,
            "sum_ms": sum(g["ms"] for g in groups.values())}


# ---------------------------------------------------------------------------------------------- children
def _node_pass(backend, gf) -> list[tuple[str, float, int]]:
    """Compute gf one node at a time (ggml_graph_view): (group, seconds, weight bytes, flops) per node."""
    import ggml

    nodes = []
    for i in range(ggml.ggml_graph_n_nodes(gf)):
        node = ggml.ggml_graph_node(gf, i)
        op = ggml.ggml_op_desc(node).decode()
        w = node.contents.src[0] if op == "MUL_MAT" else None
        weight = ggml.ggml_get_name(w).decode() if w else None
        view = ggml.ggml_graph_view(gf, i, i + 1)
        t0 = time.perf_counter()
        ggml.ggml_backend_graph_compute(backend, ctypes.pointer(view))
        seconds = time.perf_counter() - t0
        nbytes, flops = (ggml.ggml_nbytes(w), matmul_flops(w.contents.ne[0], node.contents.ne)) if weight else (0, 0)
        nodes.append((group_of(op, weight, ggml.ggml_get_name(node).decode()), seconds, nbytes, flops))
    return nodes


def _timed(compute) -> float:
    t0 = time.perf_counter()
    compute()
    return time.perf_counter() - t0


def _probe(args: dict) -> roof.BandwidthProbe | None:
    """A bandwidth probe with its first reading, taken before the timed steps; None with args['probe_bytes'] 0."""
    if not args.get("probe_bytes"):
        return None
    probe = roof.BandwidthProbe(args["probe_bytes"], args["threads"])
    probe.read()
    return probe


def ours(args: dict, queue) -> None:
    """Child: our GgmlLLM on args['gguf'] (a directory or an LLM file): the cached decode graph, or with
    args['prefill'] a prefill chunk of that many tokens (GgmlLLM.chunk_graph), whole and node by node."""
    try:
        import ggml

        from .ggml_llm import GgmlLLM

        f = open_gguf(find_llm_file(args["gguf"], args["qtype"]), names.ARCH_LLM)
        positions, prefill = args["positions"], args["prefill"]
        llm = GgmlLLM(f, n_ctx=positions + max(prefill, 1) + 64, n_threads=args["threads"])
        ids = random_ids(positions + max(prefill, 1), llm.hp.vocab_size)
        if positions:
            llm.eval_tokens(ids[:positions])
        backend, step_s, nodes, probe = llm.cpu_backend, [], [], None
        if prefill:  # a fresh graph for each compute, its inputs written; n_past stays put
            for _ in range(args["repeats"]):
                for timing_whole in (True, False):
                    meta, gf, _ = llm.chunk_graph(ids[positions:], None, True, False)
                    try:
                        if timing_whole:
                            step_s.append(_timed(lambda: ggml.ggml_backend_graph_compute(backend, gf)))
                        else:
                            nodes += _node_pass(backend, gf)
                    finally:
                        ggml.ggml_free(meta)
        else:
            llm.eval_tokens(ids[positions:positions + 1])  # builds the decode graph (its K/V row is rewritten)
            decode = llm._decode
            probe = _probe(args)
            for _ in range(args["repeats"]):
                decode.load_inputs()  # each pass starts from the step's own inputs
                step_s.append(_timed(lambda: ggml.ggml_backend_graph_compute(backend, decode.gf)))
                decode.load_inputs()
                nodes += _node_pass(backend, decode.gf)
        out = summarize(nodes, step_s, args["repeats"])
        if probe is not None:  # its second reading, after the timed steps
            out["bandwidth_beside_gb_s"] = probe.finish()
        out["engine"], out["file"] = f"ours, {f.path.name}", str(f.path)
        queue.put(out)
    except BaseException as exc:
        queue.put(failure(exc))


def stock(args: dict, queue) -> None:
    """Child: stock llama.cpp (llama-cpp-python) on the plain file in args['gguf']."""
    try:
        from llama_cpp import _ggml

        from .llama_cpp_backend import LlamaCppLLM

        op_desc = _ggml.libggml.ggml_op_desc
        op_desc.argtypes, op_desc.restype = [ctypes.c_void_p], ctypes.c_char_p
        path = find_llm_file(args["gguf"], args["qtype"])
        state = {"on": False, "t0": 0.0, "nodes": []}

        def observe(tensor, ask, user_data):
            if not state["on"]:
                return False
            if ask:  # the scheduler computes the nodes up to this one, then calls again with ask=False
                state["t0"] = time.perf_counter()
                return True
            seconds = time.perf_counter() - state["t0"]
            head = ctypes.cast(tensor, ctypes.POINTER(TensorHead)).contents
            op = op_desc(tensor).decode()
            weight, nbytes, flops = None, 0, 0
            if op == "MUL_MAT" and head.src[0]:
                w = ctypes.cast(head.src[0], ctypes.POINTER(TensorHead)).contents
                weight, nbytes, flops = w.name.decode(), int(w.nb[3] * w.ne[3]), matmul_flops(w.ne[0], head.ne)
            state["nodes"].append((group_of(op, weight), seconds, nbytes, flops))
            return True

        positions, tokens = args["positions"], max(args["prefill"], 1)  # a decode step is one token
        llm = LlamaCppLLM(path, n_ctx=positions + tokens + 64, n_threads=args["threads"], extra_bufts=True,
                          n_batch=max(tokens, 256), cb_eval=observe)
        ids = random_ids(positions + tokens, llm.hp.vocab_size)
        if positions:
            llm.eval_tokens(ids[:positions])
        llm.eval_tokens(ids[positions:])  # warm-up
        probe = None if args["prefill"] else _probe(args)
        step_s = []
        for _ in range(args["repeats"]):
            llm.truncate(positions)
            step_s.append(_timed(lambda: llm.eval_tokens(ids[positions:])))  # the callback answers no to every node
            llm.truncate(positions)
            state["on"] = True
            llm.eval_tokens(ids[positions:])
            state["on"] = False
        out = summarize(state["nodes"], step_s, args["repeats"])
        if probe is not None:  # its second reading, after the timed steps
            out["bandwidth_beside_gb_s"] = probe.finish()
        out["engine"], out["file"] = f"stock, {path.name}", str(path)
        llm.close()
        queue.put(out)
    except BaseException as exc:
        queue.put(failure(exc))


CHILDREN = {"ours": ours, "stock": stock}


# ---------------------------------------------------------------------------------------------- parent
def format_profiles(results: list[dict], positions: int, threads: int, prefill: int = 0) -> str:
    """Groups (rows) by time in the first engine, engines side by side: ms per step, share of the node sum, GB/s."""
    order: list[str] = []
    for r in results:
        for g in sorted(r["groups"], key=lambda k: -r["groups"][k]["ms"]):
            if g not in order:
                order.append(g)
    width = 34
    step = f"a prefill of {prefill} tokens" if prefill else "one decode step"
    rate_name = "GFLOP/s" if prefill else "GB/s"  # a prefill is bound by compute, a decode step by reading weights
    lines = [f"per-op profile of {step} after {positions} cached positions, {threads} threads "
             "(each node computed alone, less the launch cost measured on the graph's no-op nodes)",
             f"{'':<28}" + "".join(f"{r['engine']:>{width}}" for r in results),
             f"{'group':<28}" + "".join(f"{'nodes':>7}{'ms':>9}{'share':>8}{rate_name:>10}" for _ in results)]
    for g in order:
        cells = []
        for r in results:
            v = r["groups"].get(g)
            if v is None:
                cells.append(f"{'-':>7}{'-':>9}{'-':>8}{'':>10}")
                continue
            amount = v["flops"] if prefill else v["bytes"]  # GFLOP/s or GB/s
            rate = f"{amount / v['ms'] / 1e6:.1f}" if amount and v["ms"] > 0 else ""
            cells.append(f"{v['nodes']:>7}{v['ms']:>9.2f}{v['ms'] / r['sum_ms']:>8.0%}{rate:>10}")
        lines.append(f"{g:<28}" + "".join(cells))
    for label, key, fmt in (("sum of the nodes (ms)", "sum_ms", "{:.1f}"), ("whole step (ms)", "step_ms", "{:.1f}"),
                            ("tokens/s, whole step", "tok_s", "{:.1f}"),
                            ("launch cost, subtracted (us)", "launch_us", "{:.1f}"),
                            ("read GB/s before / after", "read_beside", "{}"),
                            ("roofline, weights (ms)", "roofline_ms", "{:.1f}"),
                            ("step, share of roofline", "roofline_share", "{:.0%}")):
        if any(key in r for r in results):
            lines.append(f"{label:<28}" + "".join(f"{fmt.format(r[key]) if key in r else '-':>{width}}"
                                                  for r in results))
    matmul = [sum(v["ms"] for g, v in r["groups"].items() if g.startswith("matmul")) for r in results]
    lines.append(f"{'matmuls, share of the sum':<28}"
                 + "".join(f"{m / r['sum_ms']:>{width}.0%}" for m, r in zip(matmul, results)))
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of `python -m quantize profile`."""
    p.add_argument("--gguf", required=True, help="directory with llm-<qtype>.gguf (or the LLM file)")
    p.add_argument("--qtype", default=None, help="which llm-<qtype>.gguf to profile when the directory has several")
    p.add_argument("--plain-gguf", default=None,
                   help="a plain-phi2 GGUF directory: profiled by ours and by stock llama.cpp (llama-cpp-python)")
    p.add_argument("--positions", type=int, default=128, help="cached positions before the profiled step")
    p.add_argument("--prefill", type=int, default=0,
                   help="profile a prefill chunk of this many tokens instead of a decode step (0: decode)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads")
    p.add_argument("--repeats", type=int, default=5, help="steps profiled (medians and means over them)")
    p.add_argument("--bandwidth-gb", type=float, default=round(bench.PROBE_BYTES / 1e9, 3),
                   help="GB the read-bandwidth probe sums beside each engine's steps; larger values are capped at "
                        "512 MiB, an array held beside the model (0: no probe, no roofline rows)")
    p.add_argument("--child-timeout", type=float, default=900.0,
                   help="seconds an engine's process may take before it is killed and reported")


def profile(args: argparse.Namespace) -> dict[str, dict]:
    base = dict(positions=args.positions, prefill=args.prefill, threads=args.threads, repeats=args.repeats)
    jobs = [("ours", dict(base, gguf=args.gguf, qtype=args.qtype), "ours")]
    if args.plain_gguf:
        jobs.append(("ours", dict(base, gguf=args.plain_gguf, qtype=None), "ours, plain file"))
        if bench.stock_available():
            jobs.append(("stock", dict(base, gguf=args.plain_gguf, qtype=None), "stock llama.cpp"))
        else:
            print("note: llama-cpp-python is not importable; skipping stock llama.cpp", file=sys.stderr)
    probe_bytes = 0 if args.prefill else min(int(args.bandwidth_gb * 1e9), bench.PROBE_BYTES)
    runner = bench.Runner(args.child_timeout, args.threads, probe_bytes)
    results = {}
    for child, job, label in jobs:
        print(f"profiling {label} ...", file=sys.stderr, flush=True)
        results[label] = result = run_child(CHILDREN[child], dict(job, probe_bytes=probe_bytes), args.child_timeout,
                                            label)
        if "bandwidth_beside_gb_s" in result:
            result["read_beside"], read = roof.beside(result["bandwidth_beside_gb_s"])
            if read is None:
                print(f"note: the read bandwidth moved during {label}'s steps ({result['read_beside']}): no roofline "
                      "share for it, run again", file=sys.stderr)
            else:
                result["roofline_ms"] = roof.roofline_ms(runner.weight_bytes(result["file"]), read)
                result["roofline_share"] = result["roofline_ms"] / result["step_ms"]
        if args.prefill and "error" not in result:
            result["tok_s"] = args.prefill / result["step_ms"] * 1e3
    return results


def run(args: argparse.Namespace) -> int:
    check_threads(args.threads)
    if args.positions < 0 or args.prefill < 0 or args.repeats < 1:
        raise UserError("--positions and --prefill must be >= 0, --repeats >= 1")
    if args.child_timeout <= 0 or args.bandwidth_gb < 0:
        raise UserError("--child-timeout must be > 0 and --bandwidth-gb >= 0")
    args.qtype = chosen_qtype(args.gguf, args.qtype, "ggml", quiet=False)  # the file a session would profile
    find_llm_file(args.gguf, args.qtype)  # fail fast on a wrong directory
    if args.plain_gguf:
        find_llm_file(args.plain_gguf)
    results = profile(args)
    failures = [r if r.get("user_error") or r["error"].startswith(label) else dict(r, error=f"{label}: {r['error']}")
                for label, r in results.items() if "error" in r]
    status = report_failures(failures)
    ok = [r for r in results.values() if "error" not in r]
    if ok:
        print(format_profiles(ok, args.positions, args.threads, args.prefill))
    return status
