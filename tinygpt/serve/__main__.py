"""``python -m tinygpt.serve`` = ``tinygpt serve`` (tinygpt.serve.cli)."""

import sys

from .cli import main

sys.exit(main())
