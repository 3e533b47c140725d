"""IconQA (choose-text): multiple choice, answered by likelihood over the choices and by generation.

Layout (the official ``iconqa_data.zip`` from github.com/lupantech/IconQA; root = its ``iconqa_data`` folder, or the
folder holding it)::

    root/problems.json     {"37": {"question": "Which shape is this?", "choices": ["circle", "square"], "answer": 1,
                                   "ques_type": "choose_txt", "grade": "kindergarten", "split": "val", ...}, ...}
    root/pid_splits.json   {"choose_txt_val": ["37", ...], "choose_txt_test": [...], ...}
    root/iconqa/val/choose_txt/37/image.png   (and data.json: the problem's own record, same fields)

Without problems.json the problems are read from the per-problem ``data.json`` files, in problem-id order. Splits:
``val`` (default; what TinyGPT-V reports), ``test``, ``train``. Sample id: the problem id. ``answer`` is the index of
the right choice.

Prompt fields: ``{question}``, ``{choices}`` (joined with ", "). Official: ``[vqa] Based on the image, respond to
this question with a short answer: {question} Options: {choices}.``; ``tinygpt-v``: ``{question}`` alone (the
original scored the candidates after ``<Img><ImageHere></Img> {question}`` in the model's template, no task tag).
Each choice is scored as the answer (log-probability) and an answer is generated (up to 10 new tokens; 20 for
``tinygpt-v``).

Scoring: official = accuracy of the highest-scoring choice (``accuracy_likelihood``, the headline) and of the choice
the generated answer names (``accuracy_generation``, `metrics.choice_from_text`; ``generation_unparsed`` names none).
Scores holding a NaN (a numerically broken model) are left out of ``accuracy_likelihood`` and counted in
``likelihood_unparsed`` (a share of n); with none left the headline is None.
tinygpt-v-compat = `compat.iconqa_compat`: the original joined the choices with "_" and split them on "|", so it
scored one candidate and "chose" index 0: the figure is the share of questions whose answer index is 0. A question
with "|" in a choice has several such candidates whose scores were never asked for; it counts as wrong and in
``compat_unscorable``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from ...data.formats.base import read_json
from ...errors import UserError
from ..benchmark import Benchmark, Prediction, Sample
from ..compat import iconqa_compat
from ..metrics import choice_from_scores, choice_from_text, has_nan, mean
from .common import (aligned, breakdown, check_scoring, fill, image_file, need, parse_options, published, take,
                     template, text_of)

NAME = "iconqa"
SPLITS = ("val", "test", "train")
TASK = "choose_txt"
PROMPT = "[vqa] Based on the image, respond to this question with a short answer: {question} Options: {choices}."
TINYGPT_V_PROMPT = "{question}"
MAX_NEW_TOKENS = 10


def _problems(root: Path, split: str) -> Iterator[tuple[str, str, dict]]:
    """(pid, where, record) of the split's choose-text problems, from problems.json or the per-problem data.json."""
    folder = root / "iconqa" / split / TASK
    problems_path = root / "problems.json"
    if problems_path.is_file():
        problems = read_json(problems_path, "IconQA problems file")
        splits_path = root / "pid_splits.json"
        pid_splits = read_json(splits_path, "IconQA split file")
        key = f"{TASK}_{split}"
        if not isinstance(pid_splits, dict) or not isinstance(pid_splits.get(key), list):
            raise UserError(f"{splits_path}: missing field {key!r} (a list of problem ids)")
        if not isinstance(problems, dict):
            raise UserError(f"{problems_path}: expected a JSON object {{problem id: problem}}")
        for pid in pid_splits[key]:
            if str(pid) not in problems:
                raise UserError(f"{problems_path}: missing problem {pid!r} (listed in {splits_path} {key})")
            yield str(pid), f"{problems_path} problem {pid}", problems[str(pid)]
        return
    if not folder.is_dir():
        raise UserError(f"{problems_path}: file does not exist (nor the problem folders {folder})")
    for pid in _pids(folder):
        path = folder / pid / "data.json"
        yield pid, str(path), read_json(path, "IconQA problem file")


def _root(root: Path) -> Path:
    """``root``, or ``root/iconqa_data`` (the official archive's folder) when the problems are there."""
    root = Path(root)
    return root / "iconqa_data" if not (root / "problems.json").is_file() and (root / "iconqa_data").is_dir() else root


