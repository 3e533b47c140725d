"""The original TinyGPT-V scorers, exactly as its evaluation scripts applied them (``--scoring tinygpt-v-compat``).

They exist so a released checkpoint can be checked against the paper's numbers and the gap to the official metrics
shown; each docstring says what the rule gets wrong. The sources are TinyGPT-V's root ``eval_vqa.py`` (GQA, VSR,
VizWiz, IconQA, Hateful Memes) and ``eval_ref.py`` with MiniGPT-v2's ``computeIoU`` (RefCOCO). Per-sample functions;
a benchmark averages them (`metrics.mean`) as the original did (count / total).
"""

from __future__ import annotations

import re
from typing import Optional, Sequence, Union

from .benchmark import Box
from .metrics import choice_from_scores


def gqa_compat(prediction: str, label: str) -> float:
    """1.0 when ``label in prediction.lower()``: a substring test, not exact match.

    Wrong because any answer that mentions the label scores: "no" is found in "i don't know" and in "not sure",
    "red" in "red and blue", "2" in "12"; an answer listing every colour is right on every colour question.
    (MiniGPT-v2's script compared ``answer.lower() == label``.)
    """
    return 1.0 if label in prediction.lower() else 0.0


def vsr_compat(prediction: str, label: str) -> float:
    """1.0 when ``label.lower() in prediction.lower()`` with label "true" or "false".

    Wrong because "true or false" (or "it is not true, it is false") contains both labels, so it scores on every item:
    a model that repeats the prompt's "true or false" gets 100%. (The ``eval_scripts`` variant also counted "yes" /
    "no", adding a second point to some items; the root script, reproduced here, did not.)
    """
    return 1.0 if label.lower() in prediction.lower() else 0.0


def _strip_stop(prediction: str) -> str:
    """The answer as the original cut it: before any ``###``, after any ``Assistant:``, stripped."""
    return prediction.split("###")[0].split("Assistant:")[-1].strip()


def vizwiz_compat(prediction: str, answers: Sequence[str]) -> float:
    """``min(#references that equal, contain or are contained in the prediction / 3, 1)``, lower-cased only.

    The references are joined with ``_`` and split on ``_`` again (as the original's data loader and scorer did), so a
    reference containing ``_`` counts as several. Wrong because an empty prediction is contained in every reference
    (``"" in s``) and scores 1.0 on every question; a one-letter answer "a" matches every reference with an "a" in
    it; there is no normalisation of punctuation, numbers or articles and no leave-one-out averaging.
    """
    answer = _strip_stop(prediction).lower()
    references = "_".join(answers).split("_")
    count = sum(1 for gt in references if gt.lower() == answer or gt.lower() in answer or answer in gt.lower())
    return min(count / 3.0, 1.0)


def iconqa_compat_candidates(choices: Sequence[str]) -> list[str]:
    """The candidates the original actually scored: the choices joined with ``_`` (its data loader), split on ``|``.

    With no ``|`` in any choice that is one candidate, the joined string itself: ``("3", "5") -> ["3_5"]``.
    """
    return "_".join(choices).split("|")


def iconqa_compat(choices: Sequence[str], answer: Union[int, str],
                  candidate_scores: Optional[Sequence[float]] = None) -> float:
    """The original's IconQA rule: the best of `iconqa_compat_candidates` (index 0 when there is one) compared to
    the answer by containment, ``str(chosen) in str(answer)`` or ``str(answer) in str(chosen)``.

    ``answer`` is what the eval file holds: the right choice's index (``Sample.label``), or a text answer.
    ``candidate_scores`` (log-probabilities of the buggy candidates, higher is better; the original ranked by
    lowest loss) is needed only when a choice contains ``|`` and so there are several candidates.

    Wrong because the candidates are split on the wrong character: there is one candidate per question, the
    "chosen" index is always 0 and the model is never asked which choice is right; the figure is the share of
    questions whose answer index is 0 (or whose text answer contains "0"). The root script wrote the comparison
    as ``int in answer``, which raises TypeError for a text answer or a nonzero index; the string form of the same
    containment (the variant left in its ``eval_scripts/eval_vqa.py``) is what is reproduced.
    """
    candidates = iconqa_compat_candidates(choices)
    if len(candidates) == 1:
        chosen = 0
    elif candidate_scores is None or len(candidate_scores) != len(candidates):
        raise ValueError(f"iconqa_compat: {len(candidates)} candidates need as many scores")
    else:
        chosen = choice_from_scores(candidate_scores)
    return 1.0 if str(chosen) in str(answer) or str(answer) in str(chosen) else 0.0


def hateful_memes_compat(prediction: str) -> Optional[int]:
    """1 when "yes" is anywhere in the lower-cased answer, else 0 when "no" is, else None (scored as wrong).

    Wrong because both are substring tests, "yes" first: "not hateful", "i don't know" and "nothing" read as 0, "yes
    and no" as 1; and the original reported accuracy only, while the benchmark's metric is AUROC of a probability.
    """
    answer = _strip_stop(prediction).lower()
    if "yes" in answer:
        return 1
    if "no" in answer:
        return 0
    return None


_REFCOCO_ANSWER = re.compile(r"\{<\d{1,3}><\d{1,3}><\d{1,3}><\d{1,3}>\}")
_GRID = 100.0


def _iou_plus_one(a: Sequence[float], b: Sequence[float]) -> float:
    """MiniGPT-v2's ``computeIoU``: inclusive pixel coordinates (+1 on every side length)."""
    inter_w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]) + 1)
    inter_h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]) + 1)
    inter = inter_w * inter_h
    union = (a[2] - a[0] + 1) * (a[3] - a[1] + 1) + (b[2] - b[0] + 1) * (b[3] - b[1] + 1) - inter
    return inter / union if union else 0.0  # the original's ZeroDivisionError fell into ``except: continue``


def refcoco_compat(text: str, box: Box, image_size: tuple[int, int]) -> float:
    """The original RefCOCO rule: 1.0 when the answer's box has IoU > 0.5 with the reference ``box`` (pixels, xyxy).

    As ``eval_ref.py`` did: ``<unk>`` and every space are removed; the answer must *start* with
    ``{<x1><y1><x2><y2>}`` (1-3 digits each, 0-100 grid) or it has no box (0.0; its ``--resample`` re-asks greedily
    and gets the same answer); all integers in the answer are read and exactly four are needed (a second box or any
    other number after the first box made the unpacking raise, and the item was skipped: 0.0); x is scaled by
    width / 100 and y by height / 100; the IoU is MiniGPT-v2's +1-pixel one; a hit needs IoU > 0.5.

    So it differs from the official `metrics.iou_hits` (``tasks.parse_boxes``' first box, exact IoU, >= 0.5) in
    three ways: the answer format is stricter, boxes gain a pixel on every side (which lifts small boxes' IoU), and an
    IoU of exactly 0.5 is a miss.
    """
    answer = text.replace("<unk>", "").replace(" ", "").strip()
    if not _REFCOCO_ANSWER.match(answer):
        return 0.0
    numbers = [int(n) for n in re.findall(r"\d+", answer)]
    if len(numbers) != 4:
        return 0.0
    width, height = image_size
    x1, y1, x2, y2 = numbers
    predicted = (x1 / _GRID * width, y1 / _GRID * height, x2 / _GRID * width, y2 / _GRID * height)
    return 1.0 if _iou_plus_one(predicted, box) > 0.5 else 0.0
