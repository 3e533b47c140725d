"""The evaluation metrics on hand-computed cases: normalisation, VQA accuracy, exact match, yes/no, AUROC, IoU,
multiple choice, and the original TinyGPT-V scorers with the flaw each one has."""

import itertools
import math
import random

import pytest

from tinygpt.evaluation import compat, metrics
from tinygpt.evaluation.normalize import first_word_yes_no, gqa_normalize, vqa_normalize

# --- normalisation --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("Two.", "2"),                 # period stripped (no digit follows), number word -> digit
    ("none", "0"),
    ("the dog", "dog"),            # article dropped
    ("A Red Car", "red car"),      # lower-cased, article dropped
    ("don't", "don't"),            # the apostrophe is not a punctuation mark here
    ("dont", "don't"),             # contraction restored
    ("2.5", "2.5"),                # a period before a digit is kept
    ("yes!", "yes"),               # "!" not next to a space -> space -> split away
    ("1,000", "1000"),             # digit,digit anywhere: every mark is deleted
    ("black/white", "black white"),    # "/" between words -> space
    ("black / white", "black white"),  # "/" next to a space -> deleted, the spaces collapse
    ("\tYes\n", "yes"),
    ("Im", "im"),                  # the official table's "Im" never matches after lower-casing
])
def test_vqa_normalize(text, expected):
    assert vqa_normalize(text) == expected


def test_gqa_normalize_and_exact_match():
    assert gqa_normalize("  The Table. ") == "table"
    assert gqa_normalize("t-shirt") == "tshirt"    # punctuation deleted, not replaced
    assert metrics.exact_match("The table.", "table") == 1.0
    assert metrics.exact_match("tables", "table") == 0.0
    assert metrics.exact_match("on the left", "left") == 0.0   # exact, not contained
    assert metrics.exact_match("two", "2") == 0.0              # GQA's rule maps no number words ...
    assert metrics.exact_match("two", "2", normalize=vqa_normalize) == 1.0   # ... the VQA rule does


@pytest.mark.parametrize("text, expected", [
    ("Yes", True), ("yes, it is.", True), ("No.", False), ("(no)", False), ("  no\n", False),
    ("I think yes", None), ("nope", None), ("", None), ("Yesterday", None),
])
def test_first_word_yes_no(text, expected):
    assert first_word_yes_no(text) is expected


def test_first_word_true_false():
    assert first_word_yes_no("True.", yes=("true",), no=("false",)) is True
    assert first_word_yes_no("false, it is not", yes=("true",), no=("false",)) is False
    assert first_word_yes_no("yes", yes=("true",), no=("false",)) is None

# --- VQA accuracy ---------------------------------------------------------------------------------------------------


def _ten(matching: int) -> list:
    return ["2"] * matching + ["3"] * (10 - matching)


@pytest.mark.parametrize("matching, expected", [
    (0, 0.0),
    (1, 0.3),   # 1 subset leaves 0 matches -> 0; 9 subsets keep 1 -> 1/3: (0 + 9/3) / 10 = 0.3
    (2, 0.6),   # 2 subsets with 1 match -> 1/3; 8 with 2 -> 2/3: (2/3 + 16/3) / 10 = 0.6
    (3, 0.9),   # 3 subsets with 2 matches -> 2/3; 7 with 3 -> 1: (3*2/3 + 7*1) / 10 = 0.9
    (4, 1.0),   # 4 subsets with 3 -> 1; 6 with 4 -> 1: 10 / 10
    (10, 1.0),
])
def test_vqa_accuracy_leave_one_out(matching, expected):
    assert metrics.vqa_accuracy("two", _ten(matching)) == pytest.approx(expected)


