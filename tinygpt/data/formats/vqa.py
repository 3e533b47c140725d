"""Visual question answering sets with the ``[vqa]`` task (stage 4), in the LAVIS annotation layout.

* coco_vqa: ``vqa_train.json`` (+ ``vqa_val.json``) ``[{"question_id", "question", "answer": [...10 answers],
  "image": "train2014/COCO_train2014_...jpg"}]``; ok_vqa: ``okvqa_train.json``, same layout.
* aok_vqa: ``aokvqa_v1p0_train.json`` ``[{"question_id", "question", "direct_answers": [...], "choices", "image"}]``.
  For these three the image is looked up by its base name under ``image_root``, the answer is drawn with
  probability proportional to its frequency among the annotators' answers (seeded), and questions whose image
  file is missing are dropped at construction (``skip_missing_images``, the original behaviour; reported once).
* gqa: ``train_balanced_questions.json`` ``[{"image": "n161313.jpg", "question", "answer"}]``; image relative to
  ``image_root``.
Sample: user ``"<Img><ImageHere></Img> [vqa] {question} "`` (or the "Based on the image, respond to this question
with a short answer:" wording), assistant the answer; question and answer pass through blip_caption.
"""

from __future__ import annotations

import logging
import os
import posixpath
from collections import Counter
from typing import Optional

from tinygpt.data.bad_records import BadRecord, BadRecordPolicy
from tinygpt.data.formats.base import Record, RecordDataset, iter_json_list, require
from tinygpt.data.image import checked_path
from tinygpt.data.text import blip_caption
from tinygpt.errors import UserError
from tinygpt.tasks import VQA_PROMPTS, wrap_instruction

logger = logging.getLogger("tinygpt.data")

VQA_VARIANTS = {  # variant: (answer field, image by base name)
    "coco_vqa": ("answer", True),
    "ok_vqa": ("answer", True),
    "aok_vqa": ("direct_answers", True),
    "gqa": ("answer", False),
}


def answer_weights(answers: list[str]) -> tuple[list[str], list[float]]:
    """Distinct answers in first-seen order and their frequency (count / total)."""
    counts = Counter(answers)
    distinct = list(dict.fromkeys(answers))
    return distinct, [counts[a] / len(answers) for a in distinct]


class VQADataset(RecordDataset):
    def __init__(self, ann_paths: str | list[str], image_root: str, *, variant: str, image_size: int, seed: int,
                 bad_records: Optional[BadRecordPolicy] = None, name: Optional[str] = None,
                 skip_missing_images: Optional[bool] = None, process_text: bool = True) -> None:
        if variant not in VQA_VARIANTS:
            raise UserError(f"vqa variant must be one of {', '.join(VQA_VARIANTS)}, got {variant!r}")
        paths = [ann_paths] if isinstance(ann_paths, str) else list(ann_paths)
        if not paths:
            raise UserError(f"dataset {name or variant!r}: ann_paths is empty")
        super().__init__(name=name or variant, source=paths[0] if len(paths) == 1 else ", ".join(paths),
                         root=image_root, image_size=image_size, seed=seed, bad_records=bad_records)
        self.answer_field, by_basename = VQA_VARIANTS[variant]
        self.process_text = process_text
        skip_missing = (variant != "gqa") if skip_missing_images is None else skip_missing_images
        dropped = total = 0
        for path in paths:
            for where, entry in iter_json_list(path):
                total += 1
                if skip_missing and self._image_missing(entry, by_basename):
                    dropped += 1
                    continue
                self.add(where, lambda entry=entry: self._build(entry, by_basename))
        if dropped:
            logger.warning("%s: dropped %d of %d questions whose image is missing under %s", self.source, dropped,
                           total, self.root)
        self.finish()

    @staticmethod
    def _image_name(entry: dict, by_basename: bool) -> str:
        image = require(entry, "image")
        return posixpath.basename(image.replace("\\", "/")) if by_basename else image

    def _image_missing(self, entry, by_basename: bool) -> bool:
        try:
            return not os.path.isfile(checked_path(self.root, self._image_name(entry, by_basename), self.resolved_dirs))
        except BadRecord:
            return False  # not "missing": let validation count it as bad

    def _build(self, entry: dict, by_basename: bool) -> Record:
        question = require(entry, "question")
        if self.answer_field == "answer" and isinstance(entry.get("answer"), str):
            answers = [require(entry, "answer")]
        else:
            answers = require(entry, self.answer_field, list)
            for number, answer in enumerate(answers):  # a number or an object among them would shift the weights
                if not isinstance(answer, str):
                    raise BadRecord(f"field {self.answer_field!r}[{number}] is {type(answer).__name__}, not a string")
        # an answer that text processing empties ("...") would be trained on as an empty answer
        answers = [a for a in answers if (blip_caption(a) if self.process_text else a).strip()]
        if not answers:
            raise BadRecord(f"field {self.answer_field!r} holds no answer text")
        return Record([self._image_name(entry, by_basename)], (question, answer_weights(answers)))

    def make_turns(self, record, sizes, rng):
        question, (answers, weights) = record.data
        answer = rng.choices(answers, weights=weights, k=1)[0]
        if self.process_text:
            question, answer = blip_caption(question), blip_caption(answer)
        return [{"user": wrap_instruction(rng.choice(VQA_PROMPTS).format(question)), "assistant": answer}]
