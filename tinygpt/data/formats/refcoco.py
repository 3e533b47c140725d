"""RefCOCO / RefCOCO+ / RefCOCOg referring expressions (stage 4) and their inverse ("identify") tasks.

Layout (as the REFER API): ``<ann_root>/<dataset>/refs(<split_by>).p`` (a pickle: a list of
``{"ref_id", "ann_id", "image_id", "split", "sentences": [{"raw", ...}], ...}``; read with a restricted unpickler)
and ``<ann_root>/<dataset>/instances.json`` (COCO ``images`` with width/height, ``annotations`` with
``bbox`` = [x, y, w, h]); images ``COCO_train2014_{image_id:012d}.jpg`` under ``image_root``.
dataset/split_by: refcoco/unc, refcoco+/unc, refcocog/umd. Only refs of ``split`` (default "train") are used.

* refer:    user ``"<Img><ImageHere></Img> [refer] give me the location of {sentence} "``, assistant the box text.
* identify: user ``"<Img><ImageHere></Img> [identify] what is it in {box} "``, assistant the sentence.
The sentence passes through blip_caption; the box is ``{<x1><y1><x2><y2>}`` on 0-100 of the decoded image size.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

from tinygpt.data.bad_records import BadRecord, BadRecordPolicy
from tinygpt.data.formats.base import Record, RecordDataset, image_file_name, read_json, require
from tinygpt.data.formats.safe_pickle import load_plain_pickle
from tinygpt.data.text import blip_caption
from tinygpt.errors import UserError
from tinygpt.tasks import IDENTIFY_PROMPTS, REFER_PROMPTS, format_box, wrap_instruction

DEFAULT_SPLIT_BY = {"refcoco": "unc", "refcoco+": "unc", "refcocog": "umd"}
BOX_TOLERANCE_PX = 1.0  # COCO boxes may overshoot the border by rounding


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_box_xywh(box: Any, width: Optional[float], height: Optional[float]) -> tuple[float, float, float, float]:
    """[x, y, w, h] -> (x1, y1, x2, y2), or BadRecord when it is malformed, empty or outside a W x H image
    (clamped to the image when it overshoots by at most one pixel)."""
    if not isinstance(box, (list, tuple)) or len(box) != 4 or not all(_finite(v) for v in box):
        raise BadRecord(f"box must be 4 finite numbers [x, y, w, h], got {box!r}")
    for side, value in (("width", width), ("height", height)):
        if value is not None and not (_finite(value) and value > 0):
            raise BadRecord(f"the image's {side} must be a positive number, got {value!r}")
    x, y, w, h = (float(v) for v in box)
    if w <= 0 or h <= 0:
        raise BadRecord(f"box {box!r} has no area")
    x1, y1, x2, y2 = x, y, x + w, y + h
    if width is not None and height is not None:
        if x1 < -BOX_TOLERANCE_PX or y1 < -BOX_TOLERANCE_PX or x2 > width + BOX_TOLERANCE_PX \
                or y2 > height + BOX_TOLERANCE_PX:
            raise BadRecord(f"box {box!r} lies outside the {width:g}x{height:g} image")
        x1, y1, x2, y2 = max(0.0, x1), max(0.0, y1), min(float(width), x2), min(float(height), y2)
    elif x1 < 0 or y1 < 0:
        raise BadRecord(f"box {box!r} has a negative corner")
    return x1, y1, x2, y2


def refcoco_files(ann_root: str, dataset: str, split_by: Optional[str] = None) -> tuple[Path, Path]:
    """(refs pickle, instances.json) that a dataset reads under ``ann_root``; the config check tests that they
    exist before any model loads."""
    folder = Path(ann_root) / dataset
    return folder / f"refs({split_by or DEFAULT_SPLIT_BY[dataset]}).p", folder / "instances.json"


def _key(value: Any) -> bool:
    return isinstance(value, (int, str)) and not isinstance(value, bool)


class RefCOCO(RecordDataset):
    def __init__(self, ann_root: str, image_root: str, *, image_size: int, seed: int,
                 bad_records: Optional[BadRecordPolicy] = None, name: str = "refcoco", dataset: str = "refcoco",
                 split_by: Optional[str] = None, split: str = "train", inverse: bool = False,
                 image_name: str = "COCO_train2014_{image_id:012d}.jpg", process_text: bool = True) -> None:
        if dataset not in DEFAULT_SPLIT_BY:
            raise UserError(f"dataset {name!r}: dataset must be one of {sorted(DEFAULT_SPLIT_BY)}, got {dataset!r}")
        refs_path, instances_path = refcoco_files(ann_root, dataset, split_by)
        super().__init__(name=name, source=refs_path, root=image_root, image_size=image_size, seed=seed,
                         bad_records=bad_records)
        self.inverse = inverse
        self.process_text = process_text
        refs = load_plain_pickle(refs_path)
        if not isinstance(refs, list):
            raise UserError(f"{refs_path}: expected a list of refs, got {type(refs).__name__}")
        instances = read_json(instances_path)
        if not isinstance(instances, dict) or not isinstance(instances.get("annotations"), list) \
                or not isinstance(instances.get("images"), list):
            raise UserError(f"{instances_path}: expected a COCO object with 'images' and 'annotations' lists")
        # ids that cannot be keys (a list from a damaged file) match no ref: those refs are bad records
        annotations = {a.get("id"): a for a in instances["annotations"] if isinstance(a, dict) and _key(a.get("id"))}
        images = {i.get("id"): i for i in instances["images"] if isinstance(i, dict) and _key(i.get("id"))}
        for index, ref in enumerate(refs):
            where = f"{refs_path} record {index}"
            self.add(where, lambda ref=ref: self._build(ref, split, annotations, images, image_name))
        self.finish()

    def _build(self, ref: Any, split: str, annotations: dict, images: dict, image_name: str) -> Optional[Record]:
        if require(ref, "split") != split:
            return None
        image_id = require(ref, "image_id", int)
        annotation = annotations.get(require(ref, "ann_id", int))
        if annotation is None:
            raise BadRecord(f"ann_id {ref['ann_id']} is not in instances.json")
        info = images.get(image_id, {})
        check_box_xywh(annotation.get("bbox"), info.get("width"), info.get("height"))
        sentences = [s.get("raw") for s in require(ref, "sentences", list) if isinstance(s, dict)]
        sentences = [s for s in sentences if isinstance(s, str) and s.strip()]
        if not sentences:
            raise BadRecord("no sentence with a 'raw' text")
        return Record([image_file_name(image_name, ref)], (sentences, annotation["bbox"]))

    def make_turns(self, record, sizes, rng):
        sentences, bbox = record.data
        width, height = sizes[0]
        box = format_box(check_box_xywh(bbox, width, height), width, height)
        sentence = rng.choice(sentences)
        sentence = blip_caption(sentence) if self.process_text else sentence.strip()
        if self.inverse:
            return [{"user": wrap_instruction(rng.choice(IDENTIFY_PROMPTS).format(box)), "assistant": sentence}]
        return [{"user": wrap_instruction(rng.choice(REFER_PROMPTS).format(sentence)), "assistant": box}]
