"""The synthetic shapes suite on an in-memory model: the tiny recipe's evaluation after each stage.

The suite itself (split layout, prompts, metrics) is tinygpt.evaluation.benchmarks.shapes and
tinygpt.evaluation.shapes_metrics; `evaluate_loaded` runs it the way ``python evaluate.py --cfg-path
eval_configs/shapes.yaml`` does: a chat engine over the model (PyTorch backend), the benchmark's samples, the batched
`tinygpt.evaluation.predict.predict`, the benchmark's `score`. So the recipe and evaluate.py give the same figures.

Prompts: the model's own template and end symbol (from its config) wrap the user texts. Models trained with the bare
template ``"{}"`` (stages 1-2: image -> caption) are asked for a caption with the bare image; every other model with
``[caption] Briefly describe this image.``. Questions use ``[vqa] {question}``, grounding uses
``[refer] give me the location of {phrase}``, both in the stage-4 wording ``<Img><ImageHere></Img> {instruction} ``.

The metric functions and the prompt constants are re-exported here under their old names.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from pathlib import Path

from tinygpt.chat.engine import ChatEngine
from tinygpt.chat.torch_backend import TorchBackend
from tinygpt.evaluation.benchmarks.shapes import (BENCHMARK, CAPTION_INSTRUCTION, MAX_NEW_TOKENS,  # noqa: F401
                                                   REFER_INSTRUCTION, VQA_INSTRUCTION, load, score)
from tinygpt.evaluation.predict import predict
from tinygpt.evaluation.shapes_metrics import (IOU_THRESHOLD, attribute_recall, caption_scores,  # noqa: F401
                                               grounding_iou, normalize_answer, normalize_text, token_f1,
                                               vqa_correct)
from tinygpt.model import load_vlm


def _printer(tasks: list[str]):
    """progress(done, total) that prints ``    vqa: 96/600`` per task (the samples come task by task)."""
    totals, before = Counter(tasks), {}
    for k, task in enumerate(tasks):
        before.setdefault(task, k)

    def progress(done: int, total: int) -> None:
        task = tasks[done - 1]
        print(f"    {task}: {done - before[task]}/{totals[task]}", flush=True)

    return progress


def evaluate_loaded(model, split_dir: str | os.PathLike, limit: int | None = None, batch_size: int = 48,
                    progress: bool = False, keep_predictions: int = 5) -> dict:
    """Evaluate an in-memory model; ``limit`` caps each of the three record lists (first N records). Returns the
    benchmark's figures (without its headline keys) and ``seconds``."""
    start = time.monotonic()
    backend = TorchBackend(model)
    caption_prompt = "bare" if backend.prompt.template.strip() == "{}" else "tagged"
    samples = load(Path(split_dir), BENCHMARK.splits[0], {"limit": limit, "caption_prompt": caption_prompt})
    engine = ChatEngine(backend, image_cache_size=max(1, len({s.images for s in samples})))  # each image once
    report = _printer([s.meta["task"] for s in samples]) if progress else None
    predictions = list(predict(engine, samples, batch_size, progress=report))
    figures = score(samples, predictions, "official", keep_examples=keep_predictions)
    figures = {k: v for k, v in figures.items() if k not in ("metric", "value", "n")}
    return {**figures, "seconds": round(time.monotonic() - start, 1)}


def evaluate_shapes(model_dir: str | os.PathLike, split_dir: str | os.PathLike, limit: int | None = None,
                    batch_size: int = 48, progress: bool = False) -> dict:
    """Load a model directory (whole or trainable-only) and evaluate it on a held-out shapes split."""
    model = load_vlm(model_dir)
    return evaluate_loaded(model, split_dir, limit=limit, batch_size=batch_size, progress=progress)
