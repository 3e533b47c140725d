"""Visual Genome region descriptions as referring expressions ("refvg", stage 4).

Layout (as the ``visual_genome`` package's ``local`` module reads it): ``<root>/region_descriptions.json`` =
``[{"id": image_id, "regions": [{"region_id", "image_id", "phrase", "x", "y", "width", "height"}, ...]}, ...]``,
``<root>/image_data.json`` = ``[{"image_id" (or "id"), "url": ".../VG_100K_2/1.jpg", "width", "height"}, ...]``;
the image file is the last two parts of the url under ``root`` (``VG_100K/1.jpg`` or ``VG_100K_2/1.jpg``).
Only regions with width * height < 16384 pixels are used (OFA practice, as the original).
Sample: user ``"<Img><ImageHere></Img> [refer] where is {phrase} ? "``, assistant the box text.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from tinygpt.data.bad_records import BadRecord, BadRecordPolicy
from tinygpt.data.formats.base import Record, RecordDataset, iter_json_list, require
from tinygpt.data.formats.refcoco import check_box_xywh
from tinygpt.data.text import blip_caption
from tinygpt.tasks import REFER_PROMPTS, format_box, wrap_instruction

REGIONS_FILE, IMAGES_FILE = "region_descriptions.json", "image_data.json"  # under root
MAX_REGION_AREA = 16384


def image_path_from_url(url: str) -> str:
    """``"https://cs.stanford.edu/people/rak248/VG_100K_2/1.jpg"`` -> ``"VG_100K_2/1.jpg"``."""
    parts = [p for p in url.replace("\\", "/").split("/") if p]
    if len(parts) < 2:
        raise BadRecord(f"image url {url!r} has no folder/file part")
    return "/".join(parts[-2:])


class VisualGenomeRefer(RecordDataset):
    def __init__(self, root: str, *, image_size: int, seed: int, bad_records: Optional[BadRecordPolicy] = None,
                 name: str = "refvg", max_region_area: int = MAX_REGION_AREA, process_text: bool = True) -> None:
        regions_path = Path(root) / REGIONS_FILE
        super().__init__(name=name, source=regions_path, root=root, image_size=image_size, seed=seed,
                         bad_records=bad_records)
        self.process_text = process_text
        images = {}
        for _, info in iter_json_list(Path(root) / IMAGES_FILE):
            key = info.get("image_id", info.get("id")) if isinstance(info, dict) else None
            if isinstance(key, (int, str)) and not isinstance(key, bool):  # a damaged id (a list) is no key
                images[key] = info
        for where, entry in iter_json_list(regions_path):
            try:
                image_id = require(entry, "id", int)
                regions = require(entry, "regions", list)
            except BadRecord as exc:
                self.reject(where, str(exc))
                continue
            for number, region in enumerate(regions):
                self.add(f"{where} region {number}",
                         lambda region=region: self._build(region, images.get(image_id), max_region_area))
        self.finish()

    @staticmethod
    def _build(region: dict, image: Optional[dict], max_area: int) -> Optional[Record]:
        if image is None:
            raise BadRecord("its image is not in image_data.json")
        phrase = require(region, "phrase")
        box = [require(region, key, (int, float)) for key in ("x", "y", "width", "height")]
        check_box_xywh(box, image.get("width"), image.get("height"))
        if box[2] * box[3] >= max_area:
            return None  # too large for a referring expression; dropped on purpose, not bad
        return Record([image_path_from_url(require(image, "url"))], (phrase, box))

    def make_turns(self, record, sizes, rng):
        phrase, box = record.data
        width, height = sizes[0]
        box_text = format_box(check_box_xywh(box, width, height), width, height)
        phrase = blip_caption(phrase) if self.process_text else phrase.strip()
        return [{"user": wrap_instruction(rng.choice(REFER_PROMPTS).format(phrase)), "assistant": box_text}]
