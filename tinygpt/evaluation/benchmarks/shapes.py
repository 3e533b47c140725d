"""The synthetic shapes suite: captions, VQA and grounding on the held-out split of ``tinygpt.tiny.synthetic``.

Layout: ``LAYOUT`` below (the generator writes it under ``<data>/eval``).

Samples, in this order: the captions (``caption/<i>``), the questions (``vqa/<i>``), the phrases (``refer/<i>``),
``i`` the record's position in its file; ``meta["task"]`` is caption / vqa / refer, ``meta["kind"]`` the question's
kind (the task's name for captions and phrases). The user texts are the training wording (the model's own template
and end symbol are added by the chat engine):

* caption: ``<Img><ImageHere></Img> [caption] Briefly describe this image. `` (``caption_prompt: tagged``, the
  default) or the bare image ``<ImageHere>`` (``caption_prompt: bare``: models trained with the template ``"{}"``,
  stages 1-2 of the tiny recipe; `caption_prompt_for(engine)` chooses from the engine's template); 48 new tokens;
* vqa: ``<Img><ImageHere></Img> [vqa] {question} ``; 8 new tokens;
* refer: ``<Img><ImageHere></Img> [refer] give me the location of {phrase} ``; 20 new tokens.

Options: ``limit`` (the first N records of each of the three files, as the tiny recipe counts them) and
``caption_prompt``. Scores (the same under both scorings: the suite has one scorer): the figures of
tinygpt.evaluation.shapes_metrics, ``vqa_unparsed`` = the share of answers that are no answer of the whole file at
all (garbage, not a wrong answer), ``grounding_unparsed`` = answers without a box; the headline is VQA accuracy.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Sequence

from ...data.bad_records import BadRecord
from ...data.image import safe_join
from ...errors import UserError
from ...tasks import IMAGE_PLACEHOLDER, wrap_instruction
from ..benchmark import SCORINGS, Benchmark, Prediction, Sample
from ..metrics import mean
from ..shapes_metrics import IOU_THRESHOLD, caption_scores, grounding_iou, normalize_answer, vqa_correct
from .common import SAME_AS_OFFICIAL

CAPTION_INSTRUCTION = "[caption] Briefly describe this image."
VQA_INSTRUCTION = "[vqa] {}"
REFER_INSTRUCTION = "[refer] give me the location of {}"
MAX_NEW_TOKENS = {"caption": 48, "vqa": 8, "refer": 20}
CAPTION_PROMPTS = {"tagged": wrap_instruction(CAPTION_INSTRUCTION), "bare": IMAGE_PLACEHOLDER}
OPTIONS = ("limit", "caption_prompt")
EXAMPLES = 5  # predictions kept per task in the scores' "examples"
FILES = {"caption": "captions.json", "vqa": "vqa.json", "refer": "refer.json"}
LAYOUT = """\
images/shapes_eval_000001.jpg
captions.json  [{"image": "images/shapes_eval_000001.jpg",
                 "caption": ["three shapes, a small purple triangle on the left, ..."]}, ...]
vqa.json       [{"image": "images/shapes_eval_000001.jpg", "question": "what color is the triangle?",
                 "answer": ["purple", ...], "kind": "color"}, ...]        (LAVIS VQA records with a kind)
refer.json     [{"image": "images/shapes_eval_000001.jpg", "sents": "small purple triangle",
                 "bbox": [30, 87, 55, 55], "box_text": "{<13><38><37><63>}", "width": 224, "height": 224}, ...]
                                                                          (bbox: COCO x, y, w, h in pixels)"""


def read_records(path: Path) -> list[dict]:
    """The JSON list of records in ``path``; a UserError when it is missing or not a list of objects."""
    if not path.is_file():
        raise UserError(f"{path}: missing (write the split with: python -m tinygpt.tiny.synthetic --out DIR)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise UserError(f"{path}: expected a JSON list of records")
    return data


def caption_prompt_for(engine) -> str:
    """The ``caption_prompt`` option for a chat engine's model: "bare" when its template is ``"{}"``."""
    return "bare" if engine.backend.prompt.template.strip() == "{}" else "tagged"


def _options(options: dict) -> tuple[int | None, str]:
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise UserError(f"benchmark.options.{unknown[0]}: the shapes suite takes {', '.join(OPTIONS)}")
    limit = options.get("limit")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise UserError(f"benchmark.options.limit: expected an integer >= 1 (or null), got {limit!r}")
    prompt = options.get("caption_prompt", "tagged")
    if prompt not in CAPTION_PROMPTS:
        raise UserError(f"benchmark.options.caption_prompt: expected one of {', '.join(CAPTION_PROMPTS)}, "
                        f"got {prompt!r}")
    return limit, prompt


def _sample(root: Path, task: str, index: int, record: dict, caption_prompt: str,
            answer_set: tuple[str, ...]) -> Sample:
    image = str(safe_join(root, record["image"]))
    if not Path(image).is_file():
        raise BadRecord(f"{record['image']} does not exist")
    common = {"id": f"{task}/{index}", "images": (image,), "max_new_tokens": MAX_NEW_TOKENS[task]}
    if task == "caption":
        return Sample(prompt=CAPTION_PROMPTS[caption_prompt], answers=tuple(record["caption"]),
                      meta={"task": task, "kind": task}, **common)
    if task == "vqa":
        return Sample(prompt=wrap_instruction(VQA_INSTRUCTION.format(record["question"])),
                      answers=tuple(record["answer"]),
                      meta={"task": task, "kind": record.get("kind", "all"), "question": record["question"],
                            "answer_set": answer_set}, **common)
    x, y, w, h = record["bbox"]
    return Sample(prompt=wrap_instruction(REFER_INSTRUCTION.format(record["sents"])), box=(x, y, x + w, y + h),
                  image_size=(record["width"], record["height"]),
                  meta={"task": task, "kind": task, "phrase": record["sents"], "bbox": list(record["bbox"]),
                        "box_text": record["box_text"]}, **common)


