"""Caption text processing (the original's ``blip_caption`` processor) and the alignment prompt list."""

from __future__ import annotations

import re
from pathlib import Path

from tinygpt.errors import UserError
from tinygpt.tasks import IMAGE_PLACEHOLDER

_PUNCTUATION = re.compile(r'[.!"()*#:;~]')
_SPACES = re.compile(r"\s{2,}")

ALIGNMENT_PROMPTS_PATH = Path(__file__).resolve().parent.parent / "prompts" / "alignment.txt"


def blip_caption(text: str, prompt: str = "", max_words: int = 50) -> str:
    """``prompt + pre_caption(text)``: lower-case, each of ``.!"()*#:;~`` becomes a space, runs of whitespace
    collapse to one space, surrounding spaces/newlines are stripped, and only the first ``max_words`` words are kept."""
    text = _PUNCTUATION.sub(" ", text.lower())
    text = _SPACES.sub(" ", text)
    text = text.rstrip("\n").strip(" ")
    words = text.split(" ")
    if len(words) > max_words:
        text = " ".join(words[:max_words])
    return prompt + text


def load_prompt_list(path: str | Path | None = None) -> list[str]:
    """The lines of a prompt file that contain ``<ImageHere>`` (the original's filter); default: the shipped
    ``tinygpt/prompts/alignment.txt``. Raises UserError when the file is missing or has no usable line."""
    path = Path(path) if path is not None else ALIGNMENT_PROMPTS_PATH
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise UserError(f"{path}: cannot read prompt file ({exc.strerror or exc})") from None
    prompts = [line for line in lines if IMAGE_PLACEHOLDER in line]
    if not prompts:
        raise UserError(f"{path}: no prompt line contains {IMAGE_PLACEHOLDER}")
    return prompts