def data_files(root: Path, split: str, options: dict) -> list[Path]:
    """The files `load` reads: problems.json and pid_splits.json, else the data.json of every problem folder of the
    split (all of them, whatever the limit)."""
    root = _root(root)
    if (root / "problems.json").is_file():
        return [root / "problems.json", root / "pid_splits.json"]
    folder = root / "iconqa" / split / TASK
    if not folder.is_dir():
        return [root / "problems.json"]
    return [folder / pid / "data.json" for pid in _pids(folder)]


def _pids(folder: Path) -> list[str]:
    return sorted((p.name for p in folder.iterdir() if p.is_dir()), key=lambda n: (len(n), n))


def load(root: Path, split: str, options: dict) -> list[Sample]:
    opts = parse_options(NAME, options)
    root = _root(root)
    prompt = template(opts, PROMPT, TINYGPT_V_PROMPT, ("question", "choices"), needs=("question",))
    tokens = opts.max_new_tokens(MAX_NEW_TOKENS)
    images = opts.images or root / "iconqa" / split / TASK

    def samples() -> Iterator[Sample]:
        for pid, where, record in _problems(root, split):
            question = need(record, "question", where)
            choices = need(record, "choices", where, list)
            if len(choices) < 2 or not all(isinstance(c, str) and c.strip() for c in choices):
                raise UserError(f"{where}: field 'choices' must hold two or more non-empty strings")
            answer = need(record, "answer", where, int)
            if not 0 <= answer < len(choices):
                raise UserError(f"{where}: field 'answer' is {answer}, not an index of the {len(choices)} choices")
            grade = record.get("grade") if isinstance(record.get("grade"), str) else None
            yield Sample(id=pid, images=(image_file(images, f"{pid}/image.png", where),),
                         prompt=fill(prompt, question=question, choices=", ".join(choices)), max_new_tokens=tokens,
                         choices=tuple(choices), answers=(choices[answer],), label=answer, meta={"grade": grade})

    return take(samples(), opts)


def score(samples: list[Sample], predictions: list[Prediction], scoring: str) -> dict:
    check_scoring(scoring)
    predictions = aligned(samples, predictions)
    if scoring == "tinygpt-v-compat":
        hits, unscorable = [], 0
        for sample in samples:
            try:
                hits.append(iconqa_compat(sample.choices, sample.label))
            except ValueError:
                hits.append(0.0)
                unscorable += 1
        return {"metric": "accuracy", "value": mean(hits), "n": len(samples), "compat_unscorable": unscorable}
    asked = [(s, p) for s, p in zip(samples, predictions) if p.scores and len(p.scores) == len(s.choices)]
    scored = [(s, p) for s, p in asked if not has_nan(p.scores)]
    by_likelihood = [1.0 if choice_from_scores(p.scores) == s.label else 0.0 for s, p in scored]
    named = [choice_from_text(text_of(p), s.choices) for s, p in zip(samples, predictions)]
    by_generation = [1.0 if choice == s.label else 0.0 for choice, s in zip(named, samples)]
    likelihood = mean(by_likelihood) if scored else None
    result = {"metric": "accuracy_likelihood" if asked else "accuracy_generation",
              "value": likelihood if asked else mean(by_generation), "n": len(samples),
              "accuracy_likelihood": likelihood, "accuracy_generation": mean(by_generation),
              "generation_unparsed": mean(1.0 if choice is None else 0.0 for choice in named),
              "n_scored": len(scored),
              "likelihood_unparsed": (len(asked) - len(scored)) / len(samples) if samples else 0.0}
    if scored:
        result["by_grade"] = breakdown(by_likelihood, [s.meta.get("grade") for s, _ in scored])
    return result


BENCHMARK = Benchmark(
    name=NAME, title="IconQA (choose-text)", splits=SPLITS, metric="accuracy_likelihood", load=load, score=score,
    layout='root/problems.json {"37": {"question": "Which shape is this?", "choices": ["circle", "square"], '
           '"answer": 1, "ques_type": "choose_txt"}} + root/pid_splits.json {"choose_txt_val": ["37"]} + '
           'root/iconqa/val/choose_txt/37/image.png',
    paper=published(NAME),
)
