"""The synthetic shapes suite's metrics (pure functions; the suite itself is tinygpt.evaluation.benchmarks.shapes).

* caption: token F1 against the best reference (lower-cased, punctuation and articles removed), exact match, and
  attribute recall = the share of reference objects whose "size colour shape" phrase appears in the caption;
* VQA: exact match after normalisation (case, punctuation, articles, number words -> digits);
* grounding: the first box parsed from the answer (``tinygpt.tasks.parse_boxes``), scaled to pixels, against the
  reference box; a hit when the IoU is above ``IOU_THRESHOLD`` (the RefCOCO protocol).

These are the suite's own rules (simpler than the official VQA normalisation of tinygpt.evaluation.normalize, and
"no" / "none" count as "0" because the suite's count questions are answered that way).
"""

from __future__ import annotations

import re
from collections import Counter

from ..tasks import box_to_pixels, iou, parse_boxes

IOU_THRESHOLD = 0.5

_ARTICLES = {"a", "an", "the"}
_NUMBERS = {"zero": "0", "no": "0", "none": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
            "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_PUNCTUATION = re.compile(r"[^\w\s]")
_OBJECT = re.compile(r"\b(small|large) (\w+) (circle|square|triangle|cross)\b")


def normalize_text(text: str) -> list[str]:
    """Lower-case words without punctuation and articles."""
    words = _PUNCTUATION.sub(" ", text.lower()).split()
    return [w for w in words if w not in _ARTICLES]


def normalize_answer(text: str) -> str:
    """VQA normalisation: ``normalize_text`` plus number words as digits ("Two." -> "2")."""
    return " ".join(_NUMBERS.get(w, w) for w in normalize_text(text))


def vqa_correct(prediction: str, answers: list[str]) -> bool:
    target = {normalize_answer(a) for a in answers}
    return normalize_answer(prediction) in target


def token_f1(prediction: str, reference: str) -> float:
    pred, ref = normalize_text(prediction), normalize_text(reference)
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def attribute_recall(prediction: str, reference: str) -> float:
    """Share of the reference's "size colour shape" objects named in the prediction (1.0 if it names none)."""
    wanted = [" ".join(m) for m in _OBJECT.findall(reference.lower())]
    if not wanted:
        return 1.0
    said = " ".join(normalize_text(prediction))
    return sum(phrase in said for phrase in wanted) / len(wanted)


def caption_scores(prediction: str, references: list[str]) -> dict:
    """f1 and attribute_recall against the reference with the best F1; exact: 1.0 when any reference matches."""
    best = max(references, key=lambda r: token_f1(prediction, r))
    return {"f1": token_f1(prediction, best),
            "exact": float(" ".join(normalize_text(prediction)) in {" ".join(normalize_text(r)) for r in references}),
            "attribute_recall": attribute_recall(prediction, best)}


def grounding_iou(prediction: str, box_xywh: list[float], width: float, height: float) -> float | None:
    """IoU of the first box in ``prediction`` with the reference box (COCO [x, y, w, h] in pixels of a
    ``width`` x ``height`` image); None when the answer has no box."""
    boxes = parse_boxes(prediction)
    if not boxes:
        return None
    x, y, w, h = box_xywh
    return iou(box_to_pixels(boxes[0][1], width, height), (x, y, x + w, y + h))
