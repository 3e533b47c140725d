"""`python -m quantize accuracy`'s flags and output; the comparison itself is gguf_accuracy.compare.

This module imports nothing heavy: `python -m quantize accuracy --help` builds its parser from here without torch,
transformers or the model (8 s before), and `run` imports the comparison only when it runs.
"""

from __future__ import annotations

import argparse

from tinygpt.errors import BrokenModelError, UserError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="the trained model directory the GGUF files were exported from")
    p.add_argument("--gguf", required=True, help="directory with llm-<qtype>.gguf and vision.gguf")
    p.add_argument("--split", required=True, help="held-out synthetic split (DATA/eval)")
    p.add_argument("--limit", type=int, default=200, help="first N records of each task")
    p.add_argument("--qtype", default=None, help="which llm-<qtype>.gguf to use when --gguf has several (q4_k, q4_0, "
                                                 "q8_0, f16, f32; default: the one fastest on this CPU)")
    p.add_argument("--backend", default="auto", choices=["auto", "ggml", "torch"],
                   help="LLM engine of the GGUF side (auto: ggml, else PyTorch)")


def run(args: argparse.Namespace) -> int:
    if args.limit is not None and args.limit <= 0:
        raise UserError(f"--limit must be positive, got {args.limit}")
    from tinygpt.evaluation.health import broken_message
    from tinygpt.tiny.gguf_accuracy import TASKS, compare

    report = compare(args.model, args.gguf, args.split, args.limit, args.qtype, args.backend)
    print(f"{'task':8} {'pytorch':>8} {'gguf':>8} {'retained':>9}")
    for task in TASKS:
        r = report[task]
        print(f"{task:8} {r['pytorch']:8.3f} {r['gguf']:8.3f} {r['retained']:9.1%}")
    if report["problems"]:
        raise BrokenModelError(broken_message(report["problems"], f"accuracy of {args.gguf}"))
    return 0
