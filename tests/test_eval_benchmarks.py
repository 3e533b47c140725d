"""The benchmark loaders on small samples written by hand in each official layout (tests/benchmark_layouts.py), and
their errors. Scores and the synthetic benchmark files: test_eval_benchmark_scores.py."""

import json
import pickle
from pathlib import Path

import pytest

from tinygpt.errors import UserError
from tinygpt.evaluation.benchmarks import get_benchmark

from benchmark_layouts import (VQA, WRITERS, image_file, json_file, jsonl_file, load_bench, write_gqa,
                               write_hateful_memes, write_iconqa, write_pope, write_refcoco, write_vizwiz, write_vqa,
                               write_vsr)



def test_gqa_loader(tmp_path):
    write_gqa(tmp_path)
    samples = load_bench("gqa", tmp_path)
    assert [s.id for s in samples] == ["201", "202"]
    assert samples[0].prompt == VQA + "Is the sky blue?"
    assert samples[1].answers == ("the table",) and samples[1].max_new_tokens == 10
    assert samples[0].images == (str((tmp_path / "images" / "n1.jpg").resolve()),)
    assert samples[0].meta == {"structural": "verify", "semantic": "attr"}
    assert [s.id for s in load_bench("gqa", tmp_path, limit=1)] == ["201"]
    custom = load_bench("gqa", tmp_path, prompt="Q: {question} A:")
    assert custom[1].prompt == "Q: What is on the table? A:"
    compat = load_bench("gqa", tmp_path, prompt_style="tinygpt-v")
    assert compat[0].prompt == samples[0].prompt and compat[0].max_new_tokens == 20


def test_vsr_loader(tmp_path):
    write_vsr(tmp_path)
    samples = load_bench("vsr", tmp_path)
    assert [s.id for s in samples] == ["0", "1"]
    assert samples[0].prompt == "[vqa] Based on the image, is this statement true or false? The car is behind the cat."
    assert [(s.label, s.answers) for s in samples] == [(1, ("true",)), (0, ("false",))]
    assert samples[1].meta == {"relation": "under"}
    assert samples[1].images[0].endswith("images/000000199940.jpg")
    assert load_bench("vsr", tmp_path, prompt="{question} True or false?")[0].prompt == \
        "The car is behind the cat. True or false?"


@pytest.mark.parametrize("problems_json", [True, False])
def test_iconqa_loader(tmp_path, problems_json):
    write_iconqa(tmp_path / "iconqa_data", problems_json)
    samples = load_bench("iconqa", tmp_path)                      # the folder holding iconqa_data/ works too
    assert [s.id for s in samples] == (["37", "12"] if problems_json else ["12", "37"])
    first = next(s for s in samples if s.id == "37")
    assert first.choices == ("circle", "square") and first.label == 1 and first.answers == ("square",)
    assert first.prompt == VQA + "Which shape is this? Options: circle, square."
    assert first.images[0].endswith("iconqa/val/choose_txt/37/image.png") and first.meta == {"grade": "prek"}
    original = load_bench("iconqa", tmp_path, prompt_style="tinygpt-v")
    assert {s.prompt for s in original} == {"Which shape is this?", "How many dots?"}


@pytest.mark.parametrize("annotations", ["Annotations/val.json", "val.json"])
def test_vizwiz_loader(tmp_path, annotations):
    write_vizwiz(tmp_path, annotations)
    samples = load_bench("vizwiz", tmp_path)
    assert [s.id for s in samples] == ["VizWiz_val_00000000", "VizWiz_val_00000001"]
    assert samples[0].answers == ("basil",) * 7 + ("spice",) * 3
    assert samples[0].prompt.startswith("[vqa] The question is 'What is this?' Based on the image")
    assert samples[1].meta == {"answer_type": "unanswerable", "answerable": 0}


def test_hateful_memes_loader(tmp_path):
    write_hateful_memes(tmp_path)
    samples = load_bench("hateful_memes", tmp_path)
    assert [(s.id, s.label, s.choices) for s in samples] == [("42953", 0, ("yes", "no")), ("8291", 1, ("yes", "no"))]
    assert samples[1].images[0].endswith("img/08291.png")
    assert samples[0].prompt == ("[vqa] This is an image with the text 'a nice day' written on it. "
                                 "Is this image hateful? Answer yes or no.")
    assert load_bench("hateful_memes", tmp_path, prompt_style="tinygpt-v")[0].prompt == \
        "This is an image writting 'a nice day'. Is this image hateful? Answer yes or no. Answer:"
    moved = tmp_path / "elsewhere"
    image_file(moved / "42953.png")
    assert load_bench("hateful_memes", tmp_path, images=str(moved), limit=1)[0].images[0] == \
        str((moved / "42953.png").resolve())


@pytest.mark.parametrize("name", ["vqav2", "okvqa"])
def test_vqa_loaders(tmp_path, name):
    write_vqa(tmp_path, name)
    samples = load_bench(name, tmp_path)
    assert [s.id for s in samples] == ["262148000", "42001"]
    assert samples[0].answers == ("down",) * 10 and samples[1].meta == {"answer_type": "number"}
    assert samples[1].images[0].endswith("val2014/COCO_val2014_000000000042.jpg")
    assert samples[0].prompt == VQA + "Where is he looking?"


def test_refcoco_loader_boxes_in_pixels(tmp_path):
    write_refcoco(tmp_path)
    samples = load_bench("refcoco", tmp_path)
    assert [s.id for s in samples] == ["5_0", "5_1"]
    first = samples[0]
    assert first.box == (20.0, 10.0, 100.0, 60.0) and first.image_size == (200, 100)   # [x, y, w, h] -> x1y1x2y2
    assert first.prompt == "[refer] give me the location of the lady in blue"
    assert first.answers == ("{<10><10><50><60>}",) and first.max_new_tokens == 20
    assert first.images[0].endswith("train2014/COCO_train2014_000000000007.jpg")
    assert [s.id for s in load_bench("refcoco", tmp_path, "testA")] == ["6_0"]


