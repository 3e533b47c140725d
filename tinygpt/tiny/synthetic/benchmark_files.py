"""Held-out synthetic scenes written in each evaluation benchmark's own file layout, for the tiny model.

``write_benchmark_files(out_dir, seed=0, per_benchmark=60)`` writes ``out_dir/<benchmark>/`` for every benchmark of
`tinygpt.evaluation` but the shapes suite (that one reads ``eval/``, written by ``python -m tinygpt.tiny.synthetic``),
each in the layout its loader documents (tinygpt/evaluation/benchmarks/<name>.py), with the questions the tiny model
is trained on (colours, shapes, counts, sizes, positions, "is there a ...", referring phrases):

==============  ====================================================================================================
gqa             testdev_balanced_questions.json (VQA questions of every kind) + images/s0000001.jpg
vsr             test.jsonl: "The red circle is left of the blue square." with label 1 / 0 (half true) + images/
iconqa          problems.json, pid_splits.json (choose_txt_val) + iconqa/val/choose_txt/<pid>/{image.png,data.json}:
                "what shape is the red object?" with 2-4 shape names as choices
vizwiz          Annotations/val.json + val/: ten answers per question; a quarter ask about an empty region ("what
                color is the shape at the top?") and are answered "unanswerable" by 8 of 10 (the other 2 guess)
hateful_memes   dev.jsonl + img/<id>.png: the text is a yes/no question about the scene ("is there a red
                circle?"); label 1 ("hateful") when its answer is yes, 0 when no (half and half)
okvqa, vqav2    the questions + annotations JSON of each (ten equal answers) + val2014/COCO_val2014_<id>.jpg
refcoco(+)(g)   refs(unc).p / refs(umd).p + instances.json + train2014/: one ref per object, per_benchmark images
                per split (val/testA/testB; RefCOCOg val/test); RefCOCOg's sentences add the object's region
pope            coco_pope_{random,popular,adversarial}.json + val2014/: per image "Is there a red circle in the
                image?" for each object (yes) and as many absent colour+shape pairs (no): drawn at random, the most
                frequent pairs of the benchmark's scenes (popular), or pairs sharing a colour or shape with an
                object of the image (adversarial)
==============  ====================================================================================================

Held out: every benchmark draws its scenes from its own random stream (``benchmark:<name>``), which no training set
uses, and leaves out any scene equal to one of the stage-4 image pool (stream ``instruct``, as many as the largest
scale makes) or of the shapes held-out split, rendered at the same size. The tree is written in a temporary
directory and renamed into place at the end; ``out_dir`` may be missing, empty or an earlier output of this module.

    python -m tinygpt.tiny.synthetic.benchmark_files --out data/synthetic/benchmarks [--per-benchmark 60] [--seed 0]
"""

from __future__ import annotations

import argparse
import glob
import json
import pickle
import random
import sys
from collections import Counter
from functools import lru_cache
from pathlib import Path
from typing import Callable, NamedTuple

from tinygpt.errors import UserError, report_errors
from tinygpt.io_utils import atomic_dir, check_output_dir, remove_stale_temporaries, writing
from tinygpt.tiny.synthetic import SCALES
from tinygpt.tiny.synthetic import texts
from tinygpt.tiny.synthetic.scenes import (COLOURS, MAX_OBJECTS, REGIONS, SHAPES, Scene, render_scene, sample_scene,
                                           scene_rng)
from tinygpt.tiny.synthetic.writers import Progress, write_images, write_json, write_jsonl

GENERATOR = "tinygpt.tiny.synthetic.benchmark_files"
VERSION = 1
NAMES = ("gqa", "vsr", "iconqa", "vizwiz", "hateful_memes", "okvqa", "vqav2", "refcoco", "refcoco+", "refcocog", "pope")
DEFAULT_PER_BENCHMARK = 60
IMAGE_SIZE = 224
ANSWERS = 10
KINDS = texts.VQA_KINDS
ANSWER_TYPES = {"exists": "yes/no", "count": "number", "count_shape": "number"}   # else "other" (VQA, VizWiz)
GQA_TYPES = {"color": ("query", "attr"), "shape": ("query", "cat"), "count": ("query", "obj"),
             "count_shape": ("query", "obj"), "exists": ("verify", "obj"), "position": ("query", "rel"),
             "size": ("choose", "attr")}