def data_files(root: Path, split: str, options: dict) -> list[Path]:
    """The three record files `load` reads (whatever the limit: it reads each whole)."""
    return [Path(root) / name for name in FILES.values()]


def load(root: Path, split: str, options: dict) -> list[Sample]:
    """The captions, the questions and the phrases of the split under ``root`` (see the module docstring)."""
    if split not in BENCHMARK.splits:
        raise UserError(f"benchmark.split: the shapes suite has the split {BENCHMARK.splits[0]!r}, got {split!r}")
    limit, caption_prompt = _options(options)
    root = Path(root)
    samples: list[Sample] = []
    answer_set: tuple[str, ...] = ()
    for task, name in FILES.items():
        records = read_records(root / name)
        if task == "vqa":  # "unparsed" means: not an answer of the whole file (the limit does not change it)
            try:
                answer_set = tuple(sorted({normalize_answer(a) for r in records for a in r.get("answer", [])}))
            except (TypeError, AttributeError):
                raise UserError(f"{root / name}: answer: expected a list of strings in every record") from None
        for index, record in enumerate(records[:limit]):
            try:
                samples.append(_sample(root, task, index, record, caption_prompt, answer_set))
            except KeyError as exc:
                raise UserError(f"{root / name}: record {index} lacks the field {exc}") from None
            except BadRecord as exc:
                raise UserError(f"{root / name}: record {index}: image: {exc}") from None
            except (TypeError, ValueError) as exc:
                raise UserError(f"{root / name}: record {index}: a field has the wrong type ({exc})") from None
    return samples


def _texts(samples: Sequence[Sample], predictions: Sequence[Prediction]) -> dict[str, list[tuple[Sample, str]]]:
    """(sample, answer) pairs per task, in sample order."""
    by_id = {p.id: p for p in predictions}
    out: dict[str, list[tuple[Sample, str]]] = {task: [] for task in FILES}
    for sample in samples:
        if sample.id not in by_id:
            raise UserError(f"predictions: no prediction for the sample {sample.id}")
        out[sample.meta["task"]].append((sample, by_id[sample.id].text or ""))
    return out


def score(samples: list[Sample], predictions: list[Prediction], scoring: str = "official",
          keep_examples: int = EXAMPLES) -> dict:
    """The suite's figures (fractions): caption F1 / exact / attribute recall, VQA accuracy overall and per kind,
    grounding accuracy at IoU > 0.5 and mean IoU, the unparsed shares, counts, and the first `keep_examples` answers
    of each task (caption: [reference, answer]; vqa: [question, answer, prediction]; refer: [phrase, box, answer])."""
    if scoring not in SCORINGS:
        raise UserError(f"scoring: expected one of {', '.join(SCORINGS)}, got {scoring!r}")
    texts = _texts(samples, predictions)
    captions = [caption_scores(text, list(s.answers)) for s, text in texts["caption"]]
    per_kind: dict[str, list[bool]] = defaultdict(list)
    for s, text in texts["vqa"]:
        per_kind[s.meta["kind"]].append(vqa_correct(text, list(s.answers)))
    answer_set = set(texts["vqa"][0][0].meta["answer_set"]) if texts["vqa"] else set()
    ious = [grounding_iou(text, s.meta["bbox"], *s.image_size) for s, text in texts["refer"]]
    hits = [float(hit) for kind_hits in per_kind.values() for hit in kind_hits]
    figures = {
        "caption_f1": mean(c["f1"] for c in captions),
        "caption_exact": mean(c["exact"] for c in captions),
        "caption_attribute_recall": mean(c["attribute_recall"] for c in captions),
        "vqa_accuracy": mean(hits),
        "vqa_per_kind": {kind: mean(float(h) for h in kind_hits) for kind, kind_hits in sorted(per_kind.items())},
        "vqa_unparsed": mean(float(normalize_answer(text) not in answer_set) for _, text in texts["vqa"]),
        "grounding_accuracy": mean(float(v is not None and v > IOU_THRESHOLD) for v in ious),
        "grounding_mean_iou": mean(v or 0.0 for v in ious),
        "grounding_unparsed": mean(float(v is None) for v in ious),
        "counts": {"captions": len(captions), "vqa": len(hits), "refer": len(ious)},
        "examples": {
            "caption": [[s.answers[0], text] for s, text in texts["caption"][:keep_examples]],
            "vqa": [[s.meta["question"], s.answers[0], text] for s, text in texts["vqa"][:keep_examples]],
            "refer": [[s.meta["phrase"], s.meta["box_text"], text] for s, text in texts["refer"][:keep_examples]],
        },
    }
    result = {"metric": "vqa_accuracy", "value": figures["vqa_accuracy"], "n": len(samples), **figures}
    if scoring == "tinygpt-v-compat":  # one scorer: the tiny recipe's own metrics (no lenient variant exists)
        result["compat"] = SAME_AS_OFFICIAL
    return result


BENCHMARK = Benchmark(
    name="shapes",
    title="Synthetic shapes (held-out)",
    splits=("held-out",),
    metric="vqa_accuracy",
    load=load,
    score=score,
    layout=LAYOUT,
)
