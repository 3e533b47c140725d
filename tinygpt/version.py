"""The version of the tinygpt code that runs, for the records results keep (an evaluation's ``versions.tinygpt``).

From a checkout (a clone run without ``pip install``, or an editable install) it is pyproject.toml's version with the
commit as a local label, ``0.1.0+g18dd2f7``, read from ``.git`` without running git; from an installed package, its
recorded version. Nothing here imports torch, so recording it costs nothing.
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
        commit = _git_commit(checkout / ".git")
        return version + (f"+g{commit[:7]}" if commit else "")
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


def _git_commit(git: Path) -> Optional[str]:
    """HEAD's commit of a checkout's ``.git`` (a directory or a ``gitdir:`` file; a detached HEAD, a branch ref or
    packed-refs), or None."""
    try:
        if git.is_file() and git.read_text(encoding="utf-8").startswith("gitdir: "):
            git = (git.parent / git.read_text(encoding="utf-8")[len("gitdir: "):].strip()).resolve()
        head = (git / "HEAD").read_text(encoding="utf-8").strip()
        if not head.startswith("ref: "):
            return head if re.fullmatch(r"[0-9a-f]{40}", head) else None
        ref = head[len("ref: "):]
        if (git / ref).is_file():
            return (git / ref).read_text(encoding="utf-8").strip() or None
        for line in (git / "packed-refs").read_text(encoding="utf-8").splitlines():
            if line.endswith(f" {ref}"):
                return line.split()[0]
    except (OSError, UnicodeDecodeError):
        return None
    return None
