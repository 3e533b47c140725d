"""`python -m quantize {export,random,chat,bench,profile,accuracy}`: GGUF export and CPU inference.

    python -m quantize export --model DIR --out DIR [--qtype q4_k|q4_0|q8_0|f16|f32]
    python -m quantize random --out DIR --size full|tiny [--qtype q4_k] [--seed 0] [--plain]
    python -m quantize chat   --gguf DIR [--image PATH ...] [--prompt TEXT]  (interactive: /image /reset /stats /quit)
    python -m quantize bench  --gguf DIR [--image PATH] [--plain-gguf DIR]
    python -m quantize profile --gguf DIR [--plain-gguf DIR] [--positions 128]
    python -m quantize accuracy --model DIR --gguf DIR --split DATA/eval [--limit N]

A mistake the user can fix prints `error: <message>` on stderr and exits with status 2; results that are not
believable (``tinygpt.evaluation.health``) are printed, then an `error:` line, and the exit status is 3. Ctrl-C prints
`interrupted` and exits with status 130. `python -m quantize COMMAND --help` lists each command's flags and defaults.
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable

from tinygpt.errors import report_errors


def _export(args: argparse.Namespace) -> int:
    from .export import export_model

    export_model(args.model, args.out, qtype=args.qtype, progress=not args.quiet)
    return 0


def _random(args: argparse.Namespace) -> int:
    from .random_model import write_random_model

    write_random_model(args.out, size=args.size, qtype=args.qtype, seed=args.seed, extra_norms=not args.plain,
                       progress=not args.quiet)
    return 0


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows "(default: X)" after a flag's help, except for switches, flags without a default (None, empty) and help
    that already says it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.nargs == 0 or action.default is None or action.default == [] or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def _export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="saved tinygpt model directory (config.json + weights)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--qtype", default="q4_k", help="LLM weight type: q4_k, q4_0, q8_0, f16 or f32 (any case)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=_export)


def _random_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--size", default="tiny", help="full (TinyGPT-V shapes) or tiny")
    p.add_argument("--qtype", default="q4_k", help="LLM weight type: q4_k, q4_0, q8_0, f16 or f32")
    p.add_argument("--seed", type=int, default=0, help="random seed of the weights")
    p.add_argument("--plain", action="store_true", help="plain Phi-2 (no q/k LayerNorm, no post-attention RMSNorm)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=_random)


def _command_module(p: argparse.ArgumentParser, module) -> None:
    """A command whose module defines ``add_arguments`` and ``run``. The four below import theirs only when that
    command is parsed: they import torch, transformers or ggml (seconds), which ``--help`` does not need."""
    module.add_arguments(p)
    p.set_defaults(func=module.run)


def _chat_arguments(p: argparse.ArgumentParser) -> None:
    from . import chat

    _command_module(p, chat)


def _bench_arguments(p: argparse.ArgumentParser) -> None:
    from . import bench

    _command_module(p, bench)


def _profile_arguments(p: argparse.ArgumentParser) -> None:
    from . import profile_ops

    _command_module(p, profile_ops)


def _accuracy_arguments(p: argparse.ArgumentParser) -> None:
    from tinygpt.tiny import gguf_accuracy_cli  # the twin's tool, registered here (entry point)

    _command_module(p, gguf_accuracy_cli)


COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None]]] = {
    "export": ("write llm-<qtype>.gguf + vision.gguf from a trained model directory", _export_arguments),
    "random": ("write a random-weight GGUF pair of the real shapes (benchmarks, tests)", _random_arguments),
    "chat": ("chat with an exported model on the CPU (one --prompt, or interactively)", _chat_arguments),
    "bench": ("load / image / prefill / decode timings, peak memory and the memory roofline", _bench_arguments),
    "profile": ("per-op profile of one decode step, ours and stock llama.cpp side by side", _profile_arguments),
    "accuracy": ("held-out VQA / grounding accuracy of the GGUF runtime vs the PyTorch model", _accuracy_arguments),
}


def build_parser(prog: str = "python -m quantize", only: str | None = None) -> argparse.ArgumentParser:
    """Every command with its flags; with ``only``, just that command's flags (the others are listed, not imported:
    ``python -m quantize --help`` and ``bench --help`` need no other command's module)."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (summary, add_arguments) in COMMANDS.items():
        p = sub.add_parser(name, help=summary, description=summary, formatter_class=_HelpFormatter)
        if only is None or only == name:
            add_arguments(p)
    return parser


def main(argv: list[str] | None = None, prog: str = "python -m quantize") -> int:
    """``prog``: the name usage lines print (``tinygpt`` when run as ``tinygpt chat`` etc., tinygpt.cli)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(prog, only=argv[0] if argv else "").parse_args(argv)
    return report_errors(lambda: args.func(args))  # Ctrl-C included: one `interrupted` line, exit 130


if __name__ == "__main__":
    sys.exit(main())
