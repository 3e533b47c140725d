"""RefCOCO, RefCOCO+ and RefCOCOg: find the box a referring expression names; accuracy at IoU >= 0.5.

Layout (the REFER API's ``refcoco.zip``, ``refcoco+.zip``, ``refcocog.zip``; COCO train2014 images)::

    root/refs(unc).p      (RefCOCOg: refs(umd).p) a pickle of a list of refs: {"ref_id": 0, "ann_id": 1719310,
                          "image_id": 581857, "split": "testA", "sentences": [{"raw": "the lady with the blue shirt",
                          "sent": "the lady with the blue shirt", "sent_id": 0}, ...], ...}
    root/instances.json   {"images": [{"id": 581857, "file_name": "COCO_train2014_000000581857.jpg", "width": 640,
                          "height": 427}], "annotations": [{"id": 1719310, "image_id": 581857,
                          "bbox": [103.93, 299.99, 238.15, 77.58]}], ...}
    root/train2014/COCO_train2014_000000581857.jpg   (usually elsewhere: set options.images to COCO's train2014)

``root`` may also be the folder holding ``refcoco/``, ``refcoco+/``, ``refcocog/``. The pickle is read with a
restricted unpickler that runs no code. Splits: ``val`` (default), ``testA``, ``testB`` (RefCOCOg: ``val``,
``test``). One sample per sentence of each ref of the split; id ``{ref_id}_{index of the sentence}``. The
reference box is the annotation's ``bbox`` [x, y, w, h] as (x1, y1, x2, y2) pixels.

Prompt fields: ``{sentence}`` (the ``raw`` text; also as ``{question}``). Official and ``tinygpt-v``: ``[refer] give
me the location of {sentence}`` (MiniGPT-v2's and TinyGPT-V's ``eval_ref.py``). Up to 20 new tokens.

Scoring: official = Acc@0.5: the first box of the answer (``{<x1><y1><x2><y2>}`` on the 0-100 grid,
`tinygpt.chat.boxes.answer_boxes`) against the reference, a hit when IoU >= 0.5 (`metrics.iou_hits`), with
``mean_iou`` and ``unparsed`` (share of answers with no box). tinygpt-v-compat = `compat.refcoco_compat` (the
original script: the answer must start with the box, +1-pixel IoU, a hit when IoU > 0.5). TinyGPT-V published no
RefCOCO figure; its own evaluation log records 6.03 (val), 6.75 (testA), 5.36 (testB).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from ...chat.boxes import answer_boxes
from ...data.bad_records import BadRecord
from ...data.formats.base import read_json
from ...data.formats.refcoco import check_box_xywh
from ...data.formats.safe_pickle import load_plain_pickle
from ...errors import UserError
from ...tasks import format_box
from ..benchmark import Benchmark, Prediction, Sample
from ..compat import refcoco_compat
from ..metrics import iou_hits, mean
from .common import (aligned, check_scoring, fill, image_dir, image_file, need, parse_options, published, take,
                     template, text_of)

PROMPT = "[refer] give me the location of {sentence}"
MAX_NEW_TOKENS = 20


def _index(path: Path, content, key: str, where_key: str = "id") -> dict:
    if not isinstance(content, dict) or not isinstance(content.get(key), list):
        raise UserError(f"{path}: missing field {key!r} (a list)")
    return {need(entry, where_key, f"{path} {key}[{i}]", int): entry for i, entry in enumerate(content[key])}


def _data_files(name: str, split_by: str):
    def data_files(root: Path, split: str, options: dict) -> list[Path]:
        """The refs pickle and the instances file `load` reads (in ``root/<name>/`` when the refs are there)."""
        root = Path(root)
        folder = root / name if (root / name / f"refs({split_by}).p").is_file() else root
        return [folder / f"refs({split_by}).p", folder / "instances.json"]

    return data_files


def _loader(name: str, split_by: str):
    def load(root: Path, split: str, options: dict) -> list[Sample]:
        opts = parse_options(name, options)
        root = Path(root)
        refs_path, instances_path = _data_files(name, split_by)(root, split, options)
        prompt = template(opts, PROMPT, PROMPT, ("sentence", "question"))
        refs = load_plain_pickle(refs_path)
        if not isinstance(refs, list):
            raise UserError(f"{refs_path}: expected a list of refs, got {type(refs).__name__}")
        instances = read_json(instances_path, "COCO instances file")
        image_index = _index(instances_path, instances, "images")
        annotation_index = _index(instances_path, instances, "annotations")
        images = image_dir(root, opts, "train2014")

        def samples() -> Iterator[Sample]:
            for number, ref in enumerate(refs):
                where = f"{refs_path} ref {number}"
                if need(ref, "split", where) != split:
                    continue
                ref_id = need(ref, "ref_id", where, int)
                annotation = annotation_index.get(need(ref, "ann_id", where, int))
                image = image_index.get(need(ref, "image_id", where, int))
                if annotation is None or image is None:
                    missing = "annotation" if annotation is None else "image"
                    raise UserError(f"{instances_path}: missing the {missing} of ref {ref_id} (field "
                                    f"{'ann_id' if annotation is None else 'image_id'} of {where})")
                image_where = f"{instances_path} image {image['id']}"
                size = tuple(need(image, key, image_where, (int, float)) for key in ("width", "height"))
                try:
                    box = check_box_xywh(annotation.get("bbox"), *size)
                except BadRecord as exc:
                    raise UserError(f"{instances_path} annotation {annotation.get('id')}: field 'bbox': {exc}"
                                    ) from None
                file_name = image.get("file_name") or f"COCO_train2014_{image['id']:012d}.jpg"
                path = image_file(images, file_name, image_where)
                for index, sentence in enumerate(need(ref, "sentences", where, list)):
                    text = need(sentence, "raw", f"{where} sentences[{index}]")
                    yield Sample(id=f"{ref_id}_{index}", images=(path,),
                                 prompt=fill(prompt, sentence=text, question=text), max_new_tokens=MAX_NEW_TOKENS,
                                 answers=(format_box(box, *size),), box=box, image_size=size,
                                 meta={"ref_id": ref_id, "sent_id": sentence.get("sent_id")})

        return take(samples(), opts)

    return load


def first_box(text: str, image_size: tuple[int, int]):
    boxes = answer_boxes(text, *image_size)
    return boxes[0][1] if boxes else None


def score(samples: list[Sample], predictions: list[Prediction], scoring: str) -> dict:
    check_scoring(scoring)
    texts = [text_of(p) for p in aligned(samples, predictions)]
    official = iou_hits([first_box(text, s.image_size) for text, s in zip(texts, samples)], [s.box for s in samples])
    if scoring == "tinygpt-v-compat":
        hits = [refcoco_compat(text, s.box, s.image_size) for text, s in zip(texts, samples)]
        return {"metric": "acc@0.5", "value": mean(hits), "n": len(samples), "unparsed": official["unparsed"]}
    return {"metric": "acc@0.5", "value": official["accuracy"], "n": official["n"],
            "mean_iou": official["mean_iou"], "unparsed": official["unparsed"]}


_LAYOUT = ('root/{refs} [{{"ref_id": 0, "ann_id": 1719310, "image_id": 581857, "split": "val", "sentences": '
           '[{{"raw": "the lady with the blue shirt"}}]}}] + root/instances.json {{"images": [{{"id": 581857, '
           '"file_name": "COCO_train2014_000000581857.jpg", "width": 640, "height": 427}}], "annotations": '
           '[{{"id": 1719310, "bbox": [103.9, 300.0, 238.2, 77.6]}}]}} + COCO train2014 images (options.images)')

VARIANTS = (  # name, title, how the refs were split, splits
    ("refcoco", "RefCOCO (unc)", "unc", ("val", "testA", "testB")),
    ("refcoco+", "RefCOCO+ (unc)", "unc", ("val", "testA", "testB")),
    ("refcocog", "RefCOCOg (umd)", "umd", ("val", "test")),
)
BENCHMARKS = {
    name: Benchmark(name=name, title=title, splits=splits, metric="acc@0.5", load=_loader(name, split_by),
                    score=score, layout=_LAYOUT.format(refs=f"refs({split_by}).p"), paper=published(name))
    for name, title, split_by, splits in VARIANTS
}
DATA_FILES = {name: _data_files(name, split_by) for name, _, split_by, _ in VARIANTS}
