"""Held-out questions about two images at once (the synthetic ``eval/multi_image`` split of ``tinygpt.tiny.synthetic``).

Layout: ``LAYOUT`` below. Three families, each needing both images (tinygpt/tiny/synthetic/multi_image_eval.py):
``which_has`` ("which image has a red square?" -> "the first image"), ``count_both`` ("how many circles are there in
both images?" -> "3") and ``compare_size`` ("which image's triangle is larger?" -> "the second image").

A sample per record, id = the record's ``question_id``, its two images in order, and the user text of the training
set's multi-image conversations: ``Image 1: <Img><ImageHere></Img> Image 2: <Img><ImageHere></Img> {question}``
(the model's own template is added by the chat engine); 8 new tokens. ``meta["family"]`` is the family.

Options: ``limit`` (the first N records). Scoring (one scorer: tinygpt-v-compat gives the same figures, with
``compat`` = "same as official"): exact match
after the shapes suite's normalisation (case, punctuation, articles, number words -> digits: "The first image." is
"first image", "three" is "3"); figures: ``accuracy`` overall and ``per_family``, ``unparsed`` (the share of answers
that are no answer of their family at all: neither "first image" nor "second image", or not a number), ``n`` and
``counts`` per family, ``majority_baseline`` (what always giving each family's most common answer scores) and a few
examples per family.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path

from ...data.bad_records import BadRecord
from ...data.image import safe_join
from ...errors import UserError
from ...tasks import IMAGE_TAG
from ..benchmark import SCORINGS, Benchmark, Prediction, Sample
from ..metrics import mean
from ..shapes_metrics import normalize_answer
from .common import SAME_AS_OFFICIAL
from .shapes import read_records

QUESTIONS = "questions.json"
FAMILIES = ("which_has", "count_both", "compare_size")
WHICH_IMAGE = frozenset({"first image", "second image"})  # the normalised answers of which_has and compare_size
PROMPT = "Image 1: {tag} Image 2: {tag} {question}"
MAX_NEW_TOKENS = 8
EXAMPLES = 3  # predictions kept per family in the scores' "examples"
LAYOUT = """\
images/000001_0.jpg, images/000001_1.jpg
questions.json  [{"question_id": 1, "images": ["images/000001_0.jpg", "images/000001_1.jpg"],
                  "question": "which image has a red square?", "answer": "the first image",
                  "family": "which_has"}, ...]      (family: which_has, count_both or compare_size)"""


def parsed(family: str, text: str) -> bool:
    """Whether `text` is an answer of `family` at all (right or wrong)."""
    answer = normalize_answer(text)
    return answer.isdigit() if family == "count_both" else answer in WHICH_IMAGE


OPTIONS = ("limit",)  # checked when the eval config is read (tinygpt.evaluation.config.accepted_options)


def _limit(options: dict) -> int | None:
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise UserError(f"benchmark.options.{unknown[0]}: the multi_image benchmark takes only limit")
    limit = options.get("limit")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise UserError(f"benchmark.options.limit: expected an integer >= 1 (or null), got {limit!r}")
    return limit


def _sample(root: Path, record: dict) -> Sample:
    images, question, answer, family = (record[k] for k in ("images", "question", "answer", "family"))
    if not isinstance(images, list) or len(images) != 2 or not all(isinstance(p, str) for p in images):
        raise BadRecord("images: expected a list of two relative paths")
    if not isinstance(question, str) or not question.strip() or not isinstance(answer, str) or not answer.strip():
        raise BadRecord("question and answer must be non-empty strings")
    if family not in FAMILIES:
        raise BadRecord(f"family: expected one of {', '.join(FAMILIES)}, got {family!r}")
    paths = tuple(str(safe_join(root, p)) for p in images)
    for relative, path in zip(images, paths):
        if not Path(path).is_file():
            raise BadRecord(f"images: {relative} does not exist")
    return Sample(id=str(record["question_id"]), images=paths, answers=(answer,), max_new_tokens=MAX_NEW_TOKENS,
                  prompt=PROMPT.format(tag=IMAGE_TAG, question=question),
                  meta={"family": family, "question": question})


def data_files(root: Path, split: str, options: dict) -> list[Path]:
    """The questions file `load` reads."""
    return [Path(root) / QUESTIONS]


def load(root: Path, split: str, options: dict) -> list[Sample]:
    """One sample per record of ``root/questions.json`` (see the module docstring)."""
    if split not in BENCHMARK.splits:
        raise UserError(f"benchmark.split: the multi_image benchmark has the split {BENCHMARK.splits[0]!r}, "
                        f"got {split!r}")
    limit = _limit(options)
    root = Path(root)
    path = root / QUESTIONS
    samples = []
    for index, record in enumerate(read_records(path)[:limit]):
        try:
            samples.append(_sample(root, record))
        except KeyError as exc:
            raise UserError(f"{path}: record {index} lacks the field {exc}") from None
        except BadRecord as exc:
            raise UserError(f"{path}: record {index}: {exc}") from None
    return samples


def score(samples: list[Sample], predictions: list[Prediction], scoring: str = "official",
          keep_examples: int = EXAMPLES) -> dict:
    """Exact-match accuracy overall and per family, the unparsed share, the majority baseline (fractions), counts, and
    the first `keep_examples` [question, answer, prediction] of each family."""
    if scoring not in SCORINGS:
        raise UserError(f"scoring: expected one of {', '.join(SCORINGS)}, got {scoring!r}")
    by_id = {p.id: p for p in predictions}
    hits: dict[str, list[float]] = defaultdict(list)
    unparsed, answers = [], defaultdict(list)
    examples: dict[str, list] = defaultdict(list)
    for sample in samples:
        if sample.id not in by_id:
            raise UserError(f"predictions: no prediction for the sample {sample.id}")
        family, text = sample.meta["family"], by_id[sample.id].text or ""
        hits[family].append(float(normalize_answer(text) == normalize_answer(sample.answers[0])))
        unparsed.append(float(not parsed(family, text)))
        answers[family].append(normalize_answer(sample.answers[0]))
        if len(examples[family]) < keep_examples:
            examples[family].append([sample.meta["question"], sample.answers[0], text])
    majority = sum(Counter(a).most_common(1)[0][1] for a in answers.values()) / len(samples) if samples else 0.0
    accuracy = mean(h for family_hits in hits.values() for h in family_hits)
    result = {"metric": "accuracy", "value": accuracy, "n": len(samples), "accuracy": accuracy,
              "per_family": {f: mean(hits[f]) for f in FAMILIES if f in hits},
              "unparsed": mean(unparsed), "majority_baseline": majority,
              "counts": {f: len(hits[f]) for f in FAMILIES if f in hits},
              "examples": {f: examples[f] for f in FAMILIES if f in examples}}
    if scoring == "tinygpt-v-compat":
        result["compat"] = SAME_AS_OFFICIAL
    return result


BENCHMARK = Benchmark(
    name="multi_image",
    title="Synthetic shapes, two images (held-out)",
    splits=("held-out",),
    metric="accuracy",
    load=load,
    score=score,
    layout=LAYOUT,
)
