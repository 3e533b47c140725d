"""The synthetic shapes suite: captioning, VQA and grounding on the held-out split of ``tinygpt.tiny.synthetic``.

Split layout (written by the generator under ``<data>/eval``): ``images/``, ``vqa.json`` (LAVIS VQA records with a
``kind``), ``refer.json`` (phrase + COCO box [x, y, w, h] + image size), ``captions.json`` (reference captions).

Metrics:
* caption: token F1 against the best reference (lower-cased, punctuation and articles removed), exact match, and
  attribute recall = the share of reference objects whose "size colour shape" phrase appears in the caption;
* VQA: exact match after normalisation (case, punctuation, articles, number words -> digits), overall and per kind;
  ``vqa_unparsed`` is the share of answers that are no answer of the split at all (garbage, not a wrong answer);
* grounding: the first box parsed from the answer (``tinygpt.tasks.parse_boxes``), scaled to pixels; a hit when its
  IoU with the reference box is above 0.5 (the RefCOCO protocol); answers with no box count as misses.

Prompts: the model's own template and end symbol (from its config) wrap the user texts below. Models trained with
the bare template ``"{}"`` (stages 1-2: image -> caption) are asked for a caption with the bare image; every other
model with ``[caption] Briefly describe this image.``. Questions use ``[vqa] {question}``, grounding uses
``[refer] give me the location of {phrase}``, both in the stage-4 wording ``<Img><ImageHere></Img> {instruction} ``.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections import Counter, defaultdict
from pathlib import Path

import torch

from tinygpt.data.image import ImageTransform, load_image
from tinygpt.data.bad_records import BadRecord
from tinygpt.errors import UserError
from tinygpt.model import load_vlm
from tinygpt.tasks import IMAGE_PLACEHOLDER, box_to_pixels, iou, parse_boxes, wrap_instruction

CAPTION_INSTRUCTION = "[caption] Briefly describe this image."
VQA_INSTRUCTION = "[vqa] {}"
REFER_INSTRUCTION = "[refer] give me the location of {}"
MAX_NEW_TOKENS = {"caption": 48, "vqa": 8, "refer": 20}
IOU_THRESHOLD = 0.5

_ARTICLES = {"a", "an", "the"}
_NUMBERS = {"zero": "0", "no": "0", "none": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
            "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_PUNCTUATION = re.compile(r"[^\w\s]")
_OBJECT = re.compile(r"\b(small|large) (\w+) (circle|square|triangle|cross)\b")


# --- metric functions (pure) -----------------------------------------------------------------------------------------

def normalize_text(text: str) -> list[str]:
    """Lower-case words without punctuation and articles."""
    words = _PUNCTUATION.sub(" ", text.lower()).split()
    return [w for w in words if w not in _ARTICLES]


def normalize_answer(text: str) -> str:
    """VQA normalisation: ``normalize_text`` plus number words as digits ("Two." -> "2")."""
    return " ".join(_NUMBERS.get(w, w) for w in normalize_text(text))


def vqa_correct(prediction: str, answers: list[str]) -> bool:
    target = {normalize_answer(a) for a in answers}
    return normalize_answer(prediction) in target


def token_f1(prediction: str, reference: str) -> float:
    pred, ref = normalize_text(prediction), normalize_text(reference)
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def attribute_recall(prediction: str, reference: str) -> float:
    """Share of the reference's "size colour shape" objects named in the prediction (1.0 if it names none)."""
    wanted = [" ".join(m) for m in _OBJECT.findall(reference.lower())]
    if not wanted:
        return 1.0
    said = " ".join(normalize_text(prediction))
    return sum(phrase in said for phrase in wanted) / len(wanted)


def caption_scores(prediction: str, references: list[str]) -> dict:
    best = max(references, key=lambda r: token_f1(prediction, r))
    return {"f1": token_f1(prediction, best),
            "exact": float(" ".join(normalize_text(prediction)) in {" ".join(normalize_text(r)) for r in references}),
            "attribute_recall": attribute_recall(prediction, best)}


def grounding_iou(prediction: str, box_xywh: list[float], width: float, height: float) -> float | None:
    """IoU of the first box in ``prediction`` with the reference box; None when the answer has no box."""
    boxes = parse_boxes(prediction)
    if not boxes:
        return None
    x, y, w, h = box_xywh
    return iou(box_to_pixels(boxes[0][1], width, height), (x, y, x + w, y + h))


# --- running a model -------------------------------------------------------------------------------------------------

def _read_json(path: Path) -> list:
    if not path.is_file():
        raise UserError(f"{path}: missing (write the split with: python -m tinygpt.tiny.synthetic --out DIR)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a JSON list of records")
    return data


def caption_prompt(model) -> str:
    return IMAGE_PLACEHOLDER if model.config.prompt_template.strip() == "{}" else wrap_instruction(CAPTION_INSTRUCTION)


