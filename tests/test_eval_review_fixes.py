"""Fixes from the evaluation review (docs/evaluation.md, "Garbage says so" and "Official metric"):

1. a yes/no benchmark whose every answer is one class is garbage whatever its headline: POPE's headline is F1, and
   answering "yes" to everything scores F1 66.7 (above the 50% "chance" the old rule compared the headline with);
2. NaN log-probabilities (a numerically broken model) no longer crash Hateful Memes' scoring (nor skew IconQA's
   likelihood choice): they are left out of the likelihood figures, counted in ``likelihood_unparsed``, named by a
   garbage rule, and the run ends with summary.json and the WARNING line;
3. POPE's official yes / no is POPE's own rule (first sentence, "no" when it holds No / no / not, else "yes"), with
   the strict first-word parse kept as the ``strict_*`` figures.

Stand-in engines over a few records written in tmp_path; no model is loaded."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest

from tinygpt.evaluation.benchmark import Prediction, Sample
from tinygpt.evaluation.benchmarks.pope import score as pope_score
from tinygpt.evaluation.config import load_eval_config
from tinygpt.evaluation import normalize
from tinygpt.evaluation.runner import SUMMARY, garbage_problems, run_evaluation

from benchmark_layouts import image_file, jsonl_file, load_bench, score_bench, write_hateful_memes, write_iconqa
from test_eval_runner_guards import _model

NAN = float("nan")
OBJECTS = ("dog", "cat", "car", "chair", "cup", "bus", "bird", "tree", "bench", "kite")


class _Engine:
    """Answers each question with ``answer(user text)``; scores every choice with ``scores(user text)``."""

    name = "stand-in"
    backend = SimpleNamespace(prompt=SimpleNamespace(template="{}", end_sym=""))
    stop_strings = ()

    def __init__(self, answer, scores=None):
        self.answer, self.scores = answer, scores

    def chat_batch(self, conversations, settings=None):
        return [self.answer(c.turns[-1].user) for c in conversations]

    def score(self, conversation, choices):
        return list(self.scores(conversation.turns[-1].user))


def _run(tmp_path: Path, benchmark: str, root: Path, engine: _Engine, split: str = "") -> dict:
    model = _model(tmp_path / "model")
    path = tmp_path / f"{benchmark}.yaml"
    path.write_text(f"model: {{backend: torch, path: {model}, device: cpu}}\n"
                    f"benchmark: {{name: {benchmark}, root: {root}{', split: ' + split if split else ''}}}\n"
                    f"run: {{out_dir: {tmp_path / 'out'}, batch_size: 4}}\n")
    return run_evaluation(load_eval_config(path, check_model=False), engine=engine, quiet=True)


def _pope(root: Path, n: int = 20) -> Path:
    """``n`` POPE questions of the random category, every other one a "yes"."""
    image_file(root / "val2014" / "COCO_val2014_000000000001.jpg")
    jsonl_file(root / "coco_pope_random.json", [
        {"question_id": i, "image": "COCO_val2014_000000000001.jpg", "text": f"Is there a {OBJECTS[i % 10]} in the "
         f"image? ({i})", "label": "yes" if i % 2 else "no"} for i in range(n)])
    return root


def _object(question: str) -> str:
    return question.split("Is there a ")[1].split(" in")[0]


# ---- 1. every answer one class -------------------------------------------------------------------------------------

def test_pope_answering_yes_to_everything_warns_though_its_f1_is_above_half(tmp_path, capsys):
    engine = _Engine(lambda q: f"Yes, there is a {_object(q)} in the image.")   # varied texts, all "yes"
    summary = _run(tmp_path, "pope", _pope(tmp_path / "pope"), engine, "random")
    assert summary["metric"] == "f1" and summary["value"] == pytest.approx(2 / 3)  # 66.7 > the old 50% "chance"
    assert summary["extras"]["yes_ratio"] == 1.0 and summary["extras"]["accuracy"] == 0.5
    assert summary["warning"] and "every answer is yes" in summary["warning"]
    assert "accuracy 50.0% is no better than always giving the commoner label (50.0%)" in summary["warning"]
    assert json.loads((tmp_path / "out" / SUMMARY).read_text())["warning"] == summary["warning"]
    assert "WARNING: pope/random" in capsys.readouterr().err


def test_one_class_rule_compares_accuracy_with_the_majority_label_share_and_needs_ten_answers():
    samples = [Sample(id=str(i), images=("x",), prompt="p", label=int(i < 15)) for i in range(20)]  # 15 yes, 5 no
    varied = [Prediction(s.id, text=f"no {i}") for i, s in enumerate(samples)]
    figures = {"metric": "f1", "value": 0.0, "accuracy": 0.25, "yes_ratio": 0.0, "unparsed": 0.0, "n": 20}
    problems = garbage_problems(figures, samples, varied)
    assert ("every answer is no: accuracy 25.0% is no better than always giving the commoner label (75.0%)"
            in problems)
    yes = {**figures, "metric": "f1", "value": 6 / 7, "accuracy": 0.75, "yes_ratio": 1.0}
    assert any(p.startswith("every answer is yes: accuracy 75.0%") for p in garbage_problems(yes, samples, varied))
    assert garbage_problems({**yes, "n": 9}, samples[:9], varied[:9]) == []           # too few to say
    assert garbage_problems({**yes, "yes_ratio": 0.55}, samples, varied) == []         # both classes answered


# ---- 2. NaN log-probabilities --------------------------------------------------------------------------------------

def test_nan_log_probabilities_are_left_out_of_hateful_memes_likelihood_figures(tmp_path):
    write_hateful_memes(tmp_path)
    samples = load_bench("hateful_memes", tmp_path)                     # labels 0, 1
    official = score_bench("hateful_memes", samples, ["no", "yes"], [(NAN, -1.0), (-0.1, -2.0)])
    assert official["n_scored"] == 1 and official["likelihood_unparsed"] == 0.5
    assert official["accuracy_likelihood"] == 1.0 and official["auroc"] is None      # one label left
    four = samples + [replace(s, id=f"{s.id}b") for s in samples]                   # labels 0, 1, 0, 1
    scores = [(-2.0, -0.1), (-0.1, -2.0), (NAN, NAN), (-0.5, NAN)]
    official = score_bench("hateful_memes", four, ["no", "yes", "no", "yes"], scores)
    assert official["value"] == official["auroc"] == 1.0 and official["likelihood_unparsed"] == 0.5
    none_left = score_bench("hateful_memes", samples, ["no", "yes"], [(NAN, -1.0), (-1.0, NAN)])
    assert none_left["value"] is None and none_left["accuracy_likelihood"] is None
    assert none_left["likelihood_unparsed"] == 1.0
    assert "100% of the answers are unparsable (> 50%)" in garbage_problems(none_left, samples, [])


def test_nan_log_probabilities_are_left_out_of_iconqa_likelihood_accuracy(tmp_path):
    write_iconqa(tmp_path)
    samples = load_bench("iconqa", tmp_path)                            # 37: label 1 of 2; 12: label 0 of 3
    official = score_bench("iconqa", samples, ["square", "3"], [(NAN, -1.0), (-0.1, -3.0, -0.5)])
    assert official["n_scored"] == 1 and official["likelihood_unparsed"] == 0.5
    assert official["metric"] == "accuracy_likelihood" and official["value"] == 1.0
    none_left = score_bench("iconqa", samples, ["square", "3"], [(NAN, NAN), (NAN, -3.0, -0.5)])
    assert none_left["metric"] == "accuracy_likelihood" and none_left["value"] is None
    assert none_left["likelihood_unparsed"] == 1.0 and none_left["accuracy_generation"] == 1.0


def test_a_model_with_nan_log_probabilities_ends_with_a_summary_and_a_warning(tmp_path, capsys):
    root = tmp_path / "hm"
    image_file(root / "img" / "1.png")
    jsonl_file(root / "dev.jsonl", [{"id": i, "img": "img/1.png", "label": i % 2, "text": f"text {i}"}
                                    for i in range(12)])
    engine = _Engine(lambda q: "yes" if int(q.split("'text ")[1].split("'")[0]) % 2 else "no",
                     lambda q: (NAN, NAN))
    summary = _run(tmp_path, "hateful_memes", root, engine)
    written = json.loads((tmp_path / "out" / SUMMARY).read_text())
    assert written["value"] is None and written["scores"]["official"]["likelihood_unparsed"] == 1.0
    assert written["scores"]["official"]["accuracy"] == 1.0                # the generated answers still count
    assert "12 of 12 predictions have NaN log-probabilities" in summary["warning"]
    assert "100% of the answers are unparsable" in summary["warning"]
    assert "WARNING: hateful_memes/dev" in capsys.readouterr().err
    assert math.isnan(json.loads((tmp_path / "out" / "predictions.jsonl").read_text().splitlines()[1])["scores"][0])


# ---- 3. POPE's own yes / no rule -----------------------------------------------------------------------------------

ANSWERS = [("There is a dog in the image.", 1), ("There is no dog in the image.", 0),
           ("The image does not show a dog.", 0), ("A dog is sitting on the sofa.", 1), ("Yes", 1), ("No", 0),
           ("I can see a cat.", 1), ("Not that I can see.", 0)]


def test_pope_yes_no_is_popes_own_rule():
    assert [normalize.pope_yes_no(text) for text, _ in ANSWERS] == [True, False, False, True, True, False, True, True]
    assert normalize.pope_yes_no("No, there is not.") is False and normalize.pope_yes_no("no") is False
    assert normalize.pope_yes_no("There is a dog. It is not red.") is True     # only the first sentence counts
    assert normalize.pope_yes_no("NO") is True and normalize.pope_yes_no("No!") is True   # exact words, as POPE
    assert normalize.pope_yes_no("") is True and normalize.pope_yes_no("!!!") is True     # nothing is unparsed


def test_pope_official_figures_use_popes_rule_and_keep_the_strict_parse_beside_them():
    samples = [Sample(id=str(i), images=("x",), prompt="p", label=label, meta={"category": "random"})
               for i, (_, label) in enumerate(ANSWERS)]
    predictions = [Prediction(str(i), text) for i, (text, _) in enumerate(ANSWERS)]
    official = pope_score(samples, predictions, "official")
    assert official["accuracy"] == 7 / 8 and official["unparsed"] == 0.0 and official["f1"] == pytest.approx(8 / 9)
    strict = [normalize.first_word_yes_no(text) for text, _ in ANSWERS]
    assert official["strict_unparsed"] == sum(p is None for p in strict) / len(strict) == 0.75
    assert official["strict_accuracy"] == 0.25 and official["by_category"]["random"]["strict_unparsed"] == 0.75
    # verbose answers the strict parse cannot read are not garbage: POPE's rule reads them
    many = [replace(s, id=f"{s.id}-{k}") for k in range(2) for s in samples]
    more = [Prediction(s.id, ANSWERS[int(s.id.split("-")[0])][0]) for s in many]
    assert garbage_problems(pope_score(many, more, "official"), many, more) == []
