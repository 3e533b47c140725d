"""The contract between a benchmark, the runner and the metrics: `Sample`, `Prediction`, `Benchmark`.

A benchmark is three things (tinygpt/evaluation/benchmarks/, one file each, registered in `BENCHMARKS`):

* `load(root, split, options)` reads the official files under `root` and returns `Sample`s, each with the user text
  already written in the benchmark's prompt (the model's own template is added later by the chat engine);
* what to ask: a sample is generated (`generate`, up to `max_new_tokens`) and/or scored (`choices`: the engine's
  `score` gives the summed log-probability of each choice as the answer);
* `score(samples, predictions, scoring)` turns the predictions into figures: ``{"metric": name, "value": fraction,
  ...extras}``; `scoring` is ``"official"`` or ``"tinygpt-v-compat"`` (the original's scorers, as they were).

The runner (tinygpt/evaluation/runner.py) asks the engine and writes one `Prediction` per sample to a JSONL file, so
a rerun skips what is done; nothing here touches a model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

SCORINGS = ("official", "tinygpt-v-compat")
Box = tuple[float, float, float, float]  # x1, y1, x2, y2 in pixels


@dataclass(frozen=True)
class Sample:
    id: str                                  # unique within the loaded split (the official question / ref id)
    images: tuple[str, ...]                  # image files (absolute paths), in the order the prompt shows them
    prompt: str                              # the user text; "<ImageHere>" marks where each image goes, or the
                                             # images come first when it has none
    generate: bool = True                    # ask for an answer (greedy, max_new_tokens)
    max_new_tokens: int = 20
    choices: tuple[str, ...] = ()            # when not empty, each is scored as the answer (log-probability)
    answers: tuple[str, ...] = ()            # references (VQA: the ten human answers; GQA / VSR / POPE: one)
    label: Optional[int] = None              # the right choice's index, or 1 / 0 for a yes / no benchmark
    box: Optional[Box] = None                # the reference box (RefCOCO)
    image_size: Optional[tuple[int, int]] = None  # (width, height) of images[0], where boxes need it
    meta: dict[str, Any] = field(default_factory=dict)  # JSON-able facts for breakdowns (kind, subset, category)


@dataclass(frozen=True)
class Prediction:
    id: str
    text: Optional[str] = None               # the generated answer (samples with generate=True)
    scores: Optional[tuple[float, ...]] = None  # log-probability per choice (samples with choices)

    def to_json(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_json(cls, record: dict) -> "Prediction":
        scores = record.get("scores")
        return cls(str(record["id"]), record.get("text"), tuple(float(s) for s in scores) if scores else None)


@dataclass(frozen=True)
class Benchmark:
    name: str                                # registry key, e.g. "gqa"
    title: str                               # for tables, e.g. "GQA (testdev-balanced)"
    splits: tuple[str, ...]                  # splits `load` understands; the first is the default
    metric: str                              # the headline figure's name, e.g. "vqa_accuracy"
    load: Callable[[Path, str, dict], list[Sample]]
    score: Callable[[list[Sample], list[Prediction], str], dict]
    layout: str                              # the files it reads, with a minimal record (for the README)
    paper: dict[str, float] = field(default_factory=dict)  # published figures (percent) by model name
