"""Evaluate a model on a benchmark:  python evaluate.py --cfg-path eval_configs/gqa.yaml [--options key=value ...]

One config per benchmark in eval_configs/ (gqa, vsr, iconqa, vizwiz, hateful_memes, okvqa, vqav2, refcoco, refcoco+,
refcocog, pope, shapes); by default they run the quick start's tiny model on synthetic files in each benchmark's
layout. Resumable (a rerun continues), ``--restart`` starts over. A shim: the command lives in
tinygpt/cli/evaluate.py, which the installed ``tinygpt evaluate`` runs too (docs/evaluation.md).
"""

from __future__ import annotations

import sys

from tinygpt.cli.evaluate import main, parse_args

__all__ = ["main", "parse_args"]

if __name__ == "__main__":
    sys.exit(main())
