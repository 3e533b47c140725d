"""Short-caption sets with the ``[caption]`` task (stage 4): TextCaps and COCO captions.

* TextCaps ``TextCaps_0.1_train.json`` = ``{"data": [{"image_id", "caption_str", ...}]}``, images
  ``{image_id}.jpg`` under ``image_root``.
* COCO captions (LAVIS ``coco_karpathy_train.json``) = ``[{"image": "train2014/COCO_train2014_...jpg", "caption",
  "image_id"}]``; only entries whose image path contains "train" are kept (as the original); the file is looked up
  by its base name under ``image_root``.
Sample: user ``"<Img><ImageHere></Img> [caption] {one of 17 instructions} "``, assistant ``blip_caption(caption)``.
"""

from __future__ import annotations

import posixpath
from typing import Optional

from tinygpt.data.bad_records import BadRecordPolicy
from tinygpt.data.formats.base import Record, RecordDataset, image_file_name, iter_json_list, require
from tinygpt.data.text import blip_caption
from tinygpt.tasks import CAPTION_PROMPTS, wrap_instruction


class _CaptionDataset(RecordDataset):
    process_text = True

    def make_turns(self, record, sizes, rng):
        caption = blip_caption(record.data) if self.process_text else record.data.strip()
        return [{"user": wrap_instruction(rng.choice(CAPTION_PROMPTS)), "assistant": caption}]


class TextCaps(_CaptionDataset):
    def __init__(self, ann_path: str, image_root: str, *, image_size: int, seed: int,
                 bad_records: Optional[BadRecordPolicy] = None, name: str = "textcaps_caption",
                 image_name: str = "{image_id}.jpg", process_text: bool = True) -> None:
        super().__init__(name=name, source=ann_path, root=image_root, image_size=image_size, seed=seed,
                         bad_records=bad_records)
        self.process_text = process_text
        for where, entry in iter_json_list(ann_path, "data"):
            self.add(where, lambda entry=entry: Record([image_file_name(image_name, entry)],
                                                       require(entry, "caption_str")))
        self.finish()


class COCOCaption(_CaptionDataset):
    def __init__(self, ann_path: str, image_root: str, *, image_size: int, seed: int,
                 bad_records: Optional[BadRecordPolicy] = None, name: str = "coco_caption",
                 process_text: bool = True) -> None:
        super().__init__(name=name, source=ann_path, root=image_root, image_size=image_size, seed=seed,
                         bad_records=bad_records)
        self.process_text = process_text
        for where, entry in iter_json_list(ann_path):
            self.add(where, lambda entry=entry: self._build(entry))
        self.finish()

    @staticmethod
    def _build(entry: dict) -> Optional[Record]:
        image = require(entry, "image")
        if "train" not in image:
            return None
        return Record([posixpath.basename(image.replace("\\", "/"))], require(entry, "caption"))