class Plan(NamedTuple):
    seed: int
    name: str
    images: int
    size: int
    seen: frozenset
    progress: bool

    def scenes(self, count: int | None = None, min_objects: int = 1, stream: str = "") -> list[Scene]:
        """`count` held-out scenes (default: per_benchmark) with at least `min_objects` objects."""
        chosen, index = [], 0
        while len(chosen) < (count or self.images):
            rng = scene_rng(self.seed, f"benchmark:{self.name}{stream}", index)
            index += 1
            scene = sample_scene(rng, self.size, rng.randint(min_objects, MAX_OBJECTS) if min_objects > 1 else None)
            if scene.signature() not in self.seen:
                chosen.append(scene)
        return chosen

    def rng(self, index: int) -> random.Random:
        return scene_rng(self.seed, f"benchmark-text:{self.name}", index)

    def jpegs(self, directory: Path, named: list[tuple[str, Scene]]) -> None:
        write_images(directory, named, Progress(self.name, len(named), self.progress))


@lru_cache(maxsize=4)
def training_signatures(seed: int, size: int) -> frozenset:
    """Signatures of the stage-4 image pool and the shapes held-out split (the largest scale's counts) at `size`."""
    streams = (("instruct", max(p.instruct_images for p in SCALES.values())),
               ("eval", 2 * max(p.eval_images for p in SCALES.values())))
    return frozenset(sample_scene(scene_rng(seed, stream, i), size).signature()
                     for stream, count in streams for i in range(count))


def _png(path: Path, scene: Scene) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    render_scene(scene).save(path, format="PNG")


def _a(word: str) -> str:
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


def _vqa_pairs(plan: Plan) -> list[tuple[Scene, texts.QA]]:
    """One question per scene, the kinds in turn (balanced counts per kind)."""
    return [(scene, texts.question(scene, KINDS[i % len(KINDS)], plan.rng(i))) for i, scene in enumerate(plan.scenes())]


# --- short-answer VQA layouts -------------------------------------------------------------------------------------

def _gqa(root: Path, plan: Plan) -> int:
    questions, named = {}, []
    for i, (scene, qa) in enumerate(_vqa_pairs(plan)):
        image_id = f"s{i + 1:07d}"
        structural, semantic = GQA_TYPES[qa.kind]
        questions[str(20000001 + i)] = {
            "imageId": image_id, "question": qa.question, "answer": qa.answer, "fullAnswer": qa.sentence,
            "isBalanced": True, "types": {"structural": structural, "semantic": semantic, "detailed": qa.kind}}
        named.append((f"{image_id}.jpg", scene))
    write_json(root / "testdev_balanced_questions.json", questions)
    plan.jpegs(root / "images", named)
    return len(questions)


def _coco_vqa(root: Path, plan: Plan, questions_file: str, annotations_file: str, okvqa: bool) -> int:
    questions, annotations, named = [], [], []
    for i, (scene, qa) in enumerate(_vqa_pairs(plan)):
        image_id = 500001 + i
        qid = image_id * 10
        questions.append({"image_id": image_id, "question": qa.question, "question_id": qid})
        answers = [{"answer": qa.answer, "answer_confidence": "yes", "answer_id": k + 1} for k in range(ANSWERS)]
        if okvqa:
            answers = [{**a, "raw_answer": qa.answer} for a in answers]
        annotations.append({"question_id": qid, "image_id": image_id,
                            "question_type": " ".join(qa.question.split()[:2]),
                            "answer_type": ANSWER_TYPES.get(qa.kind, "other"), "answers": answers,
                            "multiple_choice_answer": qa.answer, "confidence": 3})
        named.append((f"COCO_val2014_{image_id:012d}.jpg", scene))
    head = {"info": {"description": "tinygpt synthetic shapes"}, "license": {}, "data_type": "mscoco",
            "data_subtype": "val2014"}
    write_json(root / questions_file, {**head, "task_type": "Open-Ended", "questions": questions})
    write_json(root / annotations_file, {**head, "annotations": annotations})
    plan.jpegs(root / "val2014", named)
    return len(questions)


