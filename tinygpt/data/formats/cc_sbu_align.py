"""MiniGPT-4's cc_sbu_align set (stage 3): ``<root>/filter_cap.json`` and ``<root>/image/{image_id}.jpg``.

``filter_cap.json`` = ``{"annotations": [{"image_id": "2", "caption": "..."}, ...]}``.
Sample: user = a random line of the alignment prompt list (``<Img><ImageHere></Img> Describe this image in
detail.`` ...; shipped in ``tinygpt/prompts/alignment.txt``), assistant = the caption, raw.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from tinygpt.data.bad_records import BadRecordPolicy
from tinygpt.data.formats.base import Record, RecordDataset, image_file_name, iter_json_list, require
from tinygpt.data.text import load_prompt_list


class CCSBUAlign(RecordDataset):
    def __init__(self, root: str, *, image_size: int, seed: int, bad_records: Optional[BadRecordPolicy] = None,
                 name: str = "cc_sbu_align", ann_file: str = "filter_cap.json", image_dir: str = "image",
                 image_name: str = "{image_id}.jpg", prompt_path: Optional[str] = None) -> None:
        ann_path = Path(root) / ann_file
        super().__init__(name=name, source=ann_path, root=Path(root) / image_dir, image_size=image_size, seed=seed,
                         bad_records=bad_records)
        self.prompts = load_prompt_list(prompt_path)
        for where, entry in iter_json_list(ann_path, "annotations"):
            self.add(where, lambda entry=entry: self._build(entry, image_name))
        self.finish()

    @staticmethod
    def _build(entry: dict, image_name: str) -> Record:
        caption = require(entry, "caption")
        require(entry, "image_id", (str, int))
        return Record([image_file_name(image_name, entry)], caption)

    def make_turns(self, record, sizes, rng):
        return [{"user": rng.choice(self.prompts), "assistant": record.data}]