class _Features:
    """Q-Former outputs per image, computed once per evaluation and shared by all prompts about that image."""

    def __init__(self, model, root: Path, batch_size: int):
        self.model, self.root, self.batch_size = model, root, batch_size
        self.transform = ImageTransform(model.config.image_size)
        self.cache: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def load(self, names: list[str]) -> None:
        missing = sorted({n for n in names if n not in self.cache})
        for start in range(0, len(missing), self.batch_size):
            chunk = missing[start : start + self.batch_size]
            try:
                pixels = torch.stack([self.transform(load_image(self.root, n)) for n in chunk])
            except BadRecord as exc:
                raise UserError(f"{self.root}: {exc}") from None
            dtype = self.model.proj1.weight.dtype
            for name, feats in zip(chunk, self.model.qformer_features(pixels.to(dtype))):
                self.cache[name] = feats

    def get(self, names: list[str]) -> torch.Tensor:
        return torch.stack([self.cache[n] for n in names])


def _generate(model, features: _Features, items: list[tuple[str, str]], task: str, batch_size: int,
              progress: bool) -> list[str]:
    """Greedy answers for (image name, user text) items, in order."""
    end_sym = model.config.end_sym
    stops = list(model.config.stop_strings) or ([end_sym] if end_sym else [])
    answers: list[str] = []
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        features.load([name for name, _ in chunk])
        turns = [[{"user": user, "assistant": None}] for _, user in chunk]
        ids = model.generate(turns, [1] * len(chunk), image_features=features.get([n for n, _ in chunk]),
                             max_new_tokens=MAX_NEW_TOKENS[task], do_sample=False, num_beams=1, stop_strings=stops)
        for row in ids:
            text = model.decode_answer(row)
            answers.append(text.split(end_sym)[0].strip() if end_sym and end_sym in text else text)
        if progress:
            print(f"    {task}: {len(answers)}/{len(items)}", flush=True)
    return answers


def evaluate_loaded(model, split_dir: str | os.PathLike, limit: int | None = None, batch_size: int = 48,
                    progress: bool = False, keep_predictions: int = 5) -> dict:
    """Evaluate an in-memory model; ``limit`` caps each of the three record lists (first N records)."""
    root = Path(split_dir)
    all_vqa = _read_json(root / "vqa.json")
    vqa = all_vqa[:limit]
    refer = _read_json(root / "refer.json")[:limit]
    captions = _read_json(root / "captions.json")[:limit]
    start = time.monotonic()
    model.eval()
    features = _Features(model, root, batch_size)
    try:
        cap_pred = _generate(model, features, [(r["image"], caption_prompt(model)) for r in captions], "caption",
                             batch_size, progress)
        vqa_pred = _generate(model, features, [(r["image"], wrap_instruction(VQA_INSTRUCTION.format(r["question"])))
                                               for r in vqa], "vqa", batch_size, progress)
        ref_pred = _generate(model, features, [(r["image"], wrap_instruction(REFER_INSTRUCTION.format(r["sents"])))
                                               for r in refer], "refer", batch_size, progress)
    except KeyError as exc:
        raise UserError(f"{root}: a record lacks the field {exc}") from None
    cap = [caption_scores(p, r["caption"]) for p, r in zip(cap_pred, captions)]
    per_kind: dict[str, list[bool]] = defaultdict(list)
    for p, r in zip(vqa_pred, vqa):
        per_kind[r.get("kind", "all")].append(vqa_correct(p, r["answer"]))
    ious = [grounding_iou(p, r["bbox"], r["width"], r["height"]) for p, r in zip(ref_pred, refer)]
    answer_set = {normalize_answer(a) for r in all_vqa for a in r.get("answer", [])}
    vqa_hits = [hit for hits in per_kind.values() for hit in hits]
    mean = lambda values: sum(values) / len(values) if values else 0.0  # noqa: E731
    return {
        "caption_f1": mean([c["f1"] for c in cap]),
        "caption_exact": mean([c["exact"] for c in cap]),
        "caption_attribute_recall": mean([c["attribute_recall"] for c in cap]),
        "vqa_accuracy": mean([float(h) for h in vqa_hits]),
        "vqa_per_kind": {kind: mean([float(h) for h in hits]) for kind, hits in sorted(per_kind.items())},
        "vqa_unparsed": mean([float(normalize_answer(p) not in answer_set) for p in vqa_pred]),
        "grounding_accuracy": mean([float(v is not None and v > IOU_THRESHOLD) for v in ious]),
        "grounding_mean_iou": mean([v or 0.0 for v in ious]),
        "grounding_unparsed": mean([float(v is None) for v in ious]),
        "counts": {"captions": len(cap), "vqa": len(vqa_hits), "refer": len(ious)},
        "seconds": round(time.monotonic() - start, 1),
        "examples": {
            "caption": [[r["caption"][0], p] for r, p in zip(captions, cap_pred)][:keep_predictions],
            "vqa": [[r["question"], r["answer"][0], p] for r, p in zip(vqa, vqa_pred)][:keep_predictions],
            "refer": [[r["sents"], r["box_text"], p] for r, p in zip(refer, ref_pred)][:keep_predictions],
        },
    }


def evaluate_shapes(model_dir: str | os.PathLike, split_dir: str | os.PathLike, limit: int | None = None,
                    batch_size: int = 48, progress: bool = False) -> dict:
    """Load a model directory (whole or trainable-only) and evaluate it on a held-out shapes split."""
    model = load_vlm(model_dir)
    return evaluate_loaded(model, split_dir, limit=limit, batch_size=batch_size, progress=progress)