def test_vqa_accuracy_normalises_both_sides_always():
    # the references disagree in form only: "Dogs!" and "the dogs" both normalise to "dogs" (3 matches -> 0.9)
    answers = ["Dogs!", "the dogs", "dogs", "cat", "cat", "cat", "cat", "cat", "cat", "cat"]
    assert metrics.vqa_accuracy("DOGS.", answers) == pytest.approx(0.9)
    # unanimous references: the official script would not normalise "Two." and score 0; we score 1
    assert metrics.vqa_accuracy("Two.", ["2"] * 10) == 1.0
    with pytest.raises(ValueError):
        metrics.vqa_accuracy("2", [])


def test_mean():
    assert metrics.mean([]) == 0.0
    assert metrics.mean(x for x in (1.0, 0.0, 0.5)) == 0.5

# --- yes / no -------------------------------------------------------------------------------------------------------


def test_binary_metrics_hand_table():
    predicted = [True, True, False, False, True, None]
    labels = [True, False, False, True, True, True]
    # scored as: T T F F T F (None on a yes label -> no): TP = 2 (0, 4), FP = 1 (1), TN = 1 (2), FN = 2 (3, 5)
    result = metrics.binary_metrics(predicted, labels)
    assert result["accuracy"] == pytest.approx(3 / 6)
    assert result["precision"] == pytest.approx(2 / 3)
    assert result["recall"] == pytest.approx(2 / 4)
    assert result["f1"] == pytest.approx(2 * (2 / 3) * (1 / 2) / (2 / 3 + 1 / 2))  # = 4/7
    assert result["yes_ratio"] == pytest.approx(3 / 6)
    assert (result["n"], result["unparsed"]) == (6, 1)


def test_binary_metrics_unparsed_on_a_no_label_is_a_false_positive():
    result = metrics.binary_metrics([None, True], [False, True])
    # scored as T T: TP = 1, FP = 1 -> precision 1/2, recall 1/1; the None is not counted as a yes answer
    assert result["accuracy"] == 0.5 and result["precision"] == 0.5 and result["recall"] == 1.0
    assert result["yes_ratio"] == 0.5 and result["unparsed"] == 1


def test_binary_metrics_edge_cases():
    all_no = metrics.binary_metrics([False, False], [False, False])
    assert all_no["accuracy"] == 1.0 and all_no["precision"] == 0.0 and all_no["f1"] == 0.0
    assert metrics.binary_metrics([], [])["n"] == 0
    with pytest.raises(ValueError):
        metrics.binary_metrics([True], [True, False])


def test_auroc_hand_computed_and_against_pair_counting():
    # positives 0.35 and 0.8 against negatives 0.1 and 0.4: pairs won 0.35>0.1, 0.8>0.1, 0.8>0.4; lost 0.35<0.4 -> 3/4
    assert metrics.auroc([0.1, 0.4, 0.35, 0.8], [False, False, True, True]) == 0.75
    assert metrics.auroc([0.5, 0.5], [0, 1]) == 0.5      # a tie is half a pair
    rng = random.Random(0)
    labels = [rng.random() < 0.4 for _ in range(60)]
    scores = [round(rng.random(), 1) for _ in range(60)]  # rounded: many ties
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    pairs = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    assert metrics.auroc(scores, labels) == pytest.approx(pairs / (len(pos) * len(neg)))
    from sklearn.metrics import roc_auc_score
    assert metrics.auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores))


def test_auroc_needs_both_classes():
    assert metrics.auroc([0.2, 0.9], [True, True]) is None
    assert metrics.auroc([], []) is None


def test_yes_probability():
    assert metrics.yes_probability(math.log(0.75), math.log(0.25)) == pytest.approx(0.75)
    assert metrics.yes_probability(math.log(0.3), math.log(0.1)) == pytest.approx(0.75)   # renormalised: .3/.4
    assert metrics.yes_probability(0.0, -1000.0) == 1.0        # no overflow
    assert metrics.yes_probability(-1000.0, 0.0) == pytest.approx(0.0, abs=1e-300)
    assert metrics.yes_probability(-math.inf, -math.inf) == 0.5
    with pytest.raises(ValueError):
        metrics.yes_probability(math.nan, 0.0)

