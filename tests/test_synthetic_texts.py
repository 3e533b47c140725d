"""Synthetic shapes generator, the texts: every answer, caption, box and reasoning step re-derived from the scene it
describes; the tiny default's command line. The images and file layouts: test_synthetic.py."""

from __future__ import annotations

import json
import re

import pytest

from tinygpt.tiny.synthetic import texts
from tinygpt.tiny.synthetic.__main__ import main as cli_main
from tinygpt.tiny.synthetic.scenes import COLOURS, REGIONS, SHAPES, sample_scene, scene_rng
from tinygpt.tasks import box_to_pixels, iou, parse_boxes


def _scenes(seed: int, stream: str, count: int, size: int):
    return [sample_scene(scene_rng(seed, stream, i), size) for i in range(count)]


# --- texts re-derived from the scene --------------------------------------------------------------------------------

_WHERE = {phrase: region for region, phrase in texts.REGION_PHRASES.items()}
_SINGULAR = {plural: shape for shape, plural in texts.PLURALS.items()}


def _resolve(scene, name: str) -> list:
    """Objects a noun phrase of the questions denotes, parsed independently of the generator."""
    if m := re.fullmatch(r"the shape (.+)", name):
        return [o for o in scene.objects if o.region == _WHERE[m.group(1)]]
    if m := re.fullmatch(r"the (\w+) (shape|object)", name):
        return [o for o in scene.objects if o.colour == m.group(1)]
    if m := re.fullmatch(r"the (\w+) (\w+)", name):
        return [o for o in scene.objects if (o.colour, o.shape) == m.groups()]
    if m := re.fullmatch(r"the (\w+)", name):
        return [o for o in scene.objects if o.shape == m.group(1)]
    raise AssertionError(f"unparsed name {name!r}")


def _expected_answer(scene, question: str) -> str:
    def one(name):
        found = _resolve(scene, name)
        assert len(found) == 1, f"{question!r} is ambiguous or empty in {scene}"
        return found[0]

    if m := re.fullmatch(r"what color is (.+)\?", question):
        return one(m.group(1)).colour
    if m := re.fullmatch(r"what shape is (the .+)\?", question):
        return one(m.group(1)).shape
    if m := re.fullmatch(r"what shape is (.+)\?", question):
        return one("the shape " + m.group(1)).shape
    if question == "how many shapes are there?":
        return str(len(scene.objects))
    if m := re.fullmatch(r"how many (\w+) are there\?", question):
        return str(sum(o.shape == _SINGULAR[m.group(1)] for o in scene.objects))
    if m := re.fullmatch(r"is there a (\w+) (\w+)\?", question):
        return "yes" if any((o.colour, o.shape) == m.groups() for o in scene.objects) else "no"
    if m := re.fullmatch(r"where is (.+)\?", question):
        return one(m.group(1)).region
    if m := re.fullmatch(r"is (.+) small or large\?", question):
        return one(m.group(1)).size
    raise AssertionError(f"unknown question {question!r}")


def test_vqa_answers_match_scene():
    seen_answers = {kind: set() for kind in texts.VQA_KINDS}
    for i, scene in enumerate(_scenes(2, "vqa", 400, 112)):
        rng = scene_rng(2, "qa", i)
        for kind in texts.VQA_KINDS:
            qa = texts.question(scene, kind, rng)
            assert qa.answer == _expected_answer(scene, qa.question), qa
            assert qa.answer.lower() in qa.sentence.lower() or qa.kind.startswith("count")
            seen_answers[kind].add(qa.answer)
    assert seen_answers["exists"] == {"yes", "no"}
    assert seen_answers["color"] == set(COLOURS) and seen_answers["shape"] == set(SHAPES)
    assert seen_answers["position"] == set(REGIONS) and seen_answers["count"] == {"1", "2", "3"}


def test_caption_grounding_and_boxes_match_scene():
    for scene in _scenes(4, "captions", 200, 224):
        caption = texts.caption(scene)
        for obj in scene.objects:
            assert f"{obj.size} {obj.colour} {obj.shape} {texts.REGION_PHRASES[obj.region]}" in caption
        grounded = parse_boxes(texts.grounded_caption(scene))
        assert [p for p, _ in grounded] == [f"a {texts.phrase(o)}" for o in scene.objects]
        for (_, box100), obj in zip(grounded, scene.objects):
            assert iou(box_to_pixels(box100, scene.width, scene.height), obj.box) > 0.8   # truncation to 0-100
        detections = parse_boxes(texts.detection_answer(scene))
        assert [p for p, _ in detections] == [texts.phrase(o) for o in scene.objects]


def test_reasoning_answers_match_scene():
    words = {0: "no", 1: "one", 2: "two", 3: "three"}
    for i, scene in enumerate(_scenes(6, "reason", 200, 112)):
        question, answer = texts.reasoning(scene, scene_rng(6, "why", i))
        n = len(scene.objects)
        if question.startswith("If the"):
            assert f"{words[n - 1]} shape" in answer.split(",")[-1]
        elif question == "Are all the shapes the same size?":
            assert answer.startswith("Yes" if len({o.size for o in scene.objects}) == 1 else "No")
        else:
            leftmost = [o for o in scene.objects if o.region == "left"] or \
                [o for o in scene.objects if o.region != "right"]
            assert len(leftmost) == 1 and answer.startswith(f"The {leftmost[0].colour} {leftmost[0].shape} ")


@pytest.mark.slow
def test_cli_tiny_default_under_a_minute(tmp_path, capsys):
    import time
    start = time.monotonic()
    assert cli_main(["--out", str(tmp_path / "tiny"), "--seed", "0"]) == 0
    assert time.monotonic() - start < 60
    top = json.loads((tmp_path / "tiny" / "manifest.json").read_text())
    assert top["plan"]["laion"] == 3000 and top["roots"]["coco"]["images"] == 1500
    assert "wrote" in capsys.readouterr().out


def test_multi_image_questions():
    rng = scene_rng(0, "multi", 0)
    three = next(s for s in _scenes(5, "three", 50, 112) if len(s.objects) == 3)
    one = next(s for s in _scenes(5, "one", 50, 112) if len(s.objects) == 1)
    assert texts.compare_counts([one, three])[1] == "the second image"
    question, answer = texts.which_image_has([one, three], rng)
    colour, shape = re.fullmatch(r"which image has a (\w+) (\w+)\?", question).groups()
    owners = [i for i, s in enumerate([one, three]) if any((o.colour, o.shape) == (colour, shape) for o in s.objects)]
    assert len(owners) == 1 and answer == f"the {texts.ORDINALS[owners[0]]} image"
    with pytest.raises(ValueError):
        texts.compare_counts([one, one])
