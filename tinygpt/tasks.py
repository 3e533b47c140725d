"""Task identifiers, their instruction prompts, and the box-in-text format.

One module shared by the data loaders, evaluation and chat, so that all three speak the same text:

* task identifiers (MiniGPT-v2 style): ``[vqa]``, ``[caption]``, ``[refer]``, ``[identify]``, ``[grounding]``,
  ``[detection]``; the prompt lists below keep the original wording.
* boxes are written ``{<x1><y1><x2><y2>}`` with each coordinate ``int(v / W_or_H * 100)`` on a 0-100 grid;
  a phrase and its box are written ``<p>phrase</p> {<x1><y1><x2><y2>}``; several boxes are joined with ``<delim>``.

This module imports nothing from the rest of the package.
"""

from __future__ import annotations

import re
from typing import Optional

# --- image placeholders -------------------------------------------------------------------------------------------

IMAGE_PLACEHOLDER = "<ImageHere>"
"""Where the 32 visual embeddings of one image are spliced in; exactly one per image."""

IMAGE_TAG = "<Img><ImageHere></Img>"
"""How the original wraps one image inside an instruction."""


def wrap_instruction(instruction: str) -> str:
    """The stage-4 wording of a single-image instruction: ``"<Img><ImageHere></Img> {instruction} "``."""
    return f"{IMAGE_TAG} {instruction} "


# --- task identifiers and prompts -----------------------------------------------------------------------------------

TASKS = ("vqa", "caption", "refer", "identify", "grounding", "detection")


def task_tag(task: str) -> str:
    """``"vqa"`` -> ``"[vqa]"``; raises ValueError for an unknown task."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    return f"[{task}]"


_TAG_RE = re.compile(r"^\s*\[(" + "|".join(TASKS) + r")\]\s*")


def split_task_tag(text: str) -> tuple[Optional[str], str]:
    """``"[refer] where is the cat"`` -> ``("refer", "where is the cat")``; no tag -> ``(None, text)``."""
    match = _TAG_RE.match(text)
    if not match:
        return None, text
    return match.group(1), text[match.end():]


VQA_PROMPTS = (
    "[vqa] {}",
    "[vqa] Based on the image, respond to this question with a short answer: {}",
)

CAPTION_INSTRUCTIONS = (
    "Briefly describe this image.",
    "Provide a concise depiction of this image.",
    "Present a short description of this image.",
    "Summarize this image in a few words.",
    "A short image caption:",
    "A short image description:",
    "A photo of ",
    "An image that shows ",
    "Write a short description for the image. ",
    "Write a description for the photo.",
    "Provide a description of what is presented in the photo.",
    "Briefly describe the content of the image.",
    "Can you briefly explain what you see in the image?",
    "Could you use a few words to describe what you perceive in the photo?",
    "Please provide a short depiction of the picture.",
    "Using language, provide a short account of the image.",
    "Use a few words to illustrate what is happening in the picture.",
)
"""The 17 short-caption instructions; the original formats them as ``"[caption] {}"``."""

CAPTION_PROMPTS = tuple("[caption] " + text for text in CAPTION_INSTRUCTIONS)

REFER_PROMPTS = (
    "[refer] {}",
    "[refer] give me the location of {}",
    "[refer] where is {} ?",
    "[refer] from this image, tell me the location of {}",
    "[refer] the location of {} is",
    "[refer] could you tell me the location for {} ?",
    "[refer] where can I locate the {} ?",
)

IDENTIFY_PROMPTS = (
    "[identify] {}",
    "[identify] what object is in this location {}",
    "[identify] identify the object present at this location {}",
    "[identify] what is it in {}",
    "[identify] describe this object in {}",
    "[identify] this {} is",
    "[identify] the object in {} is",
)

GROUNDING_PROMPTS = (
    "[grounding] please describe this image in details",
    "[grounding] describe this image as detailed as possible",
    "[grounding] summarize this image in details",
    "[grounding] give a thorough description of what you see in this image",
)

DETECTION_PROMPTS = ("[detection] {}",)

PROMPTS = {
    "vqa": VQA_PROMPTS,
    "caption": CAPTION_PROMPTS,
    "refer": REFER_PROMPTS,
    "identify": IDENTIFY_PROMPTS,
    "grounding": GROUNDING_PROMPTS,
    "detection": DETECTION_PROMPTS,
}
"""Prompt list per task; entries with ``{}`` take the question / phrase / box text."""

# --- boxes as text --------------------------------------------------------------------------------------------------

BOX_GRID = 100
DELIM = "<delim>"


def _grid(value: float, extent: float) -> int:
    return max(0, min(BOX_GRID, int(value / extent * BOX_GRID)))


def format_box(box_xyxy: tuple[float, float, float, float], width: float, height: float) -> str:
    """Pixel box (x1, y1, x2, y2) in an image of ``width`` x ``height`` -> ``"{<x1><y1><x2><y2>}"`` on 0-100.

    Each coordinate is ``int(v / W_or_H * 100)`` (truncation, as the original), clamped to 0..100.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    x1, y1, x2, y2 = box_xyxy
    return "{<%d><%d><%d><%d>}" % (_grid(x1, width), _grid(y1, height), _grid(x2, width), _grid(y2, height))


