"""The one parser from answer text to pixel boxes, shared by chat (drawing) and evaluation (RefCOCO IoU).

Built on `tinygpt.tasks.parse_boxes` (the ``<p>phrase</p> {<x1><y1><x2><y2>}`` wording on the 0-100 grid, boxes
joined with ``<delim>``, braces optional) and `box_to_pixels`. A box off the grid or inverted (x1 > x2 or y1 > y2)
is not a box and is left out.
"""

from __future__ import annotations

from typing import Optional

from ..tasks import box_is_valid, box_to_pixels, parse_boxes

PixelBox = tuple[float, float, float, float]


def answer_boxes(text: str, width: float, height: float) -> list[tuple[Optional[str], PixelBox]]:
    """Every valid box in `text` as (phrase or None, (x1, y1, x2, y2) in pixels of a width x height image)."""
    return [(phrase, tuple(box_to_pixels(box, width, height)))  # type: ignore[misc]
            for phrase, box in parse_boxes(text) if box_is_valid(box)]
