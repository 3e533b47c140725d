"""python -m tinygpt.tiny.synthetic --out DIR [--seed N] [--scale tiny|small]: write the synthetic shapes datasets."""

from __future__ import annotations

import argparse
import sys
import time

from tinygpt.tiny.synthetic import SCALES, generate
from tinygpt.errors import report_errors


def main(argv: list[str] | None = None, prog: str = "python -m tinygpt.tiny.synthetic") -> int:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Write seeded synthetic shapes datasets in the real formats of stages 1-4 "
                    "(webdataset, cc_sbu_align, LLaVA, RefCOCO, VQA, ...) plus held-out evaluation splits.")
    parser.add_argument("--out", required=True, help="output directory (replaced if it holds an earlier output)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0); same seed -> same bytes")
    parser.add_argument("--scale", choices=sorted(SCALES), default="tiny", help="dataset sizes (default tiny)")
    parser.add_argument("--pretrain-size", type=int, default=112, help="image side for stages 1-3 (default 112)")
    parser.add_argument("--instruct-size", type=int, default=224,
                        help="image side for stage 4, multi-image and eval sets (default 224)")
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    args = parser.parse_args(argv)
    return report_errors(lambda: _write(args))


def _write(args: argparse.Namespace) -> int:
    start = time.monotonic()
    manifest = generate(args.out, seed=args.seed, scale=args.scale, pretrain_size=args.pretrain_size,
                        instruct_size=args.instruct_size, progress=not args.quiet)
    if not args.quiet:
        for name, counts in manifest["roots"].items():
            print(f"{name:24s} {', '.join(f'{k}={v}' for k, v in counts.items())}")
        print(f"wrote {args.out} (seed {args.seed}, scale {args.scale}) in {time.monotonic() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