# --- boxes ----------------------------------------------------------------------------------------------------------


def test_box_iou():
    assert metrics.box_iou((0, 0, 10, 10), (5, 5, 15, 15)) == pytest.approx(25 / 175)  # 5x5 / (100 + 100 - 25)
    assert metrics.box_iou((0, 0, 10, 10), (20, 20, 30, 30)) == 0.0                    # disjoint
    assert metrics.box_iou((0, 0, 10, 10), (10, 0, 20, 10)) == 0.0                     # touching edges
    assert metrics.box_iou((0, 0, 10, 10), (2, 2, 6, 6)) == pytest.approx(16 / 100)    # contained
    assert metrics.box_iou((5, 5, 5, 10), (0, 0, 10, 10)) == 0.0                       # no width
    assert metrics.box_iou((10, 10, 0, 0), (0, 0, 10, 10)) == 0.0                      # inverted


def test_iou_hits():
    predicted = [(0, 0, 10, 10), (0, 0, 2, 1), None, (50, 50, 60, 60)]
    references = [(0, 0, 10, 10), (0, 0, 1, 1), (0, 0, 5, 5), (0, 0, 5, 5)]
    # IoUs 1.0, exactly 0.5 (1 / 2), 0 (no box), 0 (disjoint); >= 0.5 counts the second
    result = metrics.iou_hits(predicted, references)
    assert result == {"accuracy": 0.5, "mean_iou": 0.375, "unparsed": 0.25, "n": 4}
    assert metrics.iou_hits(predicted, references, threshold=0.6)["accuracy"] == 0.25
    with pytest.raises(ValueError):
        metrics.iou_hits([None], [])

# --- multiple choice ------------------------------------------------------------------------------------------------


def test_choice_from_scores():
    assert metrics.choice_from_scores([-3.0, -1.0, -1.0, -2.0]) == 1   # first of the tied best
    assert metrics.choice_from_scores([-0.5]) == 0
    with pytest.raises(ValueError):
        metrics.choice_from_scores([])


@pytest.mark.parametrize("text, expected", [
    ("Square.", 1),              # exact after normalisation
    ("It is a triangle", 2),     # the only choice contained
    ("circle or square", None),  # two contained: none
    ("squares", None),           # whole words only
    ("(b)", 1), ("B", 1), ("C.", 2), ("b) square-ish", 1),
    ("D", None),                 # letter out of range
    ("A dog", None),             # a capital followed by a word is not a letter answer
])
def test_choice_from_text(text, expected):
    assert metrics.choice_from_text(text, ("circle", "square", "triangle")) == expected


def test_choice_from_text_numbers():
    choices = ("3", "5", "7")
    assert metrics.choice_from_text("three", choices) == 0
    assert metrics.choice_from_text("5.", choices) == 1
    assert metrics.choice_from_text("there are 7", choices) == 2
    assert metrics.choice_from_text("12", choices) is None

# --- the original TinyGPT-V scorers and their flaws -----------------------------------------------------------------


def test_gqa_compat_is_a_substring_test():
    assert compat.gqa_compat("Red", "red") == 1.0
    assert compat.gqa_compat("blue", "red") == 0.0
    assert compat.gqa_compat("I don't know", "no") == 1.0           # "no" inside "know"
    assert metrics.exact_match("I don't know", "no") == 0.0
    colours = "red, blue, green and yellow"
    assert [compat.gqa_compat(colours, c) for c in ("red", "blue", "green", "yellow")] == [1.0] * 4


def test_vsr_compat_true_or_false_is_right_on_every_item():
    labels = ["true", "false", "false", "true", "false"]
    assert metrics.mean(compat.vsr_compat("true or false", label) for label in labels) == 1.0
    # the strict parse reads the first word only: right on the two "true" items
    strict = [first_word_yes_no("true or false", yes=("true",), no=("false",)) == (label == "true")
              for label in labels]
    assert metrics.mean(strict) == 2 / 5
    assert compat.vsr_compat("False.", "false") == 1.0 and compat.vsr_compat("true", "false") == 0.0


