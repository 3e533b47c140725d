"""Synthetic shapes datasets written in the real file formats of all four stages, plus held-out evaluation splits.

``generate(out_dir, seed=0, scale="tiny")`` builds this tree (in a temporary directory, renamed at the end)::

    laion/, cc_sbu/           stage 1-2 webdataset shards {00000..0000N}.tar (jpg + json {"caption"} + txt)
    cc_sbu_align/             stage 3 filter_cap.json + image/{id}.jpg (detailed descriptions)
    coco/train2014/           stage-4 images COCO_train2014_{id:012d}.jpg, shared by the annotation sets below
    llava/                    detail_23k.json, complex_reasoning_77k.json, conversation_58k.json
    multitask_conversation/   multitask_conversation.json (LLaVA format, task identifiers per turn)
    refcoco/refcoco/          refs(unc).p + instances.json (refer and, inverted, identify)
    vqa/                      vqa_train.json (LAVIS)
    okvqa/, aokvqa/, gqa/     okvqa_train.json, aokvqa_v1p0_train.json, train_balanced_questions.json: more
                              questions of the same kinds in the OK-VQA, A-OKVQA and GQA layouts (images in
                              coco/train2014), so the tiny stage 4 keeps the real mix's share of VQA
    coco_caption/             coco_karpathy_train.json
    flickr/                   groundedcaption.json, captiontobbox.json, phrasetobbox.json (image_id -> coco/train2014)
    unnatural/                unnatural_instruction_200k.json (text only)
    multi_image/              train.jsonl (generic JSONL, 2 images per conversation) + images/
    eval/                     held-out scenes: images/, vqa.json, refer.json, captions.json
    eval/multi_image/         held-out questions that need two images at once: questions.json + images/
                              (tinygpt.tiny.synthetic.multi_image_eval; its own manifest, not in the top one's roots,
                              so every other file stays as it was before the split existed)

Every root has a manifest.json (generator version, seed, scale, image size, counts); the top one lists the roots.
Scenes come from per-(seed, stream, index) random streams, so the output is byte-identical for a seed, and the
evaluation scenes use their own stream and are checked to differ from every training scene.
"""

from __future__ import annotations

import glob
import json
import os
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from tinygpt.tiny.synthetic import texts
from tinygpt.tiny.synthetic.multi_image_eval import pair_count, write_multi_image_eval
from tinygpt.tiny.synthetic.scenes import Scene, sample_scene, scene_rng
from tinygpt.tiny.synthetic.writers import (
    Progress, aokvqa_record, coco_file_name, llava_record, unnatural_records, vqa_record, write_cc_sbu_align,
    write_images, write_json, write_jsonl, write_manifest, write_refcoco, write_webdataset,
)
from tinygpt.errors import UserError
from tinygpt.io_utils import atomic_dir, check_output_dir, pid_alive, remove_stale_temporaries, writing
from tinygpt.tasks import CAPTION_PROMPTS, IDENTIFY_PROMPTS, REFER_PROMPTS

GENERATOR = "tinygpt.tiny.synthetic"
GENERATOR_VERSION = 1
DETAIL_PROMPTS = ("Describe the image in detail.", "Give a detailed description of the image.",
                  "What do you see in this image? Describe it in detail.")


@dataclass(frozen=True)
class Scale:
    laion: int               # stage 1-2 caption pairs
    cc_sbu: int
    align: int               # stage 3 detailed descriptions
    instruct_images: int     # stage-4 image pool; every image gets every stage-4 annotation kind
    vqa_per_image: int
    multi_image: int         # generic JSONL conversations (2 images each)
    unnatural: int
    eval_images: int
    eval_vqa_per_image: int
    shard_size: int


SCALES = {
    "tiny": Scale(laion=3000, cc_sbu=600, align=400, instruct_images=1500, vqa_per_image=3, multi_image=400,
                  unnatural=300, eval_images=300, eval_vqa_per_image=2, shard_size=1000),
    "small": Scale(laion=16000, cc_sbu=4000, align=1500, instruct_images=6000, vqa_per_image=4, multi_image=2000,
                   unnatural=1000, eval_images=1000, eval_vqa_per_image=3, shard_size=2000),
}


def _manifest(seed: int, scale: str, split: str, image_size: int, fmt: str, counts: dict, **extra) -> dict:
    return {"generator": GENERATOR, "version": GENERATOR_VERSION, "seed": seed, "scale": scale, "split": split,
            "format": fmt, "image_size": image_size, "counts": counts, **extra}


def _scenes(seed: int, stream: str, count: int, size: int) -> list[Scene]:
    return [sample_scene(scene_rng(seed, stream, i), size) for i in range(count)]


# --- stage 1-3 ------------------------------------------------------------------------------------------------------

