"""The gradio chat demo:  python demo.py [--cfg-path eval_configs/tiny.yaml] [--host H] [--port P] [--share]

Serves a multimodal chat (images, tasks, boxes drawn, streaming) over the model a launch config names; the default
is the tiny model that the quick start's ``python train.py`` makes. A shim: the command lives in tinygpt/demo/cli.py,
which the installed ``tinygpt demo`` runs too (docs/demo.md).
"""

from __future__ import annotations

import sys

from tinygpt.demo.cli import main, parse_args

__all__ = ["main", "parse_args"]

if __name__ == "__main__":
    sys.exit(main())