def test_vizwiz_compat_empty_answer_matches_every_reference():
    assert compat.vizwiz_compat("", ["unanswerable"] * 10) == 1.0
    assert compat.vizwiz_compat("", ["blue", "navy", "dark blue"]) == 1.0
    assert compat.vizwiz_compat("###", ["blue"]) == pytest.approx(1 / 3)  # cut at "###": empty, matches the 1 reference
    # no leave-one-out: 2 of 10 equal -> min(2/3, 1) against the official 0.6
    answers = ["blue"] * 2 + ["navy"] * 8
    assert compat.vizwiz_compat("Blue", answers) == pytest.approx(2 / 3)
    assert metrics.vqa_accuracy("Blue", answers) == pytest.approx(0.6)
    assert compat.vizwiz_compat("a", ["black", "gray", "white"]) == pytest.approx(2 / 3)  # "a" in black, gray
    assert compat.vizwiz_compat("x", ["a_b"]) == 0.0 and compat.vizwiz_compat("b", ["a_b"]) == pytest.approx(1 / 3)


def test_iconqa_compat_scores_one_candidate():
    choices = ("3", "5", "7")
    assert compat.iconqa_compat_candidates(choices) == ["3_5_7"]
    # whatever the model thinks, the "chosen" index is 0: right exactly when the answer index is 0
    assert [compat.iconqa_compat(choices, answer) for answer in (0, 1, 2)] == [1.0, 0.0, 0.0]
    assert compat.iconqa_compat(choices, "10") == 1.0       # "0" in "10"
    # a "|" inside a choice makes several candidates; the chosen one then needs their scores
    assert compat.iconqa_compat_candidates(("a|b", "c")) == ["a", "b_c"]
    assert compat.iconqa_compat(("a|b", "c"), 1, candidate_scores=[-2.0, -0.5]) == 1.0
    with pytest.raises(ValueError):
        compat.iconqa_compat(("a|b", "c"), 1)


@pytest.mark.parametrize("text, expected", [
    ("Yes", 1), ("No.", 0), ("not hateful", 0), ("I don't know", 0), ("nothing", 0),
    ("yes and no", 1), ("the eyes look happy", 1), ("maybe", None), ("no###yes", 0),
])
def test_hateful_memes_compat_substrings(text, expected):
    assert compat.hateful_memes_compat(text) == expected


def test_refcoco_compat_rule():
    size = (200, 50)   # x scales by 2, y by 0.5
    box = (20.0, 10.0, 100.0, 50.0)
    assert compat.refcoco_compat("{<10><20><50><100>}", box, size) == 1.0
    assert compat.refcoco_compat("{ <10> <20> <50> <100> }", box, size) == 1.0     # spaces removed first
    assert compat.refcoco_compat("here: {<10><20><50><100>}", box, size) == 0.0    # must start with the box
    assert compat.refcoco_compat("{<10><20><50><100>}<delim>{<1><2><3><4>}", box, size) == 0.0  # 8 integers
    assert compat.refcoco_compat("{<10><20><50><100>}", (0, 0, 200, 50), size) == 0.0  # IoU 3200/10000


def test_refcoco_compat_plus_one_pixel_and_strict_half():
    size = (100, 100)  # grid = pixels
    # exact IoU 4/9 = 0.44 misses officially; +1 pixel: 3*3 / (4*4) = 0.5625 hits
    assert metrics.iou_hits([(0, 0, 2, 2)], [(0, 0, 3, 3)])["accuracy"] == 0.0
    assert compat.refcoco_compat("{<0><0><2><2>}", (0, 0, 3, 3), size) == 1.0
    # +1 IoU exactly 0.5: inter 2*11 = 22, union 33 + 33 - 22 = 44; "> 0.5" misses it
    assert compat.refcoco_compat("{<0><0><2><10>}", (1, 0, 3, 10), size) == 0.0
