"""Writers of the real dataset file layouts (docs/data-formats.md, "The original datasets' file layouts"), fed with
synthetic scenes.

Each function writes one format under a dataset root and returns the counts it wrote. The layouts are the ones the
original data has, so the same loaders read synthetic and real data:

* webdataset shards ``{00000..0000N}.tar`` with ``KEY.jpg``, ``KEY.json`` {"caption", ...}, ``KEY.txt`` (img2dataset)
* cc_sbu_align ``filter_cap.json`` {"annotations": [{"image_id", "caption"}]} + ``image/{image_id}.jpg``
* COCO-style images ``COCO_train2014_{id:012d}.jpg`` shared by the stage-4 sets
* LLaVA JSON ``[{"id", "image", "conversations": [{"from": "human"|"gpt", "value"}]}]``
* RefCOCO ``refs(unc).p`` (pickle of plain dicts and lists) + ``instances.json`` (COCO boxes [x, y, w, h])
* LAVIS VQA JSON ``[{"question_id", "question", "answer": [...], "image"}]``, COCO caption JSON,
  Flickr30k grounding JSONs, unnatural instructions JSON, and the generic JSONL of tinygpt.

Files are written plainly: the caller builds the whole tree in a temporary directory and renames it at the end.
"""

from __future__ import annotations

import io
import json
import pickle
import random
import sys
import tarfile
import time
from pathlib import Path
from typing import Iterable, Sequence

from tinygpt.tiny.synthetic.scenes import SHAPES, Scene, render_jpeg
from tinygpt.tiny.synthetic.texts import phrase

COCO_PREFIX = "COCO_train2014_"
VQA_ANSWERS_PER_QUESTION = 10   # VQAv2 has ten human answers per question; ours all agree


class Progress:
    """A one-line progress print on stderr ("name 1200/3000 images, 2.1 s"), refreshed at most 5 times a second."""

    def __init__(self, name: str, total: int, enabled: bool = True):
        self.name, self.total, self.enabled = name, total, enabled
        self.done, self.start, self.last = 0, time.monotonic(), 0.0

    def step(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if self.enabled and (now - self.last > 0.2 or self.done == self.total):
            self.last = now
            end = "\n" if self.done == self.total else ""
            print(f"\r  {self.name}: {self.done}/{self.total} images, {now - self.start:.1f} s",
                  end=end, file=sys.stderr, flush=True)


def coco_file_name(image_id: int) -> str:
    return f"{COCO_PREFIX}{image_id:012d}.jpg"


def write_json(path: Path, data: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=None, ensure_ascii=False) + "\n", encoding="utf-8")