def _write_pretrain(tmp: Path, seed: int, scale: str, plan: Scale, size: int, show: bool) -> tuple[dict, list]:
    manifests, scenes = {}, []
    for name, count in (("laion", plan.laion), ("cc_sbu", plan.cc_sbu)):
        items = [(s, texts.caption(s)) for s in _scenes(seed, name, count, size)]
        counts = write_webdataset(tmp / name, items, plan.shard_size, Progress(name, count, show))
        manifests[name] = _manifest(seed, scale, "train", size, "webdataset", counts)
        scenes += [s for s, _ in items]
    items = [(s, texts.detailed_description(s)) for s in _scenes(seed, "cc_sbu_align", plan.align, size)]
    counts = write_cc_sbu_align(tmp / "cc_sbu_align", items, Progress("cc_sbu_align", plan.align, show))
    manifests["cc_sbu_align"] = _manifest(seed, scale, "train", size, "cc_sbu_align", counts)
    return manifests, scenes + [s for s, _ in items]


# --- stage 4: one image pool, many annotation sets -------------------------------------------------------------------

def _write_instruct(tmp: Path, seed: int, scale: str, plan: Scale, size: int, show: bool) -> tuple[dict, list[Scene]]:
    scenes = _scenes(seed, "instruct", plan.instruct_images, size)
    ids = list(range(1, len(scenes) + 1))
    write_images(tmp / "coco" / "train2014", [(coco_file_name(i), s) for i, s in zip(ids, scenes)],
                 Progress("coco", len(scenes), show))
    detail, reason, conversation, multitask, vqa, captions = [], [], [], [], [], []
    okvqa, aokvqa, gqa = [], [], []
    grounded, caption_boxes, phrase_boxes = [], [], []
    for image_id, scene in zip(ids, scenes):
        rng = scene_rng(seed, "text:instruct", image_id)
        coco_image = f"train2014/{coco_file_name(image_id)}"
        flickr_id = coco_file_name(image_id)[:-len(".jpg")]
        detail.append(llava_record(image_id, [(rng.choice(DETAIL_PROMPTS), texts.detailed_description(scene))]))
        reason.append(llava_record(image_id, [texts.reasoning(scene, rng)]))
        conversation.append(llava_record(image_id, [(qa.question.capitalize(), qa.sentence)
                                                    for qa in texts.questions(scene, rng, 3)]))
        obj = rng.choice(scene.objects)
        box = texts.box_text(scene, obj)
        qa = texts.question(scene, rng.choice(texts.VQA_KINDS), rng)
        multitask.append(llava_record(image_id, [
            (f"[vqa] {qa.question}", qa.answer),
            (rng.choice(REFER_PROMPTS).format(texts.phrase(obj)), box),
            (rng.choice(IDENTIFY_PROMPTS).format(box), texts.phrase(obj)),
            (rng.choice(CAPTION_PROMPTS), texts.caption(scene)),
        ]))
        for qa in texts.questions(scene, rng, plan.vqa_per_image):
            vqa.append(vqa_record(len(vqa) + 1, qa.question, qa.answer, coco_image))
        qa = texts.question(scene, rng.choice(texts.VQA_KINDS), rng)
        okvqa.append(vqa_record(len(okvqa) + 1, qa.question, qa.answer, coco_image, dataset="okvqa"))
        qa = texts.question(scene, rng.choice(texts.VQA_KINDS), rng)
        aokvqa.append(aokvqa_record(f"aok{image_id}", qa.question, qa.answer, coco_image))
        qa = texts.question(scene, rng.choice(texts.VQA_KINDS), rng)
        gqa.append({"image": coco_file_name(image_id), "question": qa.question, "answer": qa.answer})
        captions.append({"caption": texts.caption(scene), "image": coco_image, "image_id": f"coco_{image_id}"})
        grounded.append({"image_id": flickr_id, "grounded_caption": texts.grounded_caption(scene)})
        caption_boxes.append({"image_id": flickr_id, "caption": texts.object_list(scene),
                              "output": texts.detection_answer(scene)})
        phrase_boxes.extend({"image_id": flickr_id, "phrase": texts.phrase(o), "bbox": texts.box_text(scene, o)}
                            for o in scene.objects)

    unnatural = unnatural_records(scene_rng(seed, "text:unnatural", 0), plan.unnatural)
    files = {
        "llava": {"detail_23k.json": detail, "complex_reasoning_77k.json": reason,
                  "conversation_58k.json": conversation},
        "multitask_conversation": {"multitask_conversation.json": multitask},
        "vqa": {"vqa_train.json": vqa},
        "okvqa": {"okvqa_train.json": okvqa},
        "aokvqa": {"aokvqa_v1p0_train.json": aokvqa},
        "gqa": {"train_balanced_questions.json": gqa},
        "coco_caption": {"coco_karpathy_train.json": captions},
        "flickr": {"groundedcaption.json": grounded, "captiontobbox.json": caption_boxes,
                   "phrasetobbox.json": phrase_boxes},
        "unnatural": {"unnatural_instruction_200k.json": unnatural},
    }
    formats = {"llava": "llava", "multitask_conversation": "llava", "vqa": "lavis_vqa", "okvqa": "lavis_vqa",
               "aokvqa": "aok_vqa", "gqa": "gqa", "coco_caption": "coco_caption",
               "flickr": "flickr", "unnatural": "unnatural_instruction"}
    manifests = {"coco": _manifest(seed, scale, "train", size, "coco_images", {"images": len(scenes)})}
    for root, named in files.items():
        for file_name, records in named.items():
            write_json(tmp / root / file_name, records)
        images = None if root == "unnatural" else "../coco/train2014"
        manifests[root] = _manifest(seed, scale, "train", size, formats[root],
                                    {name: len(records) for name, records in named.items()}, images=images)
    counts = write_refcoco(tmp / "refcoco", list(zip(ids, scenes)))
    manifests["refcoco"] = _manifest(seed, scale, "train", size, "refcoco", counts, images="../coco/train2014")
    return manifests, scenes


