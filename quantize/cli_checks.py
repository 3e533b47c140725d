"""Checks of the flags several `python -m quantize` commands share (chat, bench, profile), in one place so every
command words them the same: UserError naming the flag."""
from __future__ import annotations

import math
import os
from pathlib import Path

from tinygpt.errors import UserError


def check_threads(threads: int) -> None:
    """--threads must be at least 1."""
    if threads < 1:
        raise UserError(f"--threads must be >= 1, got {threads}")


def check_ctx(ctx: int | None, llm_path=None, limit: int | None = None) -> None:
    """--ctx (None: the model's own) must be at least 1 and, given the LLM file's context length, at most that."""
    if ctx is None:
        return
    if ctx < 1:
        raise UserError(f"--ctx must be >= 1, got {ctx}")
    if limit is not None and ctx > limit:
        raise UserError(f"--ctx {ctx} is larger than the model's context length {limit} ({llm_path}); give at most "
                        f"--ctx {limit}")


def check_finite(flag: str, value: float) -> None:
    """A float flag must be a number (not nan or inf)."""
    if not math.isfinite(value):
        raise UserError(f"{flag} must be a finite number, got {value}")


def check_image_file(path: str | os.PathLike) -> Path:
    """The path of an image file; UserError when it is missing or a directory (before anything is loaded)."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path}: is a directory, not an image file")
    if not path.is_file():
        raise UserError(f"{path}: image file not found")
    return path
