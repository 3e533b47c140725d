"""Texts derived from a scene: captions, questions with answers, referring phrases, conversations.

Everything here is a pure function of the scene (plus an explicit rng where a choice of question is made),
so every answer can be re-derived from the scene's objects. The vocabulary is small and the answers are
short and unambiguous: an object is only ever named by attributes that single it out in its scene
(colours and regions are unique per scene; a shape is used as a name only when it occurs once).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from tinygpt.tiny.synthetic.scenes import COLOURS, SHAPES, Scene, ShapeObject
from tinygpt.tasks import DELIM, format_box, format_phrase_box

REGION_PHRASES = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
NUMBER_WORDS = {0: "no", 1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six"}
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses"}
ORDINALS = ("first", "second", "third")
COLUMNS = {"left": 0, "top": 1, "center": 1, "bottom": 1, "right": 2}  # coarse x position of a region

VQA_KINDS = ("color", "shape", "count", "count_shape", "exists", "position", "size")


@dataclass(frozen=True)
class QA:
    """One question about one scene: a short answer (VQA) and a sentence answer (conversations)."""
    kind: str
    question: str
    answer: str
    sentence: str


# --- naming objects -------------------------------------------------------------------------------------------------

def phrase(obj: ShapeObject) -> str:
    """The canonical referring phrase, e.g. "large red circle" (unique in a scene: colours are unique)."""
    return f"{obj.size} {obj.colour} {obj.shape}"


def _with_article(text: str) -> str:
    return f"a {text}"


def _count_phrase(n: int) -> str:
    return f"{NUMBER_WORDS[n]} shape" if n == 1 else f"{NUMBER_WORDS[n]} shapes"


def box_text(scene: Scene, obj: ShapeObject) -> str:
    return format_box(obj.box, scene.width, scene.height)


def _shape_is_unique(scene: Scene, shape: str) -> bool:
    return sum(o.shape == shape for o in scene.objects) == 1


# --- captions and descriptions --------------------------------------------------------------------------------------

def _join(parts: list[str]) -> str:
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def caption(scene: Scene) -> str:
    """"two shapes, a large red circle on the left and a small blue square at the bottom." (objects in region order).

    The count leads (then a comma, which the BLIP caption processor keeps) so that captions, the only text of stages
    1-2, also train the projection of the image's count (without it the stage-1 projection leaves the count query
    untrained, and "how many shapes" stayed far under the ceiling; docs/tiny-twin-log.md)."""
    parts = [f"{_with_article(phrase(o))} {REGION_PHRASES[o.region]}" for o in scene.objects]
    return f"{_count_phrase(len(scene.objects))}, " + _join(parts) + "."


def detailed_description(scene: Scene) -> str:
    """A few fixed-pattern sentences: how many shapes, then one sentence per object."""
    n = len(scene.objects)
    verb = "is" if n == 1 else "are"
    lines = [f"There {verb} {_count_phrase(n)} on a plain light background."]
    for obj in scene.objects:
        where = REGION_PHRASES[obj.region]
        lines.append(f"{where[0].upper()}{where[1:]} there is {_with_article(phrase(obj))}.")
    return " ".join(lines)


def grounded_caption(scene: Scene) -> str:
    """Each object phrase followed by its box: "<p>a large red circle</p> {<5><30><48><72>} on the left"."""
    parts = [f"{format_phrase_box(_with_article(phrase(o)), box_text(scene, o))} {REGION_PHRASES[o.region]}"
             for o in scene.objects]
    return _join(parts) + "."


def detection_answer(scene: Scene) -> str:
    """All objects as phrase-box pairs joined with <delim> (flickr caption-to-boxes answer)."""
    return DELIM.join(format_phrase_box(phrase(o), box_text(scene, o)) for o in scene.objects)


def object_list(scene: Scene) -> str:
    """"large red circle, small blue square" (the detection query of the caption-to-boxes task)."""
    return ", ".join(phrase(o) for o in scene.objects)


# --- questions ------------------------------------------------------------------------------------------------------

def question(scene: Scene, kind: str, rng: random.Random) -> QA:
    """One question of `kind` (see VQA_KINDS) about the scene, with its deterministic answer."""
    obj = rng.choice(scene.objects)
    n = len(scene.objects)
    if kind == "color":
        options = [f"the shape {REGION_PHRASES[obj.region]}"]
        if _shape_is_unique(scene, obj.shape):
            options.append(f"the {obj.shape}")
        name = rng.choice(options)
        return QA(kind, f"what color is {name}?", obj.colour, f"{name.capitalize()} is {obj.colour}.")
    if kind == "shape":
        if rng.random() < 0.5:
            return QA(kind, f"what shape is the {obj.colour} object?", obj.shape,
                      f"The {obj.colour} object is a {obj.shape}.")
        where = REGION_PHRASES[obj.region]
        return QA(kind, f"what shape is {where}?", obj.shape, f"{where.capitalize()} is a {obj.shape}.")
    if kind == "count":
        verb = "is" if n == 1 else "are"
        return QA(kind, "how many shapes are there?", str(n), f"There {verb} {_count_phrase(n)}.")
    if kind == "count_shape":
        shape = rng.choice(SHAPES)
        k = sum(o.shape == shape for o in scene.objects)
        noun = shape if k == 1 else PLURALS[shape]
        verb = "is" if k == 1 else "are"
        return QA(kind, f"how many {PLURALS[shape]} are there?", str(k), f"There {verb} {NUMBER_WORDS[k]} {noun}.")
    if kind == "exists":
        present = {(o.colour, o.shape) for o in scene.objects}
        if rng.random() < 0.5:
            colour, shape = obj.colour, obj.shape
        else:
            absent = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present]
            colour, shape = rng.choice(absent)
        if (colour, shape) in present:
            where = next(REGION_PHRASES[o.region] for o in scene.objects if (o.colour, o.shape) == (colour, shape))
            return QA(kind, f"is there a {colour} {shape}?", "yes", f"Yes, there is a {colour} {shape} {where}.")
        return QA(kind, f"is there a {colour} {shape}?", "no", f"No, there is no {colour} {shape}.")
    if kind == "position":
        name = rng.choice([f"the {obj.colour} {obj.shape}", f"the {obj.colour} shape"])
        return QA(kind, f"where is {name}?", obj.region, f"{name.capitalize()} is {REGION_PHRASES[obj.region]}.")
    if kind == "size":
        name = f"the {obj.colour} {obj.shape}"
        return QA(kind, f"is {name} small or large?", obj.size, f"{name.capitalize()} is {obj.size}.")
    raise ValueError(f"unknown question kind {kind!r}; expected one of {VQA_KINDS}")


def questions(scene: Scene, rng: random.Random, count: int) -> list[QA]:
    """`count` questions of distinct kinds (kinds drawn without replacement, then repeated if count > kinds)."""
    kinds = rng.sample(VQA_KINDS, len(VQA_KINDS))
    return [question(scene, kinds[i % len(kinds)], rng) for i in range(count)]


# --- reasoning (LLaVA "complex reasoning" style) -------------------------------------------------------------------

def reasoning(scene: Scene, rng: random.Random) -> tuple[str, str]:
    """A question whose answer needs a small inference, answered with the reason first."""
    objs = scene.objects
    n = len(objs)
    obj = rng.choice(objs)
    columns = [COLUMNS[o.region] for o in objs]
    kinds = ["remove"]
    if n >= 2:
        kinds.append("sizes")
        if columns.count(min(columns)) == 1:   # one object is clearly furthest left
            kinds.append("leftmost")
    kind = rng.choice(kinds)
    if kind == "remove":
        verb = "is" if n == 1 else "are"
        return (f"If the {obj.colour} {obj.shape} were removed, how many shapes would be left?",
                f"There {verb} {_count_phrase(n)} in the image. "
                f"Without the {obj.colour} {obj.shape}, {_count_phrase(n - 1)} would be left.")
    if kind == "sizes":
        sizes = {o.size for o in objs}
        if len(sizes) == 1:
            return ("Are all the shapes the same size?", f"Yes. All {NUMBER_WORDS[n]} shapes are {objs[0].size}.")
        detail = _join([f"the {o.colour} {o.shape} is {o.size}" for o in objs])
        return ("Are all the shapes the same size?", f"No. {detail[0].upper()}{detail[1:]}.")
    leftmost = objs[columns.index(min(columns))]
    return ("Which shape is furthest to the left?",
            f"The {leftmost.colour} {leftmost.shape} is furthest to the left; it is {REGION_PHRASES[leftmost.region]}.")


# --- multi-image questions -------------------------------------------------------------------------------------------

def compare_counts(scenes: list[Scene]) -> tuple[str, str]:
    """"which of the two images has more shapes?" -> "the first image" (the counts must differ)."""
    counts = [len(s.objects) for s in scenes]
    best = max(counts)
    if counts.count(best) != 1:
        raise ValueError("compare_counts needs one image with strictly the most shapes")
    return (f"which of the {NUMBER_WORDS[len(scenes)]} images has more shapes?",
            f"the {ORDINALS[counts.index(best)]} image")


def which_image_has(scenes: list[Scene], rng: random.Random) -> tuple[str, str] | None:
    """"which image has a red circle?" about a colour+shape found in exactly one image (None if there is none)."""
    owners: dict[tuple[str, str], list[int]] = {}
    for i, scene in enumerate(scenes):
        for o in scene.objects:
            owners.setdefault((o.colour, o.shape), []).append(i)
    unique = sorted(key for key, where in owners.items() if len(set(where)) == 1)
    if not unique:
        return None
    colour, shape = rng.choice(unique)
    return f"which image has a {colour} {shape}?", f"the {ORDINALS[owners[(colour, shape)][0]]} image"


def count_in_image(scenes: list[Scene], index: int) -> tuple[str, str]:
    return f"how many shapes are in the {ORDINALS[index]} image?", str(len(scenes[index].objects))
