"""VSR, Visual Spatial Reasoning (zero-shot split): is a spatial statement about the image true or false?

Layout (github.com/cambridgeltl/visual-spatial-reasoning ``data/splits/zeroshot/``, also the Hugging Face dataset
``cambridgeltl/vsr_zeroshot``; images from COCO 2017 train + val, put in one folder as its data README says)::

    root/test.jsonl   {"image": "000000017697.jpg", "caption": "The car is behind the suitcase.", "label": 1,
                       "relation": "behind", "subj": "car", "obj": "suitcase", ...}   (one per line)
    root/images/000000017697.jpg

Splits: ``test`` (default; what TinyGPT-V reports), ``dev``, ``train``. Sample id: the line's index in the file
(0-based; VSR has no ids). ``label`` 1 = true, 0 = false; ``relation`` (optional) gives the breakdown.

Prompt fields: ``{caption}`` (also as ``{question}``). Official and ``tinygpt-v``: ``[vqa] Based on the image, is
this statement true or false? {caption}`` (MiniGPT-v2's and TinyGPT-V's VSR prompt). Up to 10 new tokens (the
original: 20).

Scoring: official = accuracy of a strict parse of the answer's first word: "true" or "yes" is true, "false" or "no"
is false (VLMEvalKit's VSR asks yes/no), anything else is unparsed and wrong; with precision, recall, F1 of "true",
the share answered true, and accuracy per relation. tinygpt-v-compat = "true"/"false" found anywhere in the answer
(`compat.vsr_compat`: "true or false" scores on every item).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from ..benchmark import Benchmark, Prediction, Sample
from ..compat import vsr_compat
from ..metrics import mean
from ..normalize import first_word_yes_no
from .common import (aligned, breakdown, check_scoring, fill, image_dir, image_file, need, need_label, parse_options,
                     published, read_jsonl, take, template, text_of, yes_no_figures)

NAME = "vsr"
SPLITS = ("test", "dev", "train")
PROMPT = "[vqa] Based on the image, is this statement true or false? {caption}"
TRUE_WORDS, FALSE_WORDS = ("true", "yes"), ("false", "no")
MAX_NEW_TOKENS = 10


def data_files(root: Path, split: str, options: dict) -> list[Path]:
    """The statements file `load` reads."""
    return [Path(root) / f"{split}.jsonl"]


def load(root: Path, split: str, options: dict) -> list[Sample]:
    opts = parse_options(NAME, options)
    root = Path(root)
    (path,) = data_files(root, split, options)
    prompt = template(opts, PROMPT, PROMPT, ("caption", "question"))
    tokens = opts.max_new_tokens(MAX_NEW_TOKENS)
    records = read_jsonl(path)
    images = image_dir(root, opts, "images")

    def samples() -> Iterator[Sample]:
        for index, (where, record) in enumerate(records):
            caption = need(record, "caption", where)
            label = need_label(record, "label", where, yes=(1, True, "true"), no=(0, False, "false"))
            relation = record.get("relation") if isinstance(record.get("relation"), str) else None
            yield Sample(id=str(index), images=(image_file(images, need(record, "image", where), where),),
                         prompt=fill(prompt, caption=caption, question=caption), max_new_tokens=tokens,
                         answers=("true" if label else "false",), label=label, meta={"relation": relation})

    return take(samples(), opts)


def score(samples: list[Sample], predictions: list[Prediction], scoring: str) -> dict:
    check_scoring(scoring)
    texts = [text_of(p) for p in aligned(samples, predictions)]
    labels = [bool(s.label) for s in samples]
    if scoring == "tinygpt-v-compat":
        hits = [vsr_compat(text, s.answers[0]) for text, s in zip(texts, samples)]
        return {"metric": "substring_accuracy", "value": mean(hits), "n": len(samples),
                "by_relation": breakdown(hits, [s.meta.get("relation") for s in samples])}
    parsed = [first_word_yes_no(text, yes=TRUE_WORDS, no=FALSE_WORDS) for text in texts]
    figures = yes_no_figures(parsed, labels)
    hits = [1.0 if p is not None and p == label else 0.0 for p, label in zip(parsed, labels)]
    return {"metric": "accuracy", "value": figures["accuracy"], **figures,
            "by_relation": breakdown(hits, [s.meta.get("relation") for s in samples])}


BENCHMARK = Benchmark(
    name=NAME, title="VSR (zero-shot)", splits=SPLITS, metric="accuracy", load=load, score=score,
    layout='root/test.jsonl {"image": "000000017697.jpg", "caption": "The car is behind the suitcase.", "label": 1, '
           '"relation": "behind"} + root/images/000000017697.jpg (COCO 2017)',
    paper=published(NAME),
)
