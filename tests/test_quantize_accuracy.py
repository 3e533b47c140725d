"""Scoring used by `python -m quantize accuracy` (the same metrics as the PyTorch shapes evaluation)."""

from quantize.accuracy import score


def test_vqa_and_grounding_scores_on_hand_made_answers():
    vqa = [{"answer": ["red"] * 10}, {"answer": ["2"] * 10}, {"answer": ["circle"] * 10}]
    assert score("vqa", ["Red.", "two", "square"], vqa) == 2 / 3
    refer = [{"bbox": [10, 10, 40, 40], "width": 100, "height": 100}] * 3
    answers = ["{<10><10><50><50>}", "{<60><60><90><90>}", "no box here"]
    assert score("refer", answers, refer) == 1 / 3