def write_jsonl(path: Path, records: Iterable[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def write_images(directory: Path, named_scenes: Sequence[tuple[str, Scene]], progress: Progress) -> None:
    """Render each scene to ``directory/<name>`` as JPEG (quality 95)."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, scene in named_scenes:
        (directory / name).write_bytes(render_jpeg(scene))
        progress.step()


# --- stage 1-2: webdataset shards -----------------------------------------------------------------------------------

def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644   # fixed metadata: same seed -> same bytes
    tar.addfile(info, io.BytesIO(data))


def write_webdataset(root: Path, items: Sequence[tuple[Scene, str]], shard_size: int, progress: Progress) -> dict:
    """img2dataset-style shards: key = 5-digit shard id + 4-digit index; .jpg, .json {"caption", ...}, .txt."""
    root.mkdir(parents=True, exist_ok=True)
    shards = max(1, -(-len(items) // shard_size))
    for shard in range(shards):
        with tarfile.open(root / f"{shard:05d}.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
            for index, (scene, text) in enumerate(items[shard * shard_size:(shard + 1) * shard_size]):
                key = f"{shard:05d}{index:04d}"
                meta = {"url": f"synthetic://shapes/{key}", "caption": text, "key": key, "status": "success",
                        "error_message": None, "width": scene.width, "height": scene.height,
                        "original_width": scene.width, "original_height": scene.height}
                _add_member(tar, f"{key}.jpg", render_jpeg(scene))
                _add_member(tar, f"{key}.json", json.dumps(meta).encode("utf-8"))
                _add_member(tar, f"{key}.txt", text.encode("utf-8"))
                progress.step()
    pattern = f"{{00000..{shards - 1:05d}}}.tar" if shards > 1 else "00000.tar"
    return {"samples": len(items), "shards": shards, "shard_pattern": pattern}


# --- stage 3: cc_sbu_align ------------------------------------------------------------------------------------------

def write_cc_sbu_align(root: Path, items: Sequence[tuple[Scene, str]], progress: Progress) -> dict:
    """``filter_cap.json`` + ``image/{image_id}.jpg``; image ids are the strings "1", "2", ..."""
    annotations = [{"image_id": str(i + 1), "caption": text} for i, (_, text) in enumerate(items)]
    write_images(root / "image", [(f"{i + 1}.jpg", scene) for i, (scene, _) in enumerate(items)], progress)
    write_json(root / "filter_cap.json", {"annotations": annotations})
    return {"samples": len(items)}


# --- stage 4 --------------------------------------------------------------------------------------------------------

def llava_record(image_id: int, turns: Sequence[tuple[str, str]]) -> dict:
    """One LLaVA record; the first human turn carries ``<image>`` on its own line, as LLaVA's files do."""
    conversations = []
    for i, (user, assistant) in enumerate(turns):
        value = f"<image>\n{user}" if i == 0 else user
        conversations.append({"from": "human", "value": value})
        conversations.append({"from": "gpt", "value": assistant})
    return {"id": f"{image_id:012d}", "image": f"{image_id:012d}.jpg", "conversations": conversations}


def write_refcoco(root: Path, entries: Sequence[tuple[int, Scene]], dataset: str = "refcoco",
                  split_by: str = "unc", split: str = "train") -> dict:
    """``{root}/{dataset}/refs({split_by}).p`` + ``instances.json``: one ref (one sentence) per object.

    The sentence is the canonical phrase ("large red circle"), so the inverse (identify) task has one right answer.
    """
    images, annotations, refs = [], [], []
    for image_id, scene in entries:
        images.append({"id": image_id, "file_name": coco_file_name(image_id),
                       "width": scene.width, "height": scene.height})
        for obj in scene.objects:
            ann_id = len(annotations) + 1
            x1, y1, x2, y2 = obj.box
            category = SHAPES.index(obj.shape) + 1
            annotations.append({"id": ann_id, "image_id": image_id, "bbox": [x1, y1, x2 - x1, y2 - y1],
                                "area": (x2 - x1) * (y2 - y1), "category_id": category, "iscrowd": 0,
                                "segmentation": []})
            text = phrase(obj)
            refs.append({"ref_id": len(refs), "ann_id": ann_id, "image_id": image_id, "split": split,
                         "category_id": category, "file_name": f"{COCO_PREFIX}{image_id:012d}_{ann_id}.jpg",
                         "sent_ids": [len(refs)],
                         "sentences": [{"sent_id": len(refs), "raw": text, "sent": text, "tokens": text.split()}]})
    folder = root / dataset
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"refs({split_by}).p").write_bytes(pickle.dumps(refs, protocol=2))
    categories = [{"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(SHAPES)]
    write_json(folder / "instances.json", {"info": {"description": "tinygpt synthetic shapes"}, "images": images,
                                           "annotations": annotations, "categories": categories})
    return {"images": len(images), "refs": len(refs)}


def vqa_record(question_id: int, question: str, answer: str, image: str, **extra: str) -> dict:
    return {"question_id": question_id, "question": question, "answer": [answer] * VQA_ANSWERS_PER_QUESTION,
            "image": image, "dataset": "vqa", **extra}


def aokvqa_record(question_id: str, question: str, answer: str, image: str) -> dict:
    """A-OKVQA layout: ``direct_answers`` (ten, all agreeing here) and four ``choices`` holding the answer."""
    return {"question_id": question_id, "question": question, "direct_answers": [answer] * VQA_ANSWERS_PER_QUESTION,
            "choices": [answer, "none", "other", "unknown"], "correct_choice_idx": 0, "image": image}


def unnatural_records(rng: random.Random, count: int) -> list[dict]:
    """Text-only instructions with one right answer (counting, sides of shapes, small sums)."""
    sides = {"triangle": "3", "square": "4"}
    records = []
    for _ in range(count):
        pick = rng.randrange(3)
        if pick == 0:
            shape = rng.choice(sorted(sides))
            instruction, output = f"How many sides does a {shape} have?", sides[shape]
        elif pick == 1:
            a, b = rng.randint(0, 5), rng.randint(0, 4)
            instruction, output = f"What is {a} plus {b}?", str(a + b)
        else:
            words = rng.sample(["red", "blue", "green", "circle", "square", "cross"], rng.randint(2, 4))
            instruction, output = f"Count the words in the list: {', '.join(words)}.", str(len(words))
        records.append({"instances": [{"instruction_with_input": instruction, "input": "",
                                       "constraints": "Answer with a number.", "output": output}]})
    return records


def write_manifest(root: Path, manifest: dict) -> None:
    write_json(root / "manifest.json", manifest)
