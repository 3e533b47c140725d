"""GQA (testdev-balanced): short answers scored by exact match after normalisation.

Layout (the official GQA download: ``questions1.2.zip`` + ``images.zip``)::

    root/testdev_balanced_questions.json   {"20968379": {"imageId": "n288870", "question": "Is the sky blue?",
                                                         "answer": "yes", "fullAnswer": "Yes, the sky is blue.",
                                                         "types": {"structural": "verify", "semantic": "attr",
                                                                   "detailed": "verifyAttr"}, ...}, ...}
    root/images/n288870.jpg

Splits: ``testdev_balanced`` (default; what TinyGPT-V and the LLaVA suite report), ``val_balanced``, ``testdev_all``,
``val_all`` (file ``{split}_questions.json``). Sample id: the question id (the JSON key); ``types`` (optional) gives
the breakdowns.

Prompt fields: ``{question}``. Official: ``[vqa] Based on the image, respond to this question with a short answer:
{question}`` (MiniGPT-v2's GQA prompt); ``tinygpt-v``: the same (TinyGPT-V kept it). Up to 10 new tokens (the
original: 20).

Scoring: official = exact match after lower-casing, deleting punctuation and articles (lmms-eval's GQA rule,
`metrics.exact_match`), with accuracy per structural and semantic type; tinygpt-v-compat = ``label in
answer.lower()`` (`compat.gqa_compat`: a substring test, so "no" counts inside "not sure").
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from ...data.formats.base import read_json
from ...errors import UserError
from ..benchmark import Benchmark, Prediction, Sample
from ..compat import gqa_compat
from ..metrics import exact_match, mean
from .common import (VQA_PROMPT, aligned, breakdown, check_scoring, fill, image_dir, image_file, need, parse_options,
                     published, take, template, text_of)

NAME = "gqa"
SPLITS = ("testdev_balanced", "val_balanced", "testdev_all", "val_all")
MAX_NEW_TOKENS = 10


def data_files(root: Path, split: str, options: dict) -> list[Path]:
    """The questions file `load` reads (it holds the answers too)."""
    return [Path(root) / f"{split}_questions.json"]


def load(root: Path, split: str, options: dict) -> list[Sample]:
    opts = parse_options(NAME, options)
    root = Path(root)
    (path,) = data_files(root, split, options)
    prompt = template(opts, VQA_PROMPT, VQA_PROMPT, ("question",))
    questions = read_json(path, "GQA questions file")
    if not isinstance(questions, dict):
        raise UserError(f"{path}: expected a JSON object {{question id: question}}, got {type(questions).__name__}")
    images = image_dir(root, opts, "images")
    tokens = opts.max_new_tokens(MAX_NEW_TOKENS)

    def samples() -> Iterator[Sample]:
        for qid, record in questions.items():
            where = f"{path} question {qid}"
            image_id = need(record, "imageId", where)
            question = need(record, "question", where)
            answer = need(record, "answer", where)
            types = record.get("types") if isinstance(record.get("types"), dict) else {}
            yield Sample(id=str(qid), images=(image_file(images, f"{image_id}.jpg", where),),
                         prompt=fill(prompt, question=question), max_new_tokens=tokens, answers=(answer,),
                         meta={"structural": types.get("structural"), "semantic": types.get("semantic")})

    return take(samples(), opts)


def score(samples: list[Sample], predictions: list[Prediction], scoring: str) -> dict:
    check_scoring(scoring)
    texts = [text_of(p) for p in aligned(samples, predictions)]
    labels = [s.answers[0] for s in samples]
    if scoring == "tinygpt-v-compat":
        hits = [gqa_compat(text, label) for text, label in zip(texts, labels)]
        metric = "substring_accuracy"
    else:
        hits = [exact_match(text, label) for text, label in zip(texts, labels)]
        metric = "exact_match"
    return {"metric": metric, "value": mean(hits), "n": len(samples),
            "by_structural": breakdown(hits, [s.meta.get("structural") for s in samples]),
            "by_semantic": breakdown(hits, [s.meta.get("semantic") for s in samples])}


BENCHMARK = Benchmark(
    name=NAME, title="GQA (testdev-balanced)", splits=SPLITS, metric="exact_match", load=load, score=score,
    layout='root/testdev_balanced_questions.json {"20968379": {"imageId": "n288870", "question": "Is the sky blue?", '
           '"answer": "yes", "types": {"structural": "verify", "semantic": "attr"}}} + root/images/n288870.jpg',
    paper=published(NAME),
)