def _okvqa(root: Path, plan: Plan) -> int:
    return _coco_vqa(root, plan, "OpenEnded_mscoco_val2014_questions.json", "mscoco_val2014_annotations.json", True)


def _vqav2(root: Path, plan: Plan) -> int:
    return _coco_vqa(root, plan, "v2_OpenEnded_mscoco_val2014_questions.json", "v2_mscoco_val2014_annotations.json",
                     False)


def _vizwiz(root: Path, plan: Plan) -> int:
    records, named = [], []
    for i, scene in enumerate(plan.scenes()):
        rng, name = plan.rng(i), f"VizWiz_val_{i:08d}.jpg"
        if i % 4 == 3:   # about a region no object is in
            empty = rng.choice([r for r in REGIONS if r not in {o.region for o in scene.objects}])
            question = f"what color is the shape {texts.REGION_PHRASES[empty]}?"
            guesses = [rng.choice(scene.objects).colour for _ in range(ANSWERS - 8)]
            answers, answer_type, answerable = ["unanswerable"] * 8 + guesses, "unanswerable", 0
        else:
            qa = texts.question(scene, KINDS[i % len(KINDS)], rng)
            question, answers = qa.question, [qa.answer] * ANSWERS
            answer_type, answerable = ANSWER_TYPES.get(qa.kind, "other"), 1
        records.append({"image": name, "question": question, "answerable": answerable, "answer_type": answer_type,
                        "answers": [{"answer": a, "answer_confidence": "yes"} for a in answers]})
        named.append((name, scene))
    write_json(root / "Annotations" / "val.json", records)
    plan.jpegs(root / "val", named)
    return len(records)


# --- yes / no and multiple-choice layouts ---------------------------------------------------------------------------

def _present(scene: Scene) -> list[tuple[str, str]]:
    return [(o.colour, o.shape) for o in scene.objects]


def _absent(scene: Scene) -> list[tuple[str, str]]:
    present = set(_present(scene))
    return [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present]


def _vsr_statement(scene: Scene, true: bool, rng: random.Random) -> dict:
    """A spatial statement about two objects along an axis where their regions differ, true or false."""
    a, b = rng.sample(scene.objects, 2)
    (ax, ay), (bx, by) = REGIONS[a.region], REGIONS[b.region]
    axes = []
    if ax != bx:
        axes.append(("left of", "right of") if ax < bx else ("right of", "left of"))
    if ay != by:
        axes.append(("above", "below") if ay < by else ("below", "above"))
    holds, fails = rng.choice(axes)
    relation = holds if true else fails
    return {"caption": f"The {a.colour} {a.shape} is {relation} the {b.colour} {b.shape}.", "label": int(true),
            "relation": relation, "subj": f"{a.colour} {a.shape}", "obj": f"{b.colour} {b.shape}"}


def _vsr(root: Path, plan: Plan) -> int:
    records, named = [], []
    for i, scene in enumerate(plan.scenes(min_objects=2)):
        name = f"{700001 + i:012d}.jpg"
        records.append({"image": name, "image_link": f"synthetic://shapes/{name}",
                        **_vsr_statement(scene, i % 2 == 0, plan.rng(i)), "annotator_id": 0,
                        "vote_true_validator_id": [], "vote_false_validator_id": []})
        named.append((name, scene))
    write_jsonl(root / "test.jsonl", records)
    plan.jpegs(root / "images", named)
    return len(records)


def _iconqa(root: Path, plan: Plan) -> int:
    problems = {}
    for i, scene in enumerate(plan.scenes()):
        rng, pid = plan.rng(i), str(i + 1)
        obj = rng.choice(scene.objects)
        choices = [obj.shape] + rng.sample([s for s in SHAPES if s != obj.shape], rng.randint(1, len(SHAPES) - 1))
        rng.shuffle(choices)
        problem = {"question": f"what shape is the {obj.colour} object?", "choices": choices,
                   "answer": choices.index(obj.shape), "ques_type": "choose_txt", "grade": "prek", "label": "shape",
                   "split": "val"}
        problems[pid] = problem
        folder = root / "iconqa" / "val" / "choose_txt" / pid
        _png(folder / "image.png", scene)
        write_json(folder / "data.json", problem)
    write_json(root / "problems.json", problems)
    write_json(root / "pid_splits.json", {"choose_txt_train": [], "choose_txt_val": list(problems),
                                          "choose_txt_test": []})
    return len(problems)


