"""The official metrics, as pure functions of predictions and references; every figure is a fraction in [0, 1].

* `vqa_accuracy`: the VQA challenge's accuracy (VQAv2, OK-VQA, VizWiz): for each of the n leave-one-out subsets of the
  n human answers, ``min(#subset answers equal to the prediction / 3, 1)``; the mean over the subsets. A prediction that
  matches m of ten answers scores ``(m * min((m-1)/3, 1) + (10-m) * min(m/3, 1)) / 10``: 0.3, 0.6, 0.9, 1.0 for
  m = 1, 2, 3, 4.
  Both sides are normalised with `vqa_normalize` always. The official ``vqaEval.py`` normalises (prediction and
  references) only when the references disagree, so when all ten annotators wrote the same answer, "Two" or "2." is
  scored 0 against ten "2". We normalise always because the references are already normalised by the dataset (so
  normalising them changes nothing) and a model's capitalisation or trailing period is not a wrong answer; this is a
  documented difference that can only raise a score, and only on questions with unanimous references.
* `exact_match`: 1.0 / 0.0 after a normalisation (`gqa_normalize` by default: GQA's accuracy).
* `binary_metrics`: accuracy, precision, recall, F1 of the positive class (yes / True), the share answered yes, and how
  many answers could not be parsed (POPE, VSR, Hateful Memes); scikit-learn computes the four scores.
* `auroc` (scikit-learn's ``roc_auc_score``) over `yes_log_odds` (the same order as `yes_probability`, without its
  rounding to 1.0): Hateful Memes' headline metric.
* `box_iou` and `iou_hits`: RefCOCO's Acc@0.5 counts IoU >= 0.5 as a hit (the original TinyGPT-V / MiniGPT-v2 script
  counts IoU > 0.5 with its +1-pixel IoU; see `compat.refcoco_compat`).
* `choice_from_scores` / `choice_from_text`: the chosen option of a multiple-choice question (IconQA), from the
  engine's per-choice log-probabilities or from a generated answer.

scikit-learn is imported inside the two functions that use it, so importing this module stays cheap.
"""

from __future__ import annotations

import math
import re
import sys
from typing import Iterable, Optional, Sequence

from ..tasks import iou as _iou
from .benchmark import Box
from .normalize import gqa_normalize, vqa_normalize


def mean(values: Iterable[float]) -> float:
    """The arithmetic mean; 0.0 for no values."""
    values = list(values)
    return float(sum(values)) / len(values) if values else 0.0


# --- VQA accuracy and exact match -----------------------------------------------------------------------------------

def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """The official VQA accuracy of one prediction against its human answers (usually ten); see the module docstring.

    Raises ValueError for an empty list of answers (a loader's job to reject such a question).
    """
    if not answers:
        raise ValueError("vqa_accuracy: a question needs at least one reference answer")
    predicted = vqa_normalize(prediction)
    matches = [vqa_normalize(answer) == predicted for answer in answers]
    total = sum(matches)
    # leaving out answer i leaves (total - matches[i]) matches among the others
    return mean(min((total - hit) / 3.0, 1.0) for hit in matches)


def exact_match(prediction: str, answer: str, normalize=gqa_normalize) -> float:
    """1.0 when ``normalize(prediction) == normalize(answer)``, else 0.0."""
    return 1.0 if normalize(prediction) == normalize(answer) else 0.0


# --- yes / no benchmarks --------------------------------------------------------------------------------------------

def binary_metrics(predicted: Sequence[Optional[bool]], labels: Sequence[bool]) -> dict:
    """Accuracy, precision, recall and F1 of the positive class (True = yes), yes_ratio, n and unparsed.

    An unparsed prediction (None) counts as wrong: it is scored as the opposite of its label (a false negative on a
    yes item, a false positive on a no item) and counted in ``unparsed``. ``yes_ratio`` is the share of all n
    predictions that are a parsed yes. Precision (or recall) with nothing predicted (or labelled) positive is 0.0.
    All figures are 0.0 when n is 0.
    """
    if len(predicted) != len(labels):
        raise ValueError(f"binary_metrics: {len(predicted)} predictions for {len(labels)} labels")
    n = len(labels)
    unparsed = sum(p is None for p in predicted)
    if n == 0:
        return {"accuracy": 0.0, "precision": 0.0, "recall": 0.0, "f1": 0.0, "yes_ratio": 0.0, "n": 0, "unparsed": 0}
    from sklearn.metrics import accuracy_score, precision_recall_fscore_support

    truth = [bool(label) for label in labels]
    scored = [(not label) if p is None else bool(p) for p, label in zip(predicted, truth)]
    precision, recall, f1, _ = precision_recall_fscore_support(
        truth, scored, labels=[False, True], pos_label=True, average="binary", zero_division=0.0)
    return {
        "accuracy": float(accuracy_score(truth, scored)),
        "precision": float(precision),
        "recall": float(recall),
        "f1": float(f1),
        "yes_ratio": sum(p is True for p in predicted) / n,
        "n": n,
        "unparsed": unparsed,
    }