def format_phrase_box(phrase: str, box_text: str) -> str:
    """``"<p>{phrase}</p> {box_text}"``, the phrase-to-box answer wording."""
    return f"<p>{phrase}</p> {box_text}"


_TOKEN_RE = re.compile(
    r"<p>(?P<phrase>.*?)</p>"
    r"|\{?<(?P<x1>\d+)><(?P<y1>\d+)><(?P<x2>\d+)><(?P<y2>\d+)>\}?"
    r"|(?P<delim><delim>)"
    r"|(?P<space>\s+)"
    r"|(?P<other>.)",
    re.DOTALL,
)


def parse_boxes(text: str) -> list[tuple[Optional[str], tuple[int, int, int, int]]]:
    """Every box in ``text`` with the phrase it belongs to.

    ``"<p>a cat</p> {<1><2><3><4>}<delim>{<5><6><7><8>} and {<0><0><9><9>}"`` ->
    ``[("a cat", (1,2,3,4)), ("a cat", (5,6,7,8)), (None, (0,0,9,9))]``. A box belongs to the nearest preceding
    ``<p>..</p>`` when only whitespace, ``<delim>`` and other boxes lie between them. Braces are optional, so four bare
    ``<x><y><x><y>`` integers (a common model output) parse too. Coordinates are returned as written (0-100 grid).
    """
    found: list[tuple[Optional[str], tuple[int, int, int, int]]] = []
    phrase: Optional[str] = None
    for match in _TOKEN_RE.finditer(text):
        kind = match.lastgroup
        if kind == "phrase":
            phrase = match.group("phrase").strip()
        elif kind == "y2":  # the box alternative; lastgroup is its last named group
            box = tuple(int(match.group(k)) for k in ("x1", "y1", "x2", "y2"))
            found.append((phrase, box))  # type: ignore[arg-type]
        elif kind == "other":
            phrase = None
    return found


def box_is_valid(box100: tuple[int, int, int, int]) -> bool:
    """True when the grid box lies on 0..100 and is ordered (x1 <= x2, y1 <= y2)."""
    x1, y1, x2, y2 = box100
    return 0 <= x1 <= x2 <= BOX_GRID and 0 <= y1 <= y2 <= BOX_GRID


def box_to_pixels(box100: tuple[float, float, float, float], width: float, height: float) -> tuple[float, ...]:
    """Grid box (0-100) -> pixel box (x1, y1, x2, y2) in an image of ``width`` x ``height``."""
    x1, y1, x2, y2 = box100
    return (x1 / BOX_GRID * width, y1 / BOX_GRID * height, x2 / BOX_GRID * width, y2 / BOX_GRID * height)


def iou(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> float:
    """Intersection over union of two (x1, y1, x2, y2) boxes; 0.0 when either has no area."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    area_a = max(0.0, a[2] - a[0]) * max(0.0, a[3] - a[1])
    area_b = max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1])
    union = area_a + area_b - inter
    return inter / union if union > 0 else 0.0
