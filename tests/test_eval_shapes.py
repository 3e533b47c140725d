"""The shapes benchmark (tinygpt.evaluation.benchmarks.shapes): loading the generator's held-out split with the
recipe's prompts and limits, its errors, and scoring hand-made predictions to hand-computed figures."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

from tinygpt.errors import UserError
from tinygpt.evaluation.benchmark import Prediction
from tinygpt.evaluation.benchmarks import get_benchmark
from tinygpt.evaluation.benchmarks.shapes import caption_prompt_for

SHAPES = get_benchmark("shapes")
SPLIT = SHAPES.splits[0]
TAG = "<Img><ImageHere></Img>"


@pytest.fixture(scope="module")
def split(tmp_path_factory) -> Path:
    """The generator's held-out split: 3 scenes, 2 questions each, one phrase per object."""
    from tinygpt.tiny.synthetic import Scale, generate

    data = tmp_path_factory.mktemp("shapes") / "data"
    generate(data, seed=3, scale=Scale(laion=4, cc_sbu=2, align=2, instruct_images=2, vqa_per_image=1, multi_image=2,
                                       unnatural=2, eval_images=3, eval_vqa_per_image=2, shard_size=4), progress=False)
    return data / "eval"


def _records(root: Path, name: str) -> list[dict]:
    return json.loads((root / name).read_text())


def test_load_gives_the_recipes_prompts_tokens_and_order(split):
    captions, vqa, refer = (_records(split, n) for n in ("captions.json", "vqa.json", "refer.json"))
    samples = SHAPES.load(split, SPLIT, {})
    assert len(samples) == len(captions) + len(vqa) + len(refer) == 3 + 6 + len(refer)
    assert [s.id for s in samples] == ([f"caption/{i}" for i in range(3)] + [f"vqa/{i}" for i in range(6)]
                                       + [f"refer/{i}" for i in range(len(refer))])
    cap, q, r = samples[0], samples[3], samples[9]
    assert cap.prompt == f"{TAG} [caption] Briefly describe this image. " and cap.max_new_tokens == 48
    assert cap.answers == tuple(captions[0]["caption"]) and cap.meta["task"] == "caption"
    assert q.prompt == f"{TAG} [vqa] {vqa[0]['question']} " and q.max_new_tokens == 8
    assert q.answers == tuple(vqa[0]["answer"]) and q.meta["kind"] == vqa[0]["kind"] and q.meta["task"] == "vqa"
    assert r.prompt == f"{TAG} [refer] give me the location of {refer[0]['sents']} " and r.max_new_tokens == 20
    x, y, w, h = refer[0]["bbox"]
    assert r.box == (x, y, x + w, y + h) and r.image_size == (refer[0]["width"], refer[0]["height"])
    assert all(s.generate and not s.choices and len(s.images) == 1 for s in samples)
    assert all(Path(s.images[0]).is_absolute() and Path(s.images[0]).is_file() for s in samples)
    assert Path(cap.images[0]) == (split / captions[0]["image"]).resolve()

    bare = SHAPES.load(split, SPLIT, {"caption_prompt": "bare"})
    assert [s.prompt for s in bare[:3]] == ["<ImageHere>"] * 3 and bare[3:] == samples[3:]


def test_limit_caps_each_list_and_the_engine_chooses_the_caption_prompt(split):
    limited = SHAPES.load(split, SPLIT, {"limit": 2})
    assert [s.id for s in limited] == ["caption/0", "caption/1", "vqa/0", "vqa/1", "refer/0", "refer/1"]

    def engine(template):
        return SimpleNamespace(backend=SimpleNamespace(prompt=SimpleNamespace(template=template)))

    assert caption_prompt_for(engine("{}")) == "bare" and caption_prompt_for(engine(" {} ")) == "bare"
    assert caption_prompt_for(engine("[INST] {} [/INST]")) == "tagged"


@pytest.mark.parametrize("options, field", [
    ({"limt": 3}, "benchmark.options.limt"),
    ({"limit": 0}, "benchmark.options.limit"),
    ({"limit": "3"}, "benchmark.options.limit"),
    ({"caption_prompt": "plain"}, "benchmark.options.caption_prompt"),
])
def test_bad_options_name_the_option(split, options, field):
    with pytest.raises(UserError, match=field.replace(".", r"\.")):
        SHAPES.load(split, SPLIT, options)
    with pytest.raises(UserError, match="benchmark.split"):
        SHAPES.load(split, "test", {})


def _write_split(root: Path, captions=None, vqa=None, refer=None) -> Path:
    (root / "images").mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (200, 100), "white").save(root / "images" / "a.png")
    for name, records in (("captions.json", captions), ("vqa.json", vqa), ("refer.json", refer)):
        (root / name).write_text(json.dumps(records if records is not None else []))
    return root


@pytest.mark.parametrize("files, needle", [
    ({"vqa": [{"image": "images/a.png", "answer": ["red"]}]}, r"vqa\.json: record 0 lacks the field 'question'"),
    ({"refer": [{"image": "../a.png", "sents": "x", "bbox": [0, 0, 1, 1], "box_text": "", "width": 2,
                 "height": 2}]}, r"refer\.json: record 0: image: .*'\.\.'"),
    ({"captions": [{"image": "images/none.png", "caption": ["x"]}]}, r"captions\.json: record 0: image: .*none\.png"),
    ({"captions": {"image": "images/a.png"}}, r"captions\.json: expected a JSON list"),
])
def test_bad_records_name_the_file_and_the_record(tmp_path, files, needle):
    root = _write_split(tmp_path / "eval", **files)
    with pytest.raises(UserError, match=needle):
        SHAPES.load(root, SPLIT, {})


