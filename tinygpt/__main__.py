"""python -m tinygpt VERB ...: the same as the ``tinygpt`` console script (tinygpt.cli)."""

import sys

from tinygpt.cli import main

sys.exit(main())