def auroc(scores: Sequence[float], labels: Sequence[bool]) -> Optional[float]:
    """Area under the ROC curve of ``scores`` (higher = more positive) for ``labels``; None with only one class."""
    if len(scores) != len(labels):
        raise ValueError(f"auroc: {len(scores)} scores for {len(labels)} labels")
    if len({bool(label) for label in labels}) < 2:
        return None
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score([bool(label) for label in labels], list(scores)))


def yes_log_odds(logprob_yes: float, logprob_no: float) -> float:
    """``logprob_yes - logprob_no``, the log-odds of yes (0.0 when both are equal, -inf included): the score AUROC
    ranks. Unlike `yes_probability` it does not round to exactly 1.0 once yes leads by about 37 nats, which would tie
    confident answers and change the AUROC. An infinite result (one answer impossible) becomes the largest finite
    float, same sign (scikit-learn refuses infinities). A NaN raises ValueError."""
    if math.isnan(logprob_yes) or math.isnan(logprob_no):
        raise ValueError("yes_log_odds: a log-probability is NaN")
    odds = 0.0 if logprob_yes == logprob_no else logprob_yes - logprob_no
    return max(-sys.float_info.max, min(sys.float_info.max, odds))


def has_nan(scores: Sequence[float]) -> bool:
    """Whether any of the log-probabilities is NaN (a numerically broken model: such scores are left out)."""
    return any(isinstance(x, float) and math.isnan(x) for x in scores)


def yes_probability(logprob_yes: float, logprob_no: float) -> float:
    """P(yes) normalised over the two answers: ``exp(ly) / (exp(ly) + exp(ln))``, computed stably.

    Both -inf (neither answer possible) gives 0.5; a NaN raises ValueError.
    """
    if math.isnan(logprob_yes) or math.isnan(logprob_no):
        raise ValueError("yes_probability: a log-probability is NaN")
    if logprob_yes == logprob_no:  # also both -inf or both +inf
        return 0.5
    diff = logprob_no - logprob_yes  # P(yes) = 1 / (1 + exp(diff))
    if diff > 0:
        e = math.exp(-diff)
        return e / (1.0 + e)
    return 1.0 / (1.0 + math.exp(diff))


# --- boxes ----------------------------------------------------------------------------------------------------------

def box_iou(a: Box, b: Box) -> float:
    """Intersection over union of two (x1, y1, x2, y2) pixel boxes; 0.0 without overlap or when a box has no area."""
    return _iou(a, b)


def iou_hits(predicted: Sequence[Optional[Box]], references: Sequence[Box], threshold: float = 0.5) -> dict:
    """RefCOCO's Acc@threshold: ``accuracy`` = share with IoU >= threshold (a missing box is a miss, IoU 0).

    Returns accuracy, mean_iou, unparsed (share of predictions with no box) and n. The comparison is ``>=``: the
    usual statement of the metric ("IoU >= 0.5"); the original TinyGPT-V / MiniGPT-v2 script used ``> 0.5``, which
    differs only on an IoU of exactly 0.5.
    """
    if len(predicted) != len(references):
        raise ValueError(f"iou_hits: {len(predicted)} predictions for {len(references)} references")
    ious = [0.0 if box is None else box_iou(box, ref) for box, ref in zip(predicted, references)]
    return {
        "accuracy": mean(1.0 if value >= threshold else 0.0 for value in ious),
        "mean_iou": mean(ious),
        "unparsed": mean(1.0 if box is None else 0.0 for box in predicted),
        "n": len(ious),
    }


# --- multiple choice ------------------------------------------------------------------------------------------------

def choice_from_scores(scores: Sequence[float]) -> int:
    """The index of the highest score (the first one on ties); ValueError for no scores."""
    if not scores:
        raise ValueError("choice_from_scores: no scores")
    return max(range(len(scores)), key=lambda i: (scores[i], -i))


_LETTER = re.compile(r"^\s*(?:\(([A-Za-z])\)|([A-Z])(?:[.):]|\s*$))")


def choice_from_text(text: str, choices: Sequence[str]) -> Optional[int]:
    """The choice a generated answer names, or None.

    In order: the first choice equal to the whole answer after `vqa_normalize` ("Three." names "3"); else the only
    choice contained in the answer as whole words ("it is a circle" names "circle"; two contained choices name
    none); else a leading option letter, "(b)" in any case or a capital "B" alone or followed by ".", ")" or ":",
    as a 0-based index when it is in range. A capital letter followed by a word ("A dog") is not a letter answer.
    """
    answer = vqa_normalize(text)
    normalized = [vqa_normalize(choice) for choice in choices]
    for index, choice in enumerate(normalized):
        if choice == answer:
            return index
    contained = [i for i, choice in enumerate(normalized) if choice and f" {choice} " in f" {answer} "]
    if len(contained) == 1:
        return contained[0]
    match = _LETTER.match(text)
    if match:
        index = ord((match.group(1) or match.group(2)).lower()) - ord("a")
        if index < len(choices):
            return index
    return None