def test_a_missing_file_is_named(tmp_path):
    root = _write_split(tmp_path / "eval")
    (root / "refer.json").unlink()
    with pytest.raises(UserError, match=r"refer\.json: missing"):
        SHAPES.load(root, SPLIT, {})


# ---- scoring -------------------------------------------------------------------------------------------------------
CAPTIONS = [{"image": "images/a.png",
             "caption": ["two shapes, a small red circle on the left and a large blue square on the right."]},
            {"image": "images/a.png", "caption": ["one shape, a small green triangle in the center."]}]
VQA = [{"image": "images/a.png", "question": "what color is the circle?", "answer": ["red"] * 10, "kind": "color"},
       {"image": "images/a.png", "question": "how many shapes are there?", "answer": ["2"] * 10, "kind": "count"},
       {"image": "images/a.png", "question": "is there a red circle?", "answer": ["yes"] * 10, "kind": "exists"},
       {"image": "images/a.png", "question": "what shape is the blue object?", "answer": ["square"] * 10,
        "kind": "shape"}]
REFER = [{"image": "images/a.png", "sents": "large blue square", "bbox": [20, 10, 80, 40],
          "box_text": "{<10><10><50><50>}", "width": 200, "height": 100},
         {"image": "images/a.png", "sents": "small red circle", "bbox": [0, 0, 100, 50],
          "box_text": "{<0><0><50><50>}", "width": 200, "height": 100},
         {"image": "images/a.png", "sents": "small green triangle", "bbox": [0, 0, 10, 10],
          "box_text": "{<0><0><5><10>}", "width": 200, "height": 100}]
ANSWERS = {
    # the reference without its full stop: F1 1, exact 1, both objects named
    "caption/0": "two shapes, a small red circle on the left and a large blue square on the right",
    # 4 of 5 words in the 7 of the reference (articles dropped): F1 = 2*4 / (5 + 7) = 2/3; the triangle not named
    "caption/1": "one shape, a small green cross",
    "vqa/0": "Red.",          # right after normalisation
    "vqa/1": "two",           # right: number words are digits
    "vqa/2": "2",             # wrong, but an answer of the split
    "vqa/3": "banana",        # wrong and no answer of the split: unparsed
    "refer/0": "{<10><10><50><50>}",  # (20, 10, 100, 50) px: IoU 1
    "refer/1": "{<0><0><25><50>}",    # (0, 0, 50, 50) px against (0, 0, 100, 50): IoU 0.5, not above 0.5
    "refer/2": "the top left",        # no box: unparsed, a miss
}


def test_score_hand_made_predictions(tmp_path):
    root = _write_split(tmp_path / "eval", CAPTIONS, VQA, REFER)
    samples = SHAPES.load(root, SPLIT, {})
    predictions = [Prediction(s.id, ANSWERS[s.id]) for s in reversed(samples)]  # matched by id, not by position
    scores = SHAPES.score(samples, predictions, "official")
    assert scores["caption_f1"] == pytest.approx((1 + 2 / 3) / 2)
    assert scores["caption_exact"] == 0.5 and scores["caption_attribute_recall"] == 0.5
    assert scores["vqa_accuracy"] == 0.5 and scores["vqa_unparsed"] == 0.25
    assert scores["vqa_per_kind"] == {"color": 1.0, "count": 1.0, "exists": 0.0, "shape": 0.0}
    assert scores["grounding_accuracy"] == pytest.approx(1 / 3) and scores["grounding_unparsed"] == pytest.approx(1 / 3)
    assert scores["grounding_mean_iou"] == pytest.approx((1 + 0.5 + 0) / 3)
    assert scores["counts"] == {"captions": 2, "vqa": 4, "refer": 3}
    assert scores["metric"] == "vqa_accuracy" and scores["value"] == 0.5 and scores["n"] == 9
    assert scores["examples"]["vqa"][0] == ["what color is the circle?", "red", "Red."]
    assert scores["examples"]["refer"][2] == ["small green triangle", "{<0><0><5><10>}", "the top left"]
    assert SHAPES.score(samples, predictions, "tinygpt-v-compat") == {**scores, "compat": "same as official"}


def test_score_with_a_limit_keeps_the_whole_files_answers_and_needs_every_prediction(tmp_path):
    root = _write_split(tmp_path / "eval", CAPTIONS, VQA, REFER)
    samples = SHAPES.load(root, SPLIT, {"limit": 1})
    answers = {"caption/0": "", "vqa/0": "square", "refer/0": "{<10><10><50><50>}"}
    scores = SHAPES.score(samples, [Prediction(i, t) for i, t in answers.items()], "official")
    # "square" is the answer of vqa/3, which the limit left out: wrong, yet an answer of the split
    assert scores["vqa_accuracy"] == 0.0 and scores["vqa_unparsed"] == 0.0
    assert scores["caption_f1"] == 0.0 and scores["caption_attribute_recall"] == 0.0
    assert scores["grounding_accuracy"] == 1.0 and scores["n"] == 3
    with pytest.raises(UserError, match="refer/0"):
        SHAPES.score(samples, [Prediction(i, t) for i, t in answers.items() if i != "refer/0"], "official")
    with pytest.raises(UserError, match="scoring"):
        SHAPES.score(samples, [Prediction(i, t) for i, t in answers.items()], "lenient")
