"""Hateful Memes (dev): is a meme (image + its text) hateful? AUROC of P(yes), and accuracy.

Layout (the official Hateful Memes challenge data, as DrivenData / Facebook AI released it)::

    root/dev.jsonl      {"id": 42953, "img": "img/42953.png", "label": 0, "text": "its their character not their color"}
    root/img/42953.png

Splits: ``dev`` (default; the phase-1 dev set TinyGPT-V reports), ``dev_seen``, ``dev_unseen`` (phase 2; file
``{split}.jsonl``). ``label`` 1 = hateful. Sample id: the meme id. ``img`` is relative to the root; with
``options.images`` its file name is looked up in that directory instead.

Prompt fields: ``{text}`` (also as ``{question}``). Official: ``[vqa] This is an image with the text '{text}' written
on it. Is this image hateful? Answer yes or no.`` (the original's question with its typo fixed and the model's VQA
task tag); ``tinygpt-v``: ``This is an image writting '{text}'. Is this image hateful? Answer yes or no. Answer:``
(as TinyGPT-V and MiniGPT-v2 asked it). The choices ("yes", "no") are scored (log-probability) and an answer is
generated (up to 10 new tokens; 20 for ``tinygpt-v``).

Scoring: official = AUROC (the challenge's metric) of P(yes) = softmax of the two choices' log-probabilities
(`metrics.yes_probability`; ranked by its log-odds, `metrics.yes_log_odds`, which P(yes) would tie once it rounds to
1.0), with ``accuracy`` of the generated answer's first word (strict yes / no; anything else is unparsed and wrong),
its precision / recall / F1 / yes_ratio, and ``accuracy_likelihood`` (P(yes) > 0.5: log-odds > 0). A pair of
log-probabilities holding a NaN (a numerically broken model) is left out of AUROC and ``accuracy_likelihood`` and
counted in ``likelihood_unparsed`` (a share of n); with none left both are None.
tinygpt-v-compat = accuracy of `compat.hateful_memes_compat` ("yes" anywhere -> 1, else "no" anywhere -> 0).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from ..benchmark import Benchmark, Prediction, Sample
from ..compat import hateful_memes_compat
from ..metrics import auroc, has_nan, mean, yes_log_odds
from ..normalize import first_word_yes_no
from .common import (aligned, check_scoring, fill, image_file, need, need_label, parse_options, published, read_jsonl,
                     take, template, text_of, yes_no_figures)

NAME = "hateful_memes"
SPLITS = ("dev", "dev_seen", "dev_unseen")
PROMPT = "[vqa] This is an image with the text '{text}' written on it. Is this image hateful? Answer yes or no."
TINYGPT_V_PROMPT = "This is an image writting '{text}'. Is this image hateful? Answer yes or no. Answer:"
CHOICES = ("yes", "no")
MAX_NEW_TOKENS = 10


def data_files(root: Path, split: str, options: dict) -> list[Path]:
    """The memes file `load` reads."""
    return [Path(root) / f"{split}.jsonl"]


def load(root: Path, split: str, options: dict) -> list[Sample]:
    opts = parse_options(NAME, options)
    root = Path(root)
    prompt = template(opts, PROMPT, TINYGPT_V_PROMPT, ("text", "question"))
    tokens = opts.max_new_tokens(MAX_NEW_TOKENS)
    (path,) = data_files(root, split, options)
    records = read_jsonl(path)

    def samples() -> Iterator[Sample]:
        for where, record in records:
            meme = need(record, "id", where, (int, str))
            img = need(record, "img", where)
            image = image_file(opts.images, Path(img).name, where) if opts.images else image_file(root, img, where)
            text = need(record, "text", where)
            yield Sample(id=str(meme), images=(image,), prompt=fill(prompt, text=text, question=text),
                         max_new_tokens=tokens, choices=CHOICES, label=need_label(record, "label", where))

    return take(samples(), opts)


def score(samples: list[Sample], predictions: list[Prediction], scoring: str) -> dict:
    check_scoring(scoring)
    predictions = aligned(samples, predictions)
    labels = [bool(s.label) for s in samples]
    texts = [text_of(p) for p in predictions]
    if scoring == "tinygpt-v-compat":
        read = [hateful_memes_compat(text) for text in texts]
        return {"metric": "accuracy", "value": mean(1.0 if r is not None and r == s.label else 0.0
                                                    for r, s in zip(read, samples)),
                "n": len(samples), "unparsed": mean(1.0 if r is None else 0.0 for r in read)}
    figures = yes_no_figures([first_word_yes_no(text) for text in texts], labels)
    asked = [(p.scores, label) for p, label in zip(predictions, labels) if p.scores and len(p.scores) == 2]
    scored = [(yes_log_odds(*pair), label) for pair, label in asked if not has_nan(pair)]  # log-odds: no ties at 1.0
    area = auroc([odds for odds, _ in scored], [label for _, label in scored]) if scored else None
    return {"metric": "auroc", "value": area, **figures, "auroc": area,
            "accuracy_likelihood": mean(1.0 if (odds > 0) == y else 0.0 for odds, y in scored) if scored else None,
            "n_scored": len(scored),
            "likelihood_unparsed": (len(asked) - len(scored)) / len(samples) if samples else 0.0}


BENCHMARK = Benchmark(
    name=NAME, title="Hateful Memes (dev)", splits=SPLITS, metric="auroc", load=load, score=score,
    layout='root/dev.jsonl {"id": 42953, "img": "img/42953.png", "label": 0, "text": "its their character not their '
           'color"} + root/img/42953.png',
    paper=published(NAME),
)