# --- generic JSONL with two images per conversation ----------------------------------------------------------------

def _image_pair(seed: int, index: int, size: int) -> list[Scene]:
    """Two scenes with different object counts (so "which has more shapes?" has one answer)."""
    first = sample_scene(scene_rng(seed, "multi_image", f"{index}a"), size)
    attempt = 0
    while True:
        second = sample_scene(scene_rng(seed, "multi_image", f"{index}b{attempt}"), size)
        if len(second.objects) != len(first.objects):
            return [first, second]
        attempt += 1


def _multi_image_turns(pair: list[Scene], rng: random.Random) -> list[dict]:
    compare = texts.compare_counts(pair)
    owner = texts.which_image_has(pair, rng)   # never None: the larger scene has a colour+shape the other lacks
    if rng.random() < 0.5:
        turns = [(f"Image 1: <image> Image 2: <image> {compare[0]}", compare[1]), owner,
                 texts.count_in_image(pair, rng.randrange(2))]
    else:
        first, second = (texts.question(s, rng.choice(texts.VQA_KINDS), rng) for s in pair)
        turns = [(f"<image> [vqa] {first.question}", first.answer),
                 (f"Here is a second image: <image> {compare[0]}", compare[1]),
                 (f"[vqa] in the second image, {second.question}", second.answer)]
    return [{"user": user, "assistant": assistant} for user, assistant in turns]


def _write_multi_image(tmp: Path, seed: int, scale: str, plan: Scale, size: int, show: bool) -> tuple[dict, list]:
    root = tmp / "multi_image"
    pairs = [_image_pair(seed, i, size) for i in range(plan.multi_image)]
    named = [(f"{i:06d}_{k}.jpg", scene) for i, pair in enumerate(pairs) for k, scene in enumerate(pair)]
    write_images(root / "images", named, Progress("multi_image", len(named), show))
    records = [{"images": [f"images/{i:06d}_{k}.jpg" for k in range(len(pair))],
                "conversations": _multi_image_turns(pair, scene_rng(seed, "text:multi_image", i))}
               for i, pair in enumerate(pairs)]
    write_jsonl(root / "train.jsonl", records)
    counts = {"conversations": len(records), "images": len(named)}
    return _manifest(seed, scale, "train", size, "generic_jsonl", counts), [s for pair in pairs for s in pair]


# --- held-out evaluation --------------------------------------------------------------------------------------------

def _write_eval(tmp: Path, seed: int, scale: str, plan: Scale, size: int, seen: set, show: bool) -> dict:
    scenes, index = [], 0
    while len(scenes) < plan.eval_images:
        scene = sample_scene(scene_rng(seed, "eval", index), size)
        index += 1
        if scene.signature() not in seen:
            scenes.append(scene)
    root = tmp / "eval"
    names = [f"shapes_eval_{i + 1:06d}" for i in range(len(scenes))]
    write_images(root / "images", [(f"{n}.jpg", s) for n, s in zip(names, scenes)], Progress("eval", len(scenes), show))
    vqa, refer, captions = [], [], []
    for i, (name, scene) in enumerate(zip(names, scenes)):
        rng = scene_rng(seed, "text:eval", i)
        image = f"images/{name}.jpg"
        for j in range(plan.eval_vqa_per_image):   # kinds cycle over the whole split: balanced per-kind counts
            kind = texts.VQA_KINDS[(i * plan.eval_vqa_per_image + j) % len(texts.VQA_KINDS)]
            qa = texts.question(scene, kind, rng)
            vqa.append(vqa_record(len(vqa) + 1, qa.question, qa.answer, image, kind=kind))
        for obj in scene.objects:
            x1, y1, x2, y2 = obj.box
            refer.append({"ref_id": len(refer) + 1, "img_id": name, "image": image, "sents": texts.phrase(obj),
                          "bbox": [x1, y1, x2 - x1, y2 - y1], "box_text": texts.box_text(scene, obj),
                          "width": scene.width, "height": scene.height})
        captions.append({"image_id": name, "image": image, "caption": [texts.caption(scene)],
                         "detailed": texts.detailed_description(scene),
                         "grounded": texts.grounded_caption(scene)})
    write_json(root / "vqa.json", vqa)
    write_json(root / "refer.json", refer)
    write_json(root / "captions.json", captions)
    counts = {"images": len(scenes), "vqa.json": len(vqa), "refer.json": len(refer), "captions.json": len(captions)}
    return _manifest(seed, scale, "eval", size, "shapes_eval", counts)


