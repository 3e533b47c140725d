"""The image view: boxes drawn with their phrases (PIL), and the region a user marks by clicking two corners.

Contract:
* `view_scale(size)` is the whole-number factor a small image is enlarged by for display (to at least `VIEW_SIDE`
  pixels on its long side; 1 for larger images); the view is enlarged with nearest-neighbour, so view pixel
  (X, Y) is image pixel (X // scale, Y // scale);
* `render_view(image, boxes, points)` draws pixel boxes of the ORIGINAL image, each with its phrase (or "box k")
  on a coloured tab, and single points as crosses, on an enlarged copy; the image itself is not changed;
* `click_region(region, (X, Y), scale)` is the region text after one click on the view: the first click gives one
  corner ``"x, y"``, the second the box ``"x1, y1, x2, y2"`` (ordered), a third starts a new box;
* `region_marks(region)` is what to draw for a region text: its box, its one corner, or nothing (never raises).
"""

from __future__ import annotations

import math
import re
from typing import Optional, Sequence

from PIL import Image, ImageDraw, ImageFont

VIEW_SIDE = 448
MAX_COORD = 100_000  # typed region numbers are clamped to +-this: PIL cannot draw at 1e30 (nor round infinity)
PALETTE = ((230, 25, 75), (0, 110, 200), (30, 150, 60), (235, 120, 20), (145, 30, 180), (0, 150, 150))
LabeledBox = tuple[Optional[str], tuple[float, float, float, float]]


def view_scale(size: tuple[int, int]) -> int:
    return max(1, math.ceil(VIEW_SIDE / max(1, max(size))))


def _numbers(text: str | None) -> list[int]:
    return [round(min(max(float(v), -MAX_COORD), MAX_COORD)) for v in re.findall(r"-?\d+(?:\.\d+)?", text or "")]


def click_region(region: str | None, point: Sequence[float], scale: int) -> str:
    x, y = int(point[0]) // scale, int(point[1]) // scale
    values = _numbers(region)
    if len(values) != 2:
        return f"{x}, {y}"
    x1, y1 = values
    return f"{min(x, x1)}, {min(y, y1)}, {max(x, x1)}, {max(y, y1)}"


def region_marks(region: str | None) -> tuple[list[LabeledBox], list[tuple[int, int]]]:
    values = _numbers(region)
    if len(values) == 4:
        x1, y1, x2, y2 = values
        return [("region", (min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)))], []
    if len(values) == 2:
        return [], [(values[0], values[1])]
    return [], []


def render_view(image: Image.Image, boxes: Sequence[LabeledBox] = (),
                points: Sequence[tuple[float, float]] = ()) -> Image.Image:
    scale = view_scale(image.size)
    view = image.convert("RGB")
    if scale > 1:
        view = view.resize((view.width * scale, view.height * scale), Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(view)
    line = max(2, round(min(view.size) / 150))
    try:
        font = ImageFont.load_default(size=max(12, min(view.size) // 28))
    except TypeError:  # Pillow < 10.1 has only the small fixed bitmap font
        font = ImageFont.load_default()
    for k, (label, box) in enumerate(boxes):
        colour = PALETTE[k % len(PALETTE)]
        x1, y1, x2, y2 = (v * scale for v in box)
        draw.rectangle((x1, y1, x2, y2), outline=colour, width=line)
        text = label or f"box {k + 1}"
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        tab_w, tab_h = right - left + 2 * line, bottom - top + 2 * line
        tab_y = y1 - tab_h if y1 - tab_h >= 0 else y1
        tab_x = min(max(0, x1), max(0, view.width - tab_w))
        draw.rectangle((tab_x, tab_y, tab_x + tab_w, tab_y + tab_h), fill=colour)
        draw.text((tab_x + line - left, tab_y + line - top), text, fill=(255, 255, 255), font=font)
    for x, y in points:
        cx, cy, arm = x * scale + scale // 2, y * scale + scale // 2, 4 * line
        draw.line((cx - arm, cy, cx + arm, cy), fill=PALETTE[0], width=line)
        draw.line((cx, cy - arm, cx, cy + arm), fill=PALETTE[0], width=line)
    return view
