"""Filtered Flickr30k grounding sets from MiniGPT-v2 (stage 4); images ``{image_id}.jpg`` under ``image_root``.

* grounded caption  ``groundedcaption.json`` ``[{"image_id", "grounded_caption"}]``: user
  ``"<Img><ImageHere></Img> [grounding] please describe this image in details "``, assistant the grounded caption
  (``a <p>man</p> {<x1><y1><x2><y2>}<delim>{...} rides ...``), raw.
* caption to phrase ``captiontobbox.json`` ``[{"image_id", "caption", "output"}]``: user
  ``"<Img><ImageHere></Img> [detection] {caption} "``, assistant ``output`` raw.
* object to phrase  ``phrasetobbox.json`` ``[{"image_id", "phrase", "bbox": "{<x1><y1><x2><y2>}"}]``: user
  ``"<Img><ImageHere></Img> [detection] {phrase} "``, assistant ``"<p>{phrase}</p> {bbox}"``.
Boxes are already text on the 0-100 grid; every one must parse and lie on 0..100 (else the record is bad).
"""

from __future__ import annotations

from typing import Optional

from tinygpt.data.bad_records import BadRecord, BadRecordPolicy
from tinygpt.data.formats.base import Record, RecordDataset, image_file_name, iter_json_list, require
from tinygpt.errors import UserError
from tinygpt.tasks import (DETECTION_PROMPTS, GROUNDING_PROMPTS, box_is_valid, format_phrase_box, parse_boxes,
                           wrap_instruction)

FLICKR_TASKS = ("grounded_caption", "caption_to_phrase", "object_to_phrase")


def check_box_text(text: str, field: str, at_least_one: bool = True) -> None:
    boxes = parse_boxes(text)
    if at_least_one and not boxes:
        raise BadRecord(f"field {field!r} holds no {{<x1><y1><x2><y2>}} box")
    for _, box in boxes:
        if not box_is_valid(box):
            raise BadRecord(f"box {box} in field {field!r} lies outside the image (0..100 grid) or is reversed")


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
            check_box_text(caption, "grounded_caption")
            data = caption
        elif self.task == "caption_to_phrase":
            output = require(entry, "output")
            check_box_text(output, "output")
            data = (require(entry, "caption"), output)
        else:
            box = require(entry, "bbox")
            check_box_text(box, "bbox")
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