# --- the whole tree -------------------------------------------------------------------------------------------------

def _is_replaceable(out: Path) -> bool:
    if not out.exists():
        return True
    if not out.is_dir():
        return False
    if not any(out.iterdir()):
        return True
    manifest = out / "manifest.json"
    try:
        return json.loads(manifest.read_text(encoding="utf-8")).get("generator") == GENERATOR
    except (OSError, ValueError, AttributeError):
        return False


def generate(out_dir: str | os.PathLike, seed: int = 0, scale: str | Scale = "tiny", pretrain_size: int = 112,
             instruct_size: int = 224, progress: bool = True) -> dict:
    """Write every synthetic dataset root under ``out_dir``; returns the top-level manifest.

    ``scale`` is a name in SCALES or a Scale (custom sizes). ``out_dir`` may be missing, empty or an earlier
    output of this generator (then it is replaced); anything else is refused. Nothing is visible under
    ``out_dir`` until the whole tree is written.
    """
    if isinstance(scale, Scale):
        plan, scale = scale, "custom"
    elif scale in SCALES:
        plan = SCALES[scale]
    else:
        raise UserError(f"--scale: unknown scale {scale!r}; expected one of {', '.join(SCALES)}")
    for flag, size in (("--pretrain-size", pretrain_size), ("--instruct-size", instruct_size)):
        if not 32 <= size <= 1024:
            raise UserError(f"{flag}: image size must be between 32 and 1024, got {size}")
    out = check_output_dir(out_dir, "--out", "synthetic datasets")
    if not _is_replaceable(out):
        raise UserError(f"--out: {out} exists and is not a synthetic dataset written by {GENERATOR}; "
                        "refusing to overwrite it")
    with writing(out, "the synthetic datasets"):
        return _generate_into(out, seed, scale, plan, pretrain_size, instruct_size, progress)


def _generate_into(out: Path, seed: int, scale: str, plan, pretrain_size: int, instruct_size: int,
                   progress: bool) -> dict:
    _sweep_killed_writers(out)
    with atomic_dir(out) as tmp:  # a killed run's temporaries: removed by the next run's sweep
        roots, pretrain_scenes = _write_pretrain(tmp, seed, scale, plan, pretrain_size, progress)
        instruct, instruct_scenes = _write_instruct(tmp, seed, scale, plan, instruct_size, progress)
        roots.update(instruct)
        roots["multi_image"], pair_scenes = _write_multi_image(tmp, seed, scale, plan, instruct_size, progress)
        seen = {s.signature() for s in pretrain_scenes + instruct_scenes + pair_scenes}   # held out from all
        roots["eval"] = _write_eval(tmp, seed, scale, plan, instruct_size, seen, progress)
        pairs = write_multi_image_eval(tmp / "eval", seed, pair_count(plan.eval_images), instruct_size, seen, progress)
        write_manifest(tmp / "eval" / "multi_image",
                       _manifest(seed, scale, "eval", instruct_size, "multi_image_eval", pairs))
        for name, manifest in roots.items():
            write_manifest(tmp / name, manifest)
        top = {"generator": GENERATOR, "version": GENERATOR_VERSION, "seed": seed, "scale": scale,
               "pretrain_size": pretrain_size, "instruct_size": instruct_size, "plan": asdict(plan),
               "roots": {name: m["counts"] for name, m in roots.items()}}
        write_manifest(tmp, top)
    return top


def _sweep_killed_writers(out: Path) -> None:
    """Remove what a killed earlier run left next to ``out``: atomic_dir's temporaries (an aside folder goes back
    to ``out`` when ``out`` is missing) and the ``.NAME.tmp-PID`` folders of older versions whose process is gone."""
    remove_stale_temporaries(out.parent, [glob.escape(out.name)])
    for leftover in out.parent.glob(f"{glob.escape(f'.{out.name}.tmp-')}*"):
        pid = leftover.name.rpartition("-")[2]
        if pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(leftover, ignore_errors=True)