def _hateful_memes(root: Path, plan: Plan) -> int:
    records = []
    for i, scene in enumerate(plan.scenes()):
        rng, meme = plan.rng(i), 10001 + i
        yes = i % 2 == 0
        colour, shape = rng.choice(_present(scene) if yes else _absent(scene))
        records.append({"id": meme, "img": f"img/{meme:05d}.png", "label": int(yes),
                        "text": f"is there {_a(colour)} {shape}?"})
        _png(root / "img" / f"{meme:05d}.png", scene)
    write_jsonl(root / "dev.jsonl", records)
    return len(records)


def _pope(root: Path, plan: Plan) -> int:
    scenes = plan.scenes()
    popularity = Counter(pair for scene in scenes for pair in _present(scene))
    files: dict[str, list[dict]] = {"random": [], "popular": [], "adversarial": []}
    for i, scene in enumerate(scenes):
        image_id, present, absent = 900001 + i, _present(scene), _absent(scene)
        rng = plan.rng(i)
        shared = [p for p in absent if any(p[0] == c or p[1] == s for c, s in present)]
        negatives = {
            "random": rng.sample(absent, len(present)),
            "popular": sorted(absent, key=lambda p: (-popularity[p], p))[:len(present)],
            "adversarial": (rng.sample(shared, min(len(shared), len(present)))
                            + rng.sample([p for p in absent if p not in shared], max(0, len(present) - len(shared)))),
        }
        for category, records in files.items():
            for (colour, shape), label in [(p, "yes") for p in present] + [(p, "no") for p in negatives[category]]:
                records.append({"question_id": len(records), "image": f"COCO_val2014_{image_id:012d}.jpg",
                                "image_id": image_id, "text": f"Is there {_a(colour)} {shape} in the image?",
                                "label": label})
    for category, records in files.items():
        write_jsonl(root / f"coco_pope_{category}.json", records)
    plan.jpegs(root / "val2014", [(f"COCO_val2014_{900001 + i:012d}.jpg", s) for i, s in enumerate(scenes)])
    return sum(len(records) for records in files.values())


# --- referring expressions ------------------------------------------------------------------------------------------

def _refcoco(root: Path, plan: Plan, splits: tuple[str, ...], split_by: str, long_sentences: bool) -> int:
    images, annotations, refs, named = [], [], [], []
    for split in splits:
        for scene in plan.scenes(stream=f":{split}"):
            image_id = 300001 + len(images)
            name = f"COCO_train2014_{image_id:012d}.jpg"
            images.append({"id": image_id, "file_name": name, "width": scene.width, "height": scene.height})
            named.append((name, scene))
            for obj in scene.objects:
                x1, y1, x2, y2 = obj.box
                ann_id = 1 + len(annotations)
                category = SHAPES.index(obj.shape) + 1
                annotations.append({"id": ann_id, "image_id": image_id, "bbox": [x1, y1, x2 - x1, y2 - y1],
                                    "area": (x2 - x1) * (y2 - y1), "category_id": category, "iscrowd": 0,
                                    "segmentation": []})
                text = texts.phrase(obj)
                if long_sentences:
                    text = f"the {text} {texts.REGION_PHRASES[obj.region]}"
                sentence = {"sent_id": len(refs), "raw": text, "sent": text, "tokens": text.split()}
                refs.append({"ref_id": len(refs), "ann_id": ann_id, "image_id": image_id, "split": split,
                             "category_id": category, "file_name": name, "sent_ids": [len(refs)],
                             "sentences": [sentence]})
    root.mkdir(parents=True, exist_ok=True)
    (root / f"refs({split_by}).p").write_bytes(pickle.dumps(refs, protocol=2))
    write_json(root / "instances.json", {
        "info": {"description": "tinygpt synthetic shapes"}, "images": images, "annotations": annotations,
        "categories": [{"id": i + 1, "name": s, "supercategory": "shape"} for i, s in enumerate(SHAPES)]})
    plan.jpegs(root / "train2014", named)
    return len(refs)


