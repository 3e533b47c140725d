"""The ``tinygpt`` console script: one front door whose verbs are the existing entry points.

    tinygpt train [--cfg-path YAML] ...   = python train.py ...
    tinygpt build --llm ... --out DIR     = python -m tinygpt.weights.build ...
    tinygpt synth --out DIR               = python -m tinygpt.tiny.synthetic ...
    tinygpt export|random|bench|profile|accuracy ...   = python -m quantize export|random|bench|profile|accuracy ...
    tinygpt chat --cfg-path YAML | --gguf DIR | --model DIR   the chat engine in the terminal (tinygpt.chat.cli)
    tinygpt ceiling [--check]             = python -m tinygpt.tiny.ceiling_check ...
    tinygpt demo --cfg-path YAML          = python demo.py --cfg-path YAML (gradio)
    tinygpt serve --cfg-path YAML         the OpenAI-compatible server (tinygpt.serve)
    tinygpt evaluate --cfg-path YAML      = python evaluate.py --cfg-path eval_configs/BENCHMARK.yaml ...

Each verb hands the rest of the command line, unchanged, to that entry point's ``main`` (its own flags, messages and
exit codes: 0, 2 for a user error, 3 for results that are not believable; tinygpt.errors), so the documented forms and
the verbs cannot drift apart. Only the program name in usage lines differs ("tinygpt chat" instead of
"python -m quantize chat"). The verb modules are imported only when their verb runs, so ``tinygpt --help`` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import NamedTuple


class Verb(NamedTuple):
    module: str  # its main(argv, prog=...) is called with the rest of the command line
    summary: str  # one line for `tinygpt --help`
    quantize_command: bool = False  # a `python -m quantize` subcommand: main([verb, *rest], prog="tinygpt")


VERBS: dict[str, Verb] = {
    "train": Verb("tinygpt.cli.train", "train a stage from its YAML (no arguments: the tiny default)"),
    "build": Verb("tinygpt.weights.build", "assemble stage 1's start model from Phi-2 + BLIP-2/EVA"),
    "synth": Verb("tinygpt.tiny.synthetic.__main__", "write the seeded synthetic shapes datasets"),
    "export": Verb("quantize.__main__", "export a trained model directory to a GGUF pair", True),
    "random": Verb("quantize.__main__", "write a random-weight GGUF pair (benchmarks, tests)", True),
    "chat": Verb("tinygpt.chat.cli", "chat in the terminal with a trained or exported model (the chat engine)"),
    "bench": Verb("quantize.__main__", "time a GGUF model on the CPU (load, prefill, decode, memory)", True),
    "profile": Verb("quantize.__main__", "per-op profile of one CPU decode step, ours and stock llama.cpp", True),
    "accuracy": Verb("quantize.__main__", "held-out accuracy of the GGUF runtime vs PyTorch", True),
    "ceiling": Verb("tinygpt.tiny.ceiling_check", "re-measure the tiny LLM's ceiling (drift canary)"),
    "demo": Verb("tinygpt.demo.cli", "the gradio chat demo (= python demo.py --cfg-path eval_configs/NAME.yaml)"),
    "serve": Verb("tinygpt.serve.cli", "an OpenAI-compatible chat server over a trained or exported model"),
    "evaluate": Verb("tinygpt.cli.evaluate", "score a model on a benchmark (GQA, VSR, ..., shapes; resumable)"),
}


def build_parser() -> argparse.ArgumentParser:
    """The top level only: it lists the verbs and rejects unknown ones; each verb parses its own flags."""
    parser = argparse.ArgumentParser(
        prog="tinygpt", description="Train TinyGPT-V-style vision-language models and run them as GGUF on a CPU.",
        epilog="`tinygpt VERB --help` shows a verb's own flags.")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for name, verb in VERBS.items():
        sub.add_parser(name, help=verb.summary, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in VERBS:
        build_parser().parse_args(argv)  # --help, no verb or an unknown verb: prints and exits (0 or 2)
        return 2  # not reached: every argv that gets here is one of the cases above
    name, rest = argv[0], argv[1:]
    verb = VERBS[name]
    entry = importlib.import_module(verb.module).main
    if verb.quantize_command:
        return entry([name, *rest], prog="tinygpt")
    return entry(rest, prog=f"tinygpt {name}")
