"""Samples -> predictions through a chat engine, batched: the one prediction path of evaluate.py and the tiny recipe.

    for prediction in predict(engine, samples, batch_size=48, progress=lambda done, total: ...): ...

Contract:
* a sample's user text is its `prompt`, kept as written (spaces included); each ``<ImageHere>`` in it is where one of
  its images goes, in order; a prompt without any gets ``<Img><ImageHere></Img>`` per image in front (the chat
  messages' wording: images first, one space between parts). A count that does not match is a UserError;
* samples with ``generate`` are answered with `ChatEngine.chat_batch`, greedy unless `settings` say otherwise, with
  ``max_new_tokens`` = the sample's, and the model's end symbol as a stop string even when it is blank (a ``"\n"``
  ends the answers of the tiny recipe's stage 1-2 models, as training wrote them; chat does not stop at blank
  ones); a batch is up to `batch_size` of them in a row with the same max_new_tokens
  (a change starts a new batch, so a list sorted by task gets one run of batches per task);
* samples with ``choices`` get `ChatEngine.score` of each choice (summed log-probabilities);
* predictions come out in sample order, each batch's as soon as it is done; `progress(done, total)` is called after
  each batch with the number of samples predicted so far.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

from ..chat.engine import ChatEngine
from ..chat.messages import ChatTurn, Conversation, ImageRef, image_from_path
from ..chat.settings import GenerationSettings
from ..errors import UserError
from ..tasks import IMAGE_PLACEHOLDER, IMAGE_TAG
from .benchmark import Prediction, Sample


def conversation(sample: Sample) -> Conversation:
    """The one-turn conversation that asks `sample` (see the module docstring)."""
    images = tuple(_image(sample, k, path) for k, path in enumerate(sample.images))
    marks = sample.prompt.count(IMAGE_PLACEHOLDER)
    if marks == 0 and images:
        user = " ".join([IMAGE_TAG] * len(images) + ([sample.prompt.strip()] if sample.prompt.strip() else []))
    elif marks == len(images):
        user = sample.prompt
    else:
        raise UserError(f"sample {sample.id}: prompt: {marks} {IMAGE_PLACEHOLDER} mark(s) for {len(images)} image(s)")
    return Conversation((ChatTurn(user, images),))


def _image(sample: Sample, k: int, path: str) -> ImageRef:
    """Image `k` of `sample`; the error of a file that is missing names it once, that of one that does not decode
    (raised when the model opens it) names the sample, the image and its file."""
    if not Path(path).is_file():
        raise UserError(f"sample {sample.id}: images[{k}]: image file not found: {path}")
    return image_from_path(path, f"sample {sample.id}: images[{k}] {path}")


def _chunks(samples: Sequence[Sample], batch_size: int) -> Iterator[list[Sample]]:
    """Runs of samples holding up to `batch_size` generate-samples with one max_new_tokens (score-only samples
    ride along with the run they are in)."""
    chunk: list[Sample] = []
    generating, tokens = 0, None
    for sample in samples:
        if sample.generate and (generating == batch_size or (generating and sample.max_new_tokens != tokens)):
            yield chunk
            chunk, generating = [], 0
        chunk.append(sample)
        if sample.generate:
            generating, tokens = generating + 1, sample.max_new_tokens
    if chunk:
        yield chunk


def predict(engine: ChatEngine, samples: Sequence[Sample], batch_size: int,
            settings: GenerationSettings | None = None,
            progress: Optional[Callable[[int, int], None]] = None) -> Iterator[Prediction]:
    """One `Prediction` per sample, in order (see the module docstring); `settings` default to greedy."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UserError(f"batch_size: must be an integer >= 1, got {batch_size!r}")
    base = settings or GenerationSettings()
    end = engine.backend.prompt.end_sym
    if end and end not in engine.stop_strings + base.stop:
        base = base.with_(stop=base.stop + (end,))
    done = 0
    for chunk in _chunks(samples, batch_size):
        asked = [conversation(s) for s in chunk]
        generating = [k for k, s in enumerate(chunk) if s.generate]
        texts: dict[int, str] = {}
        if generating:
            tokens = chunk[generating[0]].max_new_tokens
            answers = engine.chat_batch([asked[k] for k in generating], base.with_(max_new_tokens=tokens))
            texts = dict(zip(generating, answers))
        for k, sample in enumerate(chunk):
            scores = tuple(engine.score(asked[k], list(sample.choices))) if sample.choices else None
            yield Prediction(sample.id, texts.get(k), scores)
        done += len(chunk)
        if progress is not None:
            progress(done, len(samples))
