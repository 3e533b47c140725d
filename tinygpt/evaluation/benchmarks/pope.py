"""POPE (COCO): object hallucination as yes/no questions, "Is there a {object} in the image?".

Layout (github.com/AoiDragon/POPE ``output/coco/``; COCO val2014 images)::

    root/coco_pope_random.json        {"question_id": 0, "image": "COCO_val2014_000000548882.jpg", "image_id": 548882,
    root/coco_pope_popular.json        "text": "Is there a dining table in the image?", "label": "yes"}
    root/coco_pope_adversarial.json   (one object per line, despite the .json name)
    root/val2014/COCO_val2014_000000548882.jpg

Splits: ``all`` (default: the three files; ids ``{category}/{question_id}``), ``random``, ``popular``,
``adversarial`` (one file; id the ``question_id``). ``label`` is "yes" or "no".

Prompt fields: ``{question}`` (the ``text``). Official and ``tinygpt-v``: ``[vqa] Based on the image, respond to this
question with a short answer: {question}`` (the model's VQA prompt; TinyGPT-V did not report POPE). Up to 10 new
tokens.

Scoring: official = POPE's own yes / no rule (`normalize.pope_yes_no`, as POPE's ``evaluate.py`` and LLaVA's
``eval_pope.py`` apply it: "no" when the first sentence holds the word No / no / not, else "yes", so ``unparsed`` is
always 0) and accuracy, precision, recall, F1 of "yes" and yes_ratio per category; the headline is F1 (what the
LLaVA-suite model cards report, `common.PUBLISHED`; with ``all``, the mean F1 of the three categories, and the other
figures are means too). Beside them, the same figures under the strict first-word parse (`normalize.first_word_yes_no`:
anything but a leading yes / no is unparsed and wrong) as ``strict_accuracy``, ``strict_precision``,
``strict_recall``, ``strict_f1``, ``strict_yes_ratio`` and ``strict_unparsed`` (in ``by_category`` too); they are
extra figures, not checked for garbage (POPE's rule reads every answer). tinygpt-v-compat is the same as official
(``compat`` says so).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from ..benchmark import Benchmark, Prediction, Sample
from ..metrics import mean
from ..normalize import first_word_yes_no, pope_yes_no
from .common import (SAME_AS_OFFICIAL, VQA_PROMPT, aligned, check_scoring, fill, image_dir, image_file, need,
                     need_label, parse_options, published, read_jsonl, take, template, text_of, yes_no_figures)

NAME = "pope"
CATEGORIES = ("random", "popular", "adversarial")
SPLITS = ("all",) + CATEGORIES
FIGURES = ("accuracy", "precision", "recall", "f1", "yes_ratio", "unparsed")
STRICT = "strict_"  # the strict first-word parse's figures: strict_accuracy, ..., strict_unparsed
ALL_FIGURES = FIGURES + tuple(STRICT + name for name in FIGURES)
MAX_NEW_TOKENS = 10


def _categories(split: str) -> tuple[str, ...]:
    return CATEGORIES if split == "all" else (split,)


def data_files(root: Path, split: str, options: dict) -> list[Path]:
    """The question files `load` reads: one per category of the split."""
    return [Path(root) / f"coco_pope_{category}.json" for category in _categories(split)]


def load(root: Path, split: str, options: dict) -> list[Sample]:
    opts = parse_options(NAME, options)
    root = Path(root)
    prompt = template(opts, VQA_PROMPT, VQA_PROMPT, ("question",))
    files = [(category, read_jsonl(path))
             for category, path in zip(_categories(split), data_files(root, split, options))]
    images = image_dir(root, opts, "val2014")

    def samples() -> Iterator[Sample]:
        for category, records in files:
            for where, record in records:
                qid = need(record, "question_id", where, (int, str))
                label = need_label(record, "label", where, yes=("yes",), no=("no",))
                yield Sample(id=f"{category}/{qid}" if split == "all" else str(qid),
                             images=(image_file(images, need(record, "image", where), where),),
                             prompt=fill(prompt, question=need(record, "text", where)), max_new_tokens=MAX_NEW_TOKENS,
                             answers=("yes" if label else "no",), label=label, meta={"category": category})

    return take(samples(), opts)


def score(samples: list[Sample], predictions: list[Prediction], scoring: str) -> dict:
    check_scoring(scoring)
    texts = [text_of(p) for p in aligned(samples, predictions)]
    parsed = [pope_yes_no(text) for text in texts]
    strict = [first_word_yes_no(text) for text in texts]
    per_category = {}
    for category in CATEGORIES:
        chosen = [i for i, s in enumerate(samples) if s.meta.get("category") == category]
        if chosen:
            labels = [bool(samples[i].label) for i in chosen]
            figures = yes_no_figures([parsed[i] for i in chosen], labels)
            strict_figures = yes_no_figures([strict[i] for i in chosen], labels)
            per_category[category] = {**figures, **{STRICT + name: strict_figures[name] for name in FIGURES}}
    overall = {name: mean(figures[name] for figures in per_category.values()) for name in ALL_FIGURES}
    result = {"metric": "f1", "value": overall["f1"], "n": len(samples), **overall, "by_category": per_category}
    if scoring == "tinygpt-v-compat":
        result["compat"] = SAME_AS_OFFICIAL
    return result


BENCHMARK = Benchmark(
    name=NAME, title="POPE (COCO)", splits=SPLITS, metric="f1", load=load, score=score,
    layout='root/coco_pope_{random,popular,adversarial}.json, one per line: {"question_id": 0, "image": '
           '"COCO_val2014_000000548882.jpg", "text": "Is there a dining table in the image?", "label": "yes"} + '
           'root/val2014/COCO_val2014_000000548882.jpg',
    paper=published(NAME),
)