WRITERS: dict[str, Callable[[Path, Plan], int]] = {
    "gqa": _gqa, "vsr": _vsr, "iconqa": _iconqa, "vizwiz": _vizwiz, "hateful_memes": _hateful_memes,
    "okvqa": _okvqa, "vqav2": _vqav2, "pope": _pope,
    "refcoco": lambda root, plan: _refcoco(root, plan, ("val", "testA", "testB"), "unc", False),
    "refcoco+": lambda root, plan: _refcoco(root, plan, ("val", "testA", "testB"), "unc", False),
    "refcocog": lambda root, plan: _refcoco(root, plan, ("val", "test"), "umd", True),
}


# --- the tree and the command line ----------------------------------------------------------------------------------

def _replaceable(out: Path) -> bool:
    if not out.exists() or not any(out.iterdir()):
        return True
    try:
        return json.loads((out / "manifest.json").read_text(encoding="utf-8")).get("generator") == GENERATOR
    except (OSError, ValueError, AttributeError):
        return False


def write_benchmark_files(out_dir: str | Path, seed: int = 0, per_benchmark: int = DEFAULT_PER_BENCHMARK,
                          image_size: int = IMAGE_SIZE, progress: bool = False) -> dict[str, int]:
    """Write every benchmark's synthetic files under ``out_dir/<name>/``; returns the samples written per name.

    ``per_benchmark`` is the number of images per benchmark (per split for RefCOCO/+/g); a benchmark with several
    questions per image (POPE, RefCOCO) has more samples.
    """
    if isinstance(per_benchmark, bool) or not isinstance(per_benchmark, int) or per_benchmark < 1:
        raise UserError(f"--per-benchmark: expected a whole number >= 1, got {per_benchmark!r}")
    if not 32 <= image_size <= 1024:
        raise UserError(f"--image-size: must be between 32 and 1024, got {image_size}")
    out = check_output_dir(out_dir, "--out", "synthetic benchmark files")
    if not _replaceable(out):
        raise UserError(f"--out: {out} exists and was not written by {GENERATOR}; refusing to replace it")
    seen = training_signatures(seed, image_size)
    counts = {}
    with writing(out, "the synthetic benchmark files"):  # what a killed earlier run left next to out
        remove_stale_temporaries(out.parent, [glob.escape(out.name)])
    with writing(out, "the synthetic benchmark files"), atomic_dir(out) as tmp:
        for name in NAMES:
            counts[name] = WRITERS[name](tmp / name, Plan(seed, name, per_benchmark, image_size, seen, progress))
        write_json(tmp / "manifest.json", {"generator": GENERATOR, "version": VERSION, "seed": seed,
                                           "per_benchmark": per_benchmark, "image_size": image_size,
                                           "counts": counts})
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tinygpt.tiny.synthetic.benchmark_files",
        description="Write held-out synthetic shapes scenes in the file layouts of GQA, VSR, IconQA, VizWiz, "
                    "Hateful Memes, OK-VQA, VQAv2, RefCOCO/+/g and POPE, for evaluating the tiny model.")
    parser.add_argument("--out", required=True, help="output directory (replaced if it holds an earlier output)")
    parser.add_argument("--per-benchmark", type=int, default=DEFAULT_PER_BENCHMARK,
                        help=f"images per benchmark (per split for RefCOCO; default {DEFAULT_PER_BENCHMARK})")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the synthetic data (default 0, the tiny default's)")
    parser.add_argument("--image-size", type=int, default=IMAGE_SIZE, help=f"image side (default {IMAGE_SIZE})")
    args = parser.parse_args(argv)

    def run() -> int:
        counts = write_benchmark_files(args.out, args.seed, args.per_benchmark, args.image_size, progress=True)
        for name, count in counts.items():
            print(f"{name:14s} {count} samples")
        print(f"wrote {args.out}")
        return 0

    return report_errors(run)


if __name__ == "__main__":
    sys.exit(main())
