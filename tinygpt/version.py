"""The version of the tinygpt code that runs, for the records results keep (an evaluation's ``versions.tinygpt``).

From a checkout (a clone run without ``pip install``, or an editable install) it is pyproject.toml's version; from an
installed package, its recorded version. (An evaluation records the checkout's commit beside it, as ``commit``.)
Nothing here imports torch, so recording it costs nothing.
"""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path
from typing import Optional


def tinygpt_version() -> Optional[str]:
    """As the module docstring says; None when neither a checkout nor an installed package says it."""
    checkout = Path(__file__).resolve().parents[1]
    version = _checkout_version(checkout / "pyproject.toml")
    if version is not None:
        return version
    try:
        return metadata.version("tinygpt")
    except metadata.PackageNotFoundError:
        return None


def _checkout_version(pyproject: Path) -> Optional[str]:
    """``[project] version`` of tinygpt's pyproject.toml, or None (no such file, another project's)."""
    try:
        text = pyproject.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    if not re.search(r'(?m)^name\s*=\s*"tinygpt"\s*$', text):
        return None
    found = re.search(r'(?m)^version\s*=\s*"([^"]+)"\s*$', text)
    return found.group(1) if found else None
