"""Held-out questions about two images at once, each needing both images: the ``eval/multi_image`` split.

The training set ``multi_image/`` asks about image pairs ("which of the two images has more shapes?", "which image has
a purple cross?" -> "the second image"); this split asks three families of held-out questions in the training
conversations' wording (the images first: ``Image 1: <image> Image 2: <image> {question}``):

=============  =============================================  =================================================
family         question                                       answer
=============  =============================================  =================================================
which_has      which image has a red square?                  the first image / the second image
count_both     how many circles are there in both images?     the total over the two images, a number (2-5)
compare_size   which image's triangle is larger?              the first image / the second image
=============  =============================================  =================================================

Each pair is built so the answer is unique and needs both images: the colour + shape of ``which_has`` is in exactly
one image (colours are unique inside a scene, so it is there once); the shape of ``count_both`` is in each image (so
neither image alone gives the total); the shape of ``compare_size`` is in each image exactly once, large in one and
small in the other. Answers are balanced: the families take turns, a family's "first" / "second" answers alternate,
and the totals of ``count_both`` cycle through 2, 3, 4, 5.

Scenes come from the stream ``eval_multi_image`` (index ``"{pair}:{attempt}"``), which no training set uses; a pair
is drawn again (next attempt) when a scene equals a training scene or the pair cannot carry its question. Shapes may
be reassigned after sampling (a shape does not change a box); colours, sizes, regions and boxes are the sampled ones.
Layout under ``eval/multi_image``: ``questions.json`` (records below), ``images/{pair:06d}_{0,1}.jpg`` and its own
``manifest.json``; the files of ``eval/`` itself, and every other file of the tree, are not changed by it::

    [{"question_id": 1, "images": ["images/000001_0.jpg", "images/000001_1.jpg"],
      "question": "which image has a red square?", "answer": "the first image", "family": "which_has"}, ...]
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

from tinygpt.tiny.synthetic import texts
from tinygpt.tiny.synthetic.scenes import MAX_OBJECTS, SHAPES, Scene, sample_scene, scene_rng
from tinygpt.tiny.synthetic.writers import Progress, write_images, write_json

STREAM = "eval_multi_image"
DIRECTORY = "multi_image"            # under eval/
QUESTIONS_FILE = "questions.json"
FAMILIES = ("which_has", "count_both", "compare_size")
COUNT_TOTALS = (2, 3, 4, 5)
MAX_ATTEMPTS = 1000


def pair_count(eval_images: int) -> int:
    """Pairs for a scale: half the single-image split, at least two per family, a whole number of rounds of the
    families times two (so each family's first / second answers split evenly)."""
    step = 2 * len(FAMILIES)
    return max(step, -(-(eval_images // 2) // step) * step)


def _which_image(ordinal: int) -> str:
    return f"the {texts.ORDINALS[ordinal]} image"


def _with_shapes(scene: Scene, shape: str, chosen: set[int], rng: random.Random) -> Scene:
    """The scene with ``shape`` on the objects at `chosen` and another shape on every other object."""
    others = [s for s in SHAPES if s != shape]
    objects = tuple(dataclasses.replace(o, shape=shape if k in chosen else rng.choice(others))
                    for k, o in enumerate(scene.objects))
    return dataclasses.replace(scene, objects=objects)


def _which_has(rng: random.Random, size: int, target: int) -> tuple[list[Scene], str, str] | None:
    pair = [sample_scene(rng, size), sample_scene(rng, size)]
    other = {(o.colour, o.shape) for o in pair[1 - target].objects}
    only_here = sorted((o.colour, o.shape) for o in pair[target].objects if (o.colour, o.shape) not in other)
    if not only_here:
        return None
    colour, shape = rng.choice(only_here)
    return pair, f"which image has a {colour} {shape}?", _which_image(target)


def _count_both(rng: random.Random, size: int, total: int) -> tuple[list[Scene], str, str]:
    first = rng.randint(max(1, total - MAX_OBJECTS), min(MAX_OBJECTS, total - 1))
    shape = rng.choice(SHAPES)
    pair = []
    for wanted in (first, total - first):
        scene = sample_scene(rng, size, rng.randint(wanted, MAX_OBJECTS))
        pair.append(_with_shapes(scene, shape, set(rng.sample(range(len(scene.objects)), wanted)), rng))
    return pair, f"how many {texts.PLURALS[shape]} are there in both images?", str(total)


def _compare_size(rng: random.Random, size: int, target: int) -> tuple[list[Scene], str, str] | None:
    pair = [sample_scene(rng, size), sample_scene(rng, size)]
    wanted = ["large" if k == target else "small" for k in range(2)]
    picks = [[k for k, o in enumerate(scene.objects) if o.size == want] for scene, want in zip(pair, wanted)]
    if not all(picks):
        return None
    shape = rng.choice(SHAPES)
    pair = [_with_shapes(scene, shape, {rng.choice(pick)}, rng) for scene, pick in zip(pair, picks)]
    return pair, f"which image's {shape} is larger?", _which_image(target)


def build_question(seed: int, index: int, size: int, seen: frozenset | set) -> tuple[list[Scene], dict]:
    """Pair `index` (0-based) and its question record (without the image paths); scenes are never in `seen`."""
    family = FAMILIES[index % len(FAMILIES)]
    turn = index // len(FAMILIES)   # this family's own counter: answers alternate / cycle on it
    for attempt in range(MAX_ATTEMPTS):
        rng = scene_rng(seed, STREAM, f"{index}:{attempt}")
        if family == "which_has":
            built = _which_has(rng, size, turn % 2)
        elif family == "count_both":
            built = _count_both(rng, size, COUNT_TOTALS[turn % len(COUNT_TOTALS)])
        else:
            built = _compare_size(rng, size, turn % 2)
        if built is not None and not any(scene.signature() in seen for scene in built[0]):
            pair, question, answer = built
            return pair, {"question_id": index + 1, "question": question, "answer": answer, "family": family}
    raise RuntimeError(f"no held-out pair for question {index} after {MAX_ATTEMPTS} attempts")  # unreachable


def write_multi_image_eval(eval_root: Path, seed: int, count: int, size: int, seen: frozenset | set,
                           show: bool) -> dict:
    """Write ``eval_root/multi_image`` (questions.json + images/); returns the counts for its manifest."""
    root = eval_root / DIRECTORY
    records, named = [], []
    for index in range(count):
        pair, record = build_question(seed, index, size, seen)
        images = [f"images/{index + 1:06d}_{k}.jpg" for k in range(len(pair))]
        named += [(Path(path).name, scene) for path, scene in zip(images, pair)]
        records.append({"question_id": record["question_id"], "images": images, "question": record["question"],
                        "answer": record["answer"], "family": record["family"]})
    write_images(root / "images", named, Progress("eval multi_image", len(named), show))
    write_json(root / QUESTIONS_FILE, records)
    families = {family: sum(r["family"] == family for r in records) for family in FAMILIES}
    return {"pairs": count, "images": len(named), QUESTIONS_FILE: len(records), "families": families}
