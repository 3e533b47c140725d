"""Unnatural Instructions, text only (stage 4): no image, no placeholder.

File: a JSON list (MiniGPT-v2's filtered copy) or JSON lines (the original ``core_data.jsonl``) of
``{"instances": [{"instruction_with_input", "constraints", "output"}, ...]}``; the first instance is used.
``constraints`` is optional: a string, or a list of strings joined with spaces; any other type makes the record bad.
Sample: user ``blip_caption(instruction_with_input + " " + constraints)``, assistant ``blip_caption(output)``
(lower-cased, punctuation stripped, at most 50 words, as the original; ``process_text=False`` keeps them raw).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from tinygpt.data.bad_records import BadRecord, BadRecordPolicy
from tinygpt.data.formats.base import (Record, RecordDataset, iter_json_list, iter_jsonl, looks_like_json_list,
                                       require)
from tinygpt.data.text import blip_caption


def _constraints_text(constraints: object) -> str:
    """The ``constraints`` of an instance as one text: a string as written, a list of strings joined with spaces
    (blank items left out), absent or null: none; any other type is a BadRecord naming the field."""
    if constraints is None:
        return ""
    if isinstance(constraints, str):
        return constraints if constraints.strip() else ""
    if isinstance(constraints, list) and all(isinstance(item, str) for item in constraints):
        return " ".join(item.strip() for item in constraints if item.strip())
    kind = type(constraints).__name__ if not isinstance(constraints, list) else "a list holding a non-string"
    raise BadRecord(f"field 'constraints' must be a string or a list of strings, got {kind}")


class UnnaturalInstructions(RecordDataset):
    def __init__(self, ann_path: str, *, image_size: int, seed: int, bad_records: Optional[BadRecordPolicy] = None,
                 name: str = "unnatural_instruction", process_text: bool = True) -> None:
        super().__init__(name=name, source=ann_path, root=None, image_size=image_size, seed=seed,
                         bad_records=bad_records)
        self.process_text = process_text
        path = Path(ann_path)
        entries = iter_json_list(path) if looks_like_json_list(path) else iter_jsonl(path, self.record_counter)
        for where, entry in entries:
            self.add(where, lambda entry=entry: self._build(entry))
        self.finish()

    @staticmethod
    def _build(entry: dict) -> Record:
        instances = require(entry, "instances", list)
        if not instances or not isinstance(instances[0], dict):
            raise BadRecord("field 'instances' holds no instance object")
        info = instances[0]
        instruction = require(info, "instruction_with_input")
        constraints = _constraints_text(info.get("constraints"))
        if constraints:
            instruction = instruction + " " + constraints
        return Record([], (instruction, require(info, "output")))

    def make_turns(self, record, sizes, rng):
        instruction, output = record.data
        if self.process_text:
            instruction, output = blip_caption(instruction), blip_caption(output)
        if not instruction or not output:
            raise BadRecord("instruction or output is empty after text processing")
        return [{"user": instruction, "assistant": output}]
