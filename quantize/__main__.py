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


def build_parser(prog: str = "python -m quantize") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, summary: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=summary, description=summary, formatter_class=_HelpFormatter)

    p = command("export", "write llm-<qtype>.gguf + vision.gguf from a trained model directory")
    p.add_argument("--model", required=True, help="saved tinygpt model directory (config.json + weights)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--qtype", default="q4_k", help="LLM weight type: q4_k, q4_0, q8_0, f16 or f32 (any case)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=_export)

    p = command("random", "write a random-weight GGUF pair of the real shapes (benchmarks, tests)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--size", default="tiny", help="full (TinyGPT-V shapes) or tiny")
    p.add_argument("--qtype", default="q4_k", help="LLM weight type: q4_k, q4_0, q8_0, f16 or f32")
    p.add_argument("--seed", type=int, default=0, help="random seed of the weights")
    p.add_argument("--plain", action="store_true", help="plain Phi-2 (no q/k LayerNorm, no post-attention RMSNorm)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=_random)

    from tinygpt.tiny import gguf_accuracy as accuracy  # the twin's tool, registered here (entry point)

    from . import bench, chat

    p = command("chat", "chat with an exported model on the CPU (one --prompt, or interactively)")
    chat.add_arguments(p)
    p.set_defaults(func=chat.run)

    p = command("bench", "load / image / prefill / decode timings, peak memory and the memory roofline")
    bench.add_arguments(p)
    p.set_defaults(func=bench.run)

    from . import profile_ops

    p = command("profile", "per-op profile of one decode step, ours and stock llama.cpp side by side")
    profile_ops.add_arguments(p)
    p.set_defaults(func=profile_ops.run)

    p = command("accuracy", "held-out VQA / grounding accuracy of the GGUF runtime vs the PyTorch model")
    accuracy.add_arguments(p)
    p.set_defaults(func=accuracy.run)
    return parser


def main(argv: list[str] | None = None, prog: str = "python -m quantize") -> int:
    """``prog``: the name usage lines print (``tinygpt`` when run as ``tinygpt chat`` etc., tinygpt.cli)."""
    args = build_parser(prog).parse_args(argv)
    return report_errors(lambda: args.func(args))  # Ctrl-C included: one `interrupted` line, exit 130


if __name__ == "__main__":
    sys.exit(main())
