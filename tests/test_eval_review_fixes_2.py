"""Fixes from the second evaluation review (reading and scoring each benchmark as its official definition says):

1. Hateful Memes' AUROC ranks the log-odds of yes, not P(yes): P(yes) rounds to exactly 1.0 once yes leads by about
   37 nats, so confident answers tied and the AUROC (a ranking metric) came out wrong.

Pure scoring over hand-made samples and predictions; no model is loaded."""

from __future__ import annotations

import pytest
from sklearn.metrics import roc_auc_score

from tinygpt.evaluation.benchmark import Prediction, Sample
from tinygpt.evaluation.benchmarks.hateful_memes import score as hateful_memes_score


def _memes(pairs):
    samples = [Sample(id=str(i), images=("x.png",), prompt="p", max_new_tokens=1, choices=("yes", "no"), label=label)
               for i, (_, _, label) in enumerate(pairs)]
    predictions = [Prediction(str(i), "yes", (yes, no)) for i, (yes, no, _) in enumerate(pairs)]
    return samples, predictions


def test_hateful_memes_auroc_does_not_tie_confident_answers():
    # (log P(yes), log P(no), label): yes leads by 40 on a benign meme and by 50 on a hateful one; both P(yes) round
    # to 1.0, yet the hateful one ranks higher, so the AUROC is that of the log-odds (0.75), not of the ties (0.625)
    pairs = [(0.0, -40.0, 0), (0.0, -50.0, 1), (0.0, 1.0, 0), (0.0, -1.0, 1)]
    samples, predictions = _memes(pairs)
    result = hateful_memes_score(samples, predictions, "official")
    expected = roc_auc_score([label for *_, label in pairs], [yes - no for yes, no, _ in pairs])
    assert expected == pytest.approx(0.75)
    assert result["auroc"] == pytest.approx(expected)
    assert result["value"] == pytest.approx(expected)
    assert result["accuracy_likelihood"] == pytest.approx(0.75)  # P(yes) > 0.5 is unchanged


def test_hateful_memes_auroc_with_impossible_answers():
    # both answers impossible (-inf, -inf) is an even score, not a NaN; one impossible answer ranks at the end
    pairs = [(float("-inf"), float("-inf"), 0), (0.0, float("-inf"), 1), (float("-inf"), 0.0, 0), (-1.0, -2.0, 1)]
    samples, predictions = _memes(pairs)
    result = hateful_memes_score(samples, predictions, "official")
    assert result["auroc"] == pytest.approx(1.0)
    assert result["n_scored"] == 4