def test_refcocog_reads_umd_under_an_annotation_root(tmp_path):
    images = tmp_path / "coco" / "train2014"
    write_refcoco(tmp_path / "ann" / "refcocog", "refs(umd).p", images=images)
    samples = load_bench("refcocog", tmp_path / "ann", "test", images=str(images))
    assert [(s.id, s.box, s.image_size) for s in samples] == [("8_0", (1.0, 2.0, 4.0, 6.0), (50, 50))]
    assert get_benchmark("refcocog").splits == ("val", "test")


def test_pope_loader(tmp_path):
    write_pope(tmp_path)
    everything = load_bench("pope", tmp_path)
    assert [s.id for s in everything] == ["random/0", "random/1", "popular/0", "popular/1", "adversarial/0",
                                          "adversarial/1"]
    assert [s.label for s in everything] == [1, 0] * 3
    adversarial = load_bench("pope", tmp_path, "adversarial")
    assert [s.id for s in adversarial] == ["0", "1"]
    assert adversarial[1].prompt == VQA + "Is there a fork in the image?" and adversarial[1].meta == {
        "category": "adversarial"}


# --- errors ----------------------------------------------------------------------------------------------------------


# name -> (file to break, how to break its first record, the field the error must name)
BREAKS = {
    "gqa": ("testdev_balanced_questions.json", lambda c: c["201"].pop("imageId"), "imageId"),
    "vsr": ("test.jsonl", lambda c: c[0].pop("caption"), "caption"),
    "iconqa": ("problems.json", lambda c: c["37"].pop("choices"), "choices"),
    "vizwiz": ("Annotations/val.json", lambda c: c[0].pop("answers"), "answers"),
    "hateful_memes": ("dev.jsonl", lambda c: c[0].pop("label"), "label"),
    "vqav2": ("v2_OpenEnded_mscoco_val2014_questions.json", lambda c: c["questions"][0].pop("question"), "question"),
    "okvqa": ("mscoco_val2014_annotations.json", lambda c: c["annotations"][0]["answers"][3].pop("answer"), "answers"),
    "refcoco": ("instances.json", lambda c: c["images"][0].pop("width"), "width"),
    "pope": ("coco_pope_random.json", lambda c: c[0].pop("label"), "label"),
}


def _rewrite(path: Path, change) -> None:
    lines = path.suffix == ".jsonl" or path.name.startswith("coco_pope")
    content = [json.loads(line) for line in path.read_text().splitlines()] if lines else json.loads(path.read_text())
    change(content)
    jsonl_file(path, content) if lines else json_file(path, content)


@pytest.mark.parametrize("name", sorted(WRITERS))
def test_missing_file_names_the_file(tmp_path, name):
    WRITERS[name](tmp_path)
    broken = "pid_splits.json" if name == "iconqa" else BREAKS[name][0]   # without problems.json: data.json files
    (tmp_path / broken).unlink()
    with pytest.raises(UserError, match=r"does not exist") as error:
        load_bench(name, tmp_path)
    assert str(tmp_path / broken) in str(error.value)


@pytest.mark.parametrize("name", sorted(WRITERS))
def test_record_missing_a_field_names_file_and_field(tmp_path, name):
    WRITERS[name](tmp_path)
    broken, change, field = BREAKS[name]
    _rewrite(tmp_path / broken, change)
    with pytest.raises(UserError) as error:
        load_bench(name, tmp_path)
    message = str(error.value)
    assert str(tmp_path / broken) in message and repr(field) in message, message


def test_refcoco_pickle_with_code_is_refused(tmp_path):
    write_refcoco(tmp_path)
    (tmp_path / "refs(unc).p").write_bytes(pickle.dumps([{"ref_id": 1, "split": "val", "x": Path("a")}]))
    with pytest.raises(UserError, match=r"refs\(unc\)\.p: refused global"):
        load_bench("refcoco", tmp_path)


def test_missing_image_and_bad_options(tmp_path):
    write_gqa(tmp_path)
    (tmp_path / "images" / "n2.jpg").unlink()
    assert len(load_bench("gqa", tmp_path, limit=1)) == 1                       # the limit stops before the missing one
    with pytest.raises(UserError, match=r"question 202: image .*n2\.jpg does not exist"):
        load_bench("gqa", tmp_path)
    with pytest.raises(UserError, match=r"options\.promt: unknown option .*did you mean 'prompt'"):
        load_bench("gqa", tmp_path, promt="{question}")
    with pytest.raises(UserError, match=r"options\.prompt: unknown field \{caption\}"):
        load_bench("gqa", tmp_path, prompt="{caption}")
    with pytest.raises(UserError, match=r"options\.prompt_style: expected one of official, tinygpt-v"):
        load_bench("gqa", tmp_path, prompt_style="llava")
    with pytest.raises(UserError, match=r"options\.limit: expected a whole number >= 1"):
        load_bench("gqa", tmp_path, limit=0)
    with pytest.raises(UserError, match=r"options\.images: image directory .* does not exist"):
        load_bench("gqa", tmp_path, images=str(tmp_path / "nowhere"))


def test_vizwiz_leaving_the_image_folder_is_refused(tmp_path):
    write_vizwiz(tmp_path)
    _rewrite(tmp_path / "Annotations" / "val.json", lambda c: c[0].update(image="../secret.jpg"))
    with pytest.raises(UserError, match=r"record 0: field image: .*'\.\.'"):
        load_bench("vizwiz", tmp_path)


# --- scores on hand-made predictions ---------------------------------------------------------------------------------
