"""VizWiz VQA (val): questions from blind people, ten answers each, "unanswerable" when the photo does not tell.

Layout (the official ``Annotations.zip`` and ``val.zip`` from vizwiz.org)::

    root/Annotations/val.json   [{"image": "VizWiz_val_00000000.jpg", "question": "What is this?",
                                  "answers": [{"answer": "basil", "answer_confidence": "yes"}, ... ten],
                                  "answer_type": "other", "answerable": 1}, ...]
    root/val/VizWiz_val_00000000.jpg

``root/val.json`` is read when there is no ``Annotations/`` folder. Splits: ``val`` (default; what TinyGPT-V
reports), ``train`` (the test split has no answers). Sample id: the image name without its extension (one question
per image).

Prompt fields: ``{question}``. Official and ``tinygpt-v``: ``[vqa] The question is '{question}' Based on the image,
answer the question with a single word or phrase. and reply 'unanswerable' when the provided information is
insufficient`` (MiniGPT-v2's VizWiz prompt, kept by TinyGPT-V). Up to 10 new tokens (the original: 20).

Scoring: official = the VQA accuracy (`metrics.vqa_accuracy`: normalised, min(matches / 3, 1) over the ten
leave-one-out subsets), with accuracy per ``answer_type`` and on the answerable and unanswerable questions
(``answerable`` 0 / 1). tinygpt-v-compat = `compat.vizwiz_compat` (containment both ways, so an empty answer
matches every reference).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from ...data.formats.base import read_json
from ...errors import UserError
from ..benchmark import Benchmark, Prediction, Sample
from ..compat import vizwiz_compat
from ..metrics import mean, vqa_accuracy
from .common import (aligned, answer_texts, breakdown, check_scoring, fill, find_file, image_dir, image_file, need,
                     parse_options, published, take, template, text_of)

NAME = "vizwiz"
SPLITS = ("val", "train")
PROMPT = ("[vqa] The question is '{question}' Based on the image, answer the question with a single word or phrase. "
          "and reply 'unanswerable' when the provided information is insufficient")
MAX_NEW_TOKENS = 10


def _candidates(root: Path, split: str) -> list[Path]:
    return [Path(root) / "Annotations" / f"{split}.json", Path(root) / f"{split}.json"]


def data_files(root: Path, split: str, options: dict) -> list[Path]:
    """The annotation file `load` reads: the first of its candidates that exists (the first when none does)."""
    candidates = _candidates(root, split)
    return [next((path for path in candidates if path.is_file()), candidates[0])]


def load(root: Path, split: str, options: dict) -> list[Sample]:
    opts = parse_options(NAME, options)
    root = Path(root)
    path = find_file(_candidates(root, split))
    prompt = template(opts, PROMPT, PROMPT, ("question",))
    tokens = opts.max_new_tokens(MAX_NEW_TOKENS)
    records = read_json(path, "VizWiz annotation file")
    if not isinstance(records, list):
        raise UserError(f"{path}: expected a JSON list of questions, got {type(records).__name__}")
    images = image_dir(root, opts, split)

    def samples() -> Iterator[Sample]:
        for index, record in enumerate(records):
            where = f"{path} record {index}"
            name = need(record, "image", where)
            answerable = record.get("answerable") if record.get("answerable") in (0, 1) else None
            answer_type = record.get("answer_type") if isinstance(record.get("answer_type"), str) else None
            yield Sample(id=Path(name).stem, images=(image_file(images, name, where),),
                         prompt=fill(prompt, question=need(record, "question", where)), max_new_tokens=tokens,
                         answers=answer_texts(record, where),
                         meta={"answer_type": answer_type, "answerable": answerable})

    return take(samples(), opts)


def score(samples: list[Sample], predictions: list[Prediction], scoring: str) -> dict:
    check_scoring(scoring)
    texts = [text_of(p) for p in aligned(samples, predictions)]
    if scoring == "tinygpt-v-compat":
        values = [vizwiz_compat(text, s.answers) for text, s in zip(texts, samples)]
    else:
        values = [vqa_accuracy(text, s.answers) for text, s in zip(texts, samples)]
    answerable = breakdown(values, [s.meta.get("answerable") for s in samples])
    return {"metric": "vqa_accuracy", "value": mean(values), "n": len(samples),
            "by_answer_type": breakdown(values, [s.meta.get("answer_type") for s in samples]),
            "answerable": answerable.get("1"), "unanswerable": answerable.get("0")}


BENCHMARK = Benchmark(
    name=NAME, title="VizWiz VQA (val)", splits=SPLITS, metric="vqa_accuracy", load=load, score=score,
    layout='root/Annotations/val.json [{"image": "VizWiz_val_00000000.jpg", "question": "What is this?", "answers": '
           '[{"answer": "basil", "answer_confidence": "yes"}, ...ten], "answer_type": "other", "answerable": 1}] + '
           'root/val/VizWiz_val_00000000.jpg',
    paper=published(NAME),
)
