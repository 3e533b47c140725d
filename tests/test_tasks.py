"""Task identifiers, prompt lists and the box text format shared by data, evaluation and chat."""

import random

import pytest

from tinygpt import tasks


def test_prompt_lists_have_original_sizes_and_tags():
    assert len(tasks.CAPTION_PROMPTS) == 17
    assert len(tasks.REFER_PROMPTS) == 7 and len(tasks.IDENTIFY_PROMPTS) == 7
    assert len(tasks.GROUNDING_PROMPTS) == 4 and len(tasks.VQA_PROMPTS) == 2
    for task, prompts in tasks.PROMPTS.items():
        assert all(p.startswith(f"[{task}] ") for p in prompts), task
    assert tasks.REFER_PROMPTS[1].format("the dog") == "[refer] give me the location of the dog"


def test_task_tag_and_split():
    assert tasks.task_tag("vqa") == "[vqa]"
    with pytest.raises(ValueError):
        tasks.task_tag("segment")
    assert tasks.split_task_tag("[refer] where is the cat") == ("refer", "where is the cat")
    assert tasks.split_task_tag("what is this") == (None, "what is this")
    assert tasks.wrap_instruction("[vqa] why") == "<Img><ImageHere></Img> [vqa] why "


def test_format_box_truncates_on_0_100_grid():
    assert tasks.format_box((10, 20, 110, 220), 200, 400) == "{<5><5><55><55>}"
    assert tasks.format_box((0, 0, 640, 480), 640, 480) == "{<0><0><100><100>}"
    assert tasks.format_box((99.9, 0, 100, 1), 100, 100) == "{<99><0><100><1>}"  # int() truncates
    assert tasks.format_box((-5, 0, 700, 10), 640, 480) == "{<0><0><100><2>}"  # clamped
    with pytest.raises(ValueError):
        tasks.format_box((0, 0, 1, 1), 0, 10)


def test_parse_boxes_phrases_and_delim():
    text = ("a <p>man</p> {<1><2><30><40>} rides <p>two horses</p> {<5><6><7><8>}<delim>{<9><10><11><12>} "
            "near {<0><0><100><100>}")
    assert tasks.parse_boxes(text) == [
        ("man", (1, 2, 30, 40)), ("two horses", (5, 6, 7, 8)), ("two horses", (9, 10, 11, 12)),
        (None, (0, 0, 100, 100))]
    assert tasks.parse_boxes("<10><20><30><40>") == [(None, (10, 20, 30, 40))]  # bare form (model output)
    assert tasks.parse_boxes("no boxes here") == []


def test_box_round_trip_property_over_random_boxes():
    rng = random.Random(0)
    for _ in range(2000):
        width, height = rng.randint(1, 2000), rng.randint(1, 2000)
        x1, x2 = sorted(rng.uniform(0, width) for _ in range(2))
        y1, y2 = sorted(rng.uniform(0, height) for _ in range(2))
        phrase = rng.choice(["cat", "red ball", "a b c"])
        text = tasks.format_phrase_box(phrase, tasks.format_box((x1, y1, x2, y2), width, height))
        [(parsed_phrase, box100)] = tasks.parse_boxes(text)
        assert parsed_phrase == phrase
        assert tasks.box_is_valid(box100)
        assert box100 == tuple(int(v / e * 100) for v, e in ((x1, width), (y1, height), (x2, width), (y2, height)))
        back = tasks.box_to_pixels(box100, width, height)
        # one grid cell is the most precision lost per coordinate
        for original, restored, extent in zip((x1, y1, x2, y2), back, (width, height, width, height)):
            assert 0 <= original - restored < extent / 100 + 1e-9


def test_iou_values():
    assert tasks.iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert tasks.iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert tasks.iou((0, 0, 1, 1), (2, 2, 3, 3)) == 0.0
    assert tasks.iou((0, 0, 0, 0), (0, 0, 0, 0)) == 0.0
