"""Filtered Flickr30k grounding sets from MiniGPT-v2 (stage 4); images ``{image_id}.jpg`` under ``image_root``.

* grounded caption  ``groundedcaption.json`` ``[{"image_id", "grounded_caption"}]``: user
  ``"<Img><ImageHere></Img> [grounding] please describe this image in details "``, assistant the grounded caption
  (``a <p>man</p> {<x1><y1><x2><y2>}<delim>{...} rides ...``), raw.
* caption to phrase ``captiontobbox.json`` ``[{"image_id", "caption", "output"}]``: user
  ``"<Img><ImageHere></Img> [detection] {caption} "``, assistant ``output`` raw.
* object to phrase  ``phrasetobbox.json`` ``[{"image_id", "phrase", "bbox": "{<x1><y1><x2><y2>}"}]``: user
  ``"<Img><ImageHere></Img> [detection] {phrase} "``, assistant ``"<p>{phrase}</p> {bbox}"``; ``bbox`` holds boxes
  only (several joined by ``<delim>``), any other text in it makes the record bad.
Boxes are already text on the 0-100 grid; every one (not just the first of a phrase) must be written
``{<x1><y1><x2><y2>}`` with integers on 0..100, x1 <= x2, y1 <= y2, else the record is bad
(:func:`tinygpt.data.formats.base.check_box_text`).
"""

from __future__ import annotations

from typing import Optional

from tinygpt.data.bad_records import BadRecordPolicy
from tinygpt.data.formats.base import (Record, RecordDataset, check_box_text, check_boxes_only, image_file_name,
                                       iter_json_list, require)
from tinygpt.errors import UserError
from tinygpt.tasks import DETECTION_PROMPTS, GROUNDING_PROMPTS, format_phrase_box, wrap_instruction

FLICKR_TASKS = ("grounded_caption", "caption_to_phrase", "object_to_phrase")


class FlickrGrounding(RecordDataset):
    def __init__(self, ann_path: str, image_root: str, *, task: str, image_size: int, seed: int,
                 bad_records: Optional[BadRecordPolicy] = None, name: Optional[str] = None,
                 image_name: str = "{image_id}.jpg") -> None:
        if task not in FLICKR_TASKS:
            raise UserError(f"flickr task must be one of {', '.join(FLICKR_TASKS)}, got {task!r}")
        super().__init__(name=name or f"flickr_{task}", source=ann_path, root=image_root, image_size=image_size,
                         seed=seed, bad_records=bad_records)
        self.task = task
        for where, entry in iter_json_list(ann_path):
            self.add(where, lambda entry=entry: self._build(entry, image_name))
        self.finish()

    def _build(self, entry: dict, image_name: str) -> Record:
        require(entry, "image_id", (str, int))
        if self.task == "grounded_caption":
            caption = require(entry, "grounded_caption")
            check_box_text(caption, "field 'grounded_caption'", at_least_one=True)
            data = caption
        elif self.task == "caption_to_phrase":
            output = require(entry, "output")
            check_box_text(output, "field 'output'", at_least_one=True)
            data = (require(entry, "caption"), output)
        else:
            box = require(entry, "bbox")
            check_boxes_only(box, "field 'bbox'")  # the answer is "<p>phrase</p> {bbox}": no other text may ride
            data = (require(entry, "phrase"), box)
        return Record([image_file_name(image_name, entry)], data)

    def make_turns(self, record, sizes, rng):
        if self.task == "grounded_caption":
            return [{"user": wrap_instruction(rng.choice(GROUNDING_PROMPTS)), "assistant": record.data}]
        text, answer = record.data
        user = wrap_instruction(rng.choice(DETECTION_PROMPTS).format(text))
        if self.task == "object_to_phrase":
            answer = format_phrase_box(text, answer)
        return [{"user": user, "assistant": answer}]
