"""Train one TinyGPT-V stage:  python train.py --cfg-path train_configs/stage1.yaml [--options key=value ...]

With no --cfg-path it runs the embedded tiny default: synthetic data, tiny backbones, tiny stages 1-4 and their
evaluation, on any CPU in minutes (tinygpt.tiny.recipe). Multi-GPU: accelerate launch train.py --cfg-path ...
A shim: the command lives in tinygpt/cli/train.py, which the installed ``tinygpt train`` runs too.
"""

from __future__ import annotations

import sys

from tinygpt.cli.train import main, parse_args

__all__ = ["main", "parse_args"]

if __name__ == "__main__":
    sys.exit(main())
