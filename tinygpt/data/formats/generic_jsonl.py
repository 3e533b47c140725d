"""tinygpt's own instruction format: JSON lines, any number of images, interleaved, multi-turn.

One object per line::

    {"images": ["cats/1.jpg", "cats/2.jpg"],
     "conversations": [{"user": "<image> and <image>: which cat is larger?", "assistant": "The left one."},
                       {"user": "What colour is it?", "assistant": "Grey."}]}

Each ``<image>`` in a user text marks where the next image of ``images`` goes (in order); their total count must
equal ``len(images)`` (0 for text-only lines). Image paths are relative to ``image_root`` (default: the folder of
the JSONL file) and may not leave it. Other fields (an ``id``, metadata) are ignored. ``<image>`` becomes
``<Img><ImageHere></Img>``; texts are used as written. Boxes in any text must be written as the project's box text,
``{<x1><y1><x2><y2>}`` with integers on the 0-100 grid (x1 <= x2, y1 <= y2); a malformed or out-of-range one (3 or
5 numbers, decimals, pixel coordinates, a missing brace) makes the line a bad record.
:func:`write_generic_jsonl` writes the same format, so a dataset round-trips.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Optional

from tinygpt.data.bad_records import BadRecord, BadRecordPolicy
from tinygpt.data.formats.base import (Record, RecordDataset, check_box_text, check_unicode, iter_jsonl,
                                       looks_like_json_list, require)
from tinygpt.errors import UserError
from tinygpt.io_utils import atomic_write_text
from tinygpt.tasks import IMAGE_PLACEHOLDER, IMAGE_TAG

IMAGE_TOKEN = "<image>"


def parse_generic_record(entry: object) -> tuple[list[str], list[dict]]:
    """(image paths, turns in sample form) of one JSONL object, or BadRecord saying what is wrong."""
    if not isinstance(entry, dict):
        raise BadRecord(f"expected a JSON object, got {type(entry).__name__}")
    images = entry.get("images", [])
    if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
        raise BadRecord("field 'images' must be a list of relative path strings")
    conversations = require(entry, "conversations", list)
    if not conversations:
        raise BadRecord("field 'conversations' is empty")
    turns = []
    for number, turn in enumerate(conversations):
        if not isinstance(turn, dict) or set(turn) != {"user", "assistant"} or not all(
                isinstance(turn[k], str) for k in ("user", "assistant")):
            raise BadRecord(f"conversations[{number}] must be {{\"user\": str, \"assistant\": str}}")
        for key in ("user", "assistant"):  # an empty question teaches an answer to nothing, as LLaVA's check says
            if not turn[key].strip():
                raise BadRecord(f"conversations[{number}].{key} is empty")
        for key in ("user", "assistant"):
            check_unicode(turn[key], f"conversations[{number}].{key}")
            if IMAGE_PLACEHOLDER in turn[key] or (key == "assistant" and IMAGE_TOKEN in turn[key]):
                raise BadRecord(f"conversations[{number}].{key} contains a reserved image marker")
            check_box_text(turn[key], f"conversations[{number}].{key}")
        turns.append({"user": turn["user"].replace(IMAGE_TOKEN, IMAGE_TAG), "assistant": turn["assistant"]})
    marked = sum(turn["user"].count(IMAGE_TOKEN) for turn in conversations)
    if marked != len(images):
        raise BadRecord(f"{marked} {IMAGE_TOKEN} markers in user texts but {len(images)} images")
    return images, turns


class GenericJsonl(RecordDataset):
    def __init__(self, path: str, image_root: Optional[str] = None, *, image_size: int, seed: int,
                 bad_records: Optional[BadRecordPolicy] = None, name: Optional[str] = None) -> None:
        path_obj = Path(path)
        super().__init__(name=name or path_obj.stem, source=path, root=image_root or path_obj.parent,
                         image_size=image_size, seed=seed, bad_records=bad_records)
        if looks_like_json_list(path_obj):  # else every line of it would be a bad record
            raise UserError(f"{path}: a JSON list, but generic_jsonl reads JSON lines, one object per line (write it "
                            "with tinygpt.data.formats.generic_jsonl.write_generic_jsonl)")
        for where, entry in iter_jsonl(path_obj, self.record_counter):
            self.add(where, lambda entry=entry: Record(*parse_generic_record(entry)))
        self.finish()

    def make_turns(self, record, sizes, rng):
        return [dict(turn) for turn in record.data]


def write_generic_jsonl(records: Iterable[dict], path: str | Path) -> int:
    """Write records ``{"images": [relative paths], "turns": [{"user", "assistant"}]}`` as generic JSONL.

    User texts may mark images with ``<Img><ImageHere></Img>`` (the form the loader produces), ``<ImageHere>`` or
    ``<image>``; all become ``<image>``. The marker count must equal the number of images (UserError otherwise).
    Written atomically; returns the number of lines.
    """
    lines = []
    for number, record in enumerate(records):
        images = list(record.get("images", []))
        turns = record.get("turns", record.get("conversations"))
        if not isinstance(turns, list) or not turns:
            raise UserError(f"{path}: record {number} has no turns")
        conversations = []
        for turn in turns:
            user = turn["user"].replace(IMAGE_TAG, IMAGE_TOKEN).replace(IMAGE_PLACEHOLDER, IMAGE_TOKEN)
            conversations.append({"user": user, "assistant": turn["assistant"]})
        entry = {"images": [str(p) for p in images], "conversations": conversations}
        try:
            parse_generic_record(entry)
        except BadRecord as exc:
            raise UserError(f"{path}: record {number} cannot be written: {exc}") from None
        lines.append(json.dumps(entry, ensure_ascii=False))
    atomic_write_text(path, "".join(line + "\n" for line in lines))
    return len(lines)
