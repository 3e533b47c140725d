"""The benchmark loaders on small samples written by hand in each official layout, their errors, their scores on
hand-computed predictions (official and tinygpt-v-compat), and the synthetic benchmark files end to end."""

import json
import math
import pickle
from dataclasses import replace
from pathlib import Path

import pytest
from PIL import Image

from tinygpt.errors import UserError
from tinygpt.evaluation.benchmark import Prediction
from tinygpt.evaluation.benchmarks import get_benchmark, names
from tinygpt.tiny.synthetic import benchmark_files
from tinygpt.tiny.synthetic.benchmark_files import NAMES, write_benchmark_files

VQA = "[vqa] Based on the image, respond to this question with a short answer: "


def _image(path: Path, size=(8, 6)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (200, 30, 30)).save(path)
    return path


def _json(path: Path, content) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content), encoding="utf-8")
    return path


def _jsonl(path: Path, records) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def _load(name, root, split=None, **options):
    bench = get_benchmark(name)
    return bench.load(Path(root), split or bench.splits[0], options)


def _score(name, samples, texts=None, scores=None, scoring="official"):
    texts = texts or [None] * len(samples)
    scores = scores or [None] * len(samples)
    predictions = [Prediction(s.id, t, tuple(c) if c is not None else None) for s, t, c in zip(samples, texts, scores)]
    return get_benchmark(name).score(samples, predictions, scoring)


# --- the official layouts, written by hand ---------------------------------------------------------------------------

def write_gqa(root: Path) -> None:
    _json(root / "testdev_balanced_questions.json", {
        "201": {"imageId": "n1", "question": "Is the sky blue?", "answer": "yes", "fullAnswer": "Yes, it is.",
                "types": {"structural": "verify", "semantic": "attr", "detailed": "verifyAttr"}},
        "202": {"imageId": "n2", "question": "What is on the table?", "answer": "the table",
                "types": {"structural": "query", "semantic": "rel"}},
    })
    _image(root / "images" / "n1.jpg")
    _image(root / "images" / "n2.jpg")


def write_vsr(root: Path) -> None:
    _jsonl(root / "test.jsonl", [
        {"image": "000000017697.jpg", "image_link": "http://x", "caption": "The car is behind the cat.", "label": 1,
         "relation": "behind", "subj": "car", "obj": "cat"},
        {"image": "000000199940.jpg", "caption": "The cat is under the bag.", "label": 0, "relation": "under"},
    ])
    _image(root / "images" / "000000017697.jpg")
    _image(root / "images" / "000000199940.jpg")


ICONQA_PROBLEMS = {
    "37": {"question": "Which shape is this?", "choices": ["circle", "square"], "answer": 1,
           "ques_type": "choose_txt", "grade": "prek", "split": "val"},
    "12": {"question": "How many dots?", "choices": ["3", "5", "7"], "answer": 0, "ques_type": "choose_txt",
           "grade": "grade1", "split": "val"},
    "99": {"question": "Fill in.", "answer": "4", "ques_type": "fill_in_blank", "split": "val"},
}


def write_iconqa(root: Path, problems_json: bool = True) -> None:
    for pid in ("37", "12"):
        folder = root / "iconqa" / "val" / "choose_txt" / pid
        _image(folder / "image.png")
        _json(folder / "data.json", ICONQA_PROBLEMS[pid])
    if problems_json:
        _json(root / "problems.json", ICONQA_PROBLEMS)
        _json(root / "pid_splits.json", {"choose_txt_val": ["37", "12"], "choose_txt_test": [],
                                         "fill_in_blank_val": ["99"]})


def write_vizwiz(root: Path, annotations: str = "Annotations/val.json") -> None:
    _json(root / annotations, [
        {"image": "VizWiz_val_00000000.jpg", "question": "What is this?", "answer_type": "other", "answerable": 1,
         "answers": [{"answer": "basil", "answer_confidence": "yes"}] * 7
         + [{"answer": "spice", "answer_confidence": "maybe"}] * 3},
        {"image": "VizWiz_val_00000001.jpg", "question": "What color?", "answer_type": "unanswerable",
         "answerable": 0, "answers": [{"answer": "unanswerable", "answer_confidence": "yes"}] * 10},
    ])
    _image(root / "val" / "VizWiz_val_00000000.jpg")
    _image(root / "val" / "VizWiz_val_00000001.jpg")


def write_hateful_memes(root: Path) -> None:
    _jsonl(root / "dev.jsonl", [{"id": 42953, "img": "img/42953.png", "label": 0, "text": "a nice day"},
                                {"id": 8291, "img": "img/08291.png", "label": 1, "text": "a mean text"}])
    _image(root / "img" / "42953.png")
    _image(root / "img" / "08291.png")


VQA_FILES = {"vqav2": ("v2_OpenEnded_mscoco_val2014_questions.json", "v2_mscoco_val2014_annotations.json"),
             "okvqa": ("OpenEnded_mscoco_val2014_questions.json", "mscoco_val2014_annotations.json")}


def write_vqa(root: Path, name: str) -> None:
    questions, annotations = VQA_FILES[name]
    _json(root / questions, {"task_type": "Open-Ended", "questions": [
        {"image_id": 262148, "question": "Where is he looking?", "question_id": 262148000},
        {"image_id": 42, "question": "How many?", "question_id": 42001}]})
    _json(root / annotations, {"annotations": [
        {"question_id": 42001, "image_id": 42, "answer_type": "number",
         "answers": [{"answer": "2", "answer_confidence": "yes", "answer_id": i} for i in range(10)]},
        {"question_id": 262148000, "image_id": 262148, "answer_type": "other",
         "answers": [{"answer": "down", "answer_confidence": "yes", "answer_id": i} for i in range(10)]}]})
    _image(root / "val2014" / "COCO_val2014_000000262148.jpg")
    _image(root / "val2014" / "COCO_val2014_000000000042.jpg")


def write_refcoco(folder: Path, refs_name: str = "refs(unc).p", images: Path | None = None) -> None:
    refs = [
        {"ref_id": 5, "ann_id": 11, "image_id": 7, "split": "val", "category_id": 1,
         "sentences": [{"raw": "the lady in blue", "sent": "the lady in blue", "sent_id": 0},
                       {"raw": "left woman", "sent": "left woman", "sent_id": 1}]},
        {"ref_id": 6, "ann_id": 12, "image_id": 7, "split": "testA", "sentences": [{"raw": "the man"}]},
        {"ref_id": 8, "ann_id": 13, "image_id": 9, "split": "test", "sentences": [{"raw": "a long sentence"}]},
    ]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / refs_name).write_bytes(pickle.dumps(refs, protocol=2))
    _json(folder / "instances.json", {
        "images": [{"id": 7, "file_name": "COCO_train2014_000000000007.jpg", "width": 200, "height": 100},
                   {"id": 9, "file_name": "COCO_train2014_000000000009.jpg", "width": 50, "height": 50}],
        "annotations": [{"id": 11, "image_id": 7, "bbox": [20, 10, 80, 50]},
                        {"id": 12, "image_id": 7, "bbox": [0.5, 0.5, 10, 10]},
                        {"id": 13, "image_id": 9, "bbox": [1, 2, 3, 4]}]})
    for image_id, size in ((7, (200, 100)), (9, (50, 50))):
        _image((images or folder / "train2014") / f"COCO_train2014_{image_id:012d}.jpg", size)


def write_pope(root: Path) -> None:
    for category, negative in (("random", "zebra"), ("popular", "chair"), ("adversarial", "fork")):
        _jsonl(root / f"coco_pope_{category}.json", [
            {"question_id": 0, "image": "COCO_val2014_000000548882.jpg", "image_id": 548882,
             "text": "Is there a dining table in the image?", "label": "yes"},
            {"question_id": 1, "image": "COCO_val2014_000000548882.jpg", "image_id": 548882,
             "text": f"Is there a {negative} in the image?", "label": "no"}])
    _image(root / "val2014" / "COCO_val2014_000000548882.jpg")


# --- loaders ---------------------------------------------------------------------------------------------------------

def test_gqa_loader(tmp_path):
    write_gqa(tmp_path)
    samples = _load("gqa", tmp_path)
    assert [s.id for s in samples] == ["201", "202"]
    assert samples[0].prompt == VQA + "Is the sky blue?"
    assert samples[1].answers == ("the table",) and samples[1].max_new_tokens == 10
    assert samples[0].images == (str((tmp_path / "images" / "n1.jpg").resolve()),)
    assert samples[0].meta == {"structural": "verify", "semantic": "attr"}
    assert [s.id for s in _load("gqa", tmp_path, limit=1)] == ["201"]
    custom = _load("gqa", tmp_path, prompt="Q: {question} A:")
    assert custom[1].prompt == "Q: What is on the table? A:"
    compat = _load("gqa", tmp_path, prompt_style="tinygpt-v")
    assert compat[0].prompt == samples[0].prompt and compat[0].max_new_tokens == 20


def test_vsr_loader(tmp_path):
    write_vsr(tmp_path)
    samples = _load("vsr", tmp_path)
    assert [s.id for s in samples] == ["0", "1"]
    assert samples[0].prompt == "[vqa] Based on the image, is this statement true or false? The car is behind the cat."
    assert [(s.label, s.answers) for s in samples] == [(1, ("true",)), (0, ("false",))]
    assert samples[1].meta == {"relation": "under"}
    assert samples[1].images[0].endswith("images/000000199940.jpg")
    assert _load("vsr", tmp_path, prompt="{question} True or false?")[0].prompt == \
        "The car is behind the cat. True or false?"


@pytest.mark.parametrize("problems_json", [True, False])
def test_iconqa_loader(tmp_path, problems_json):
    write_iconqa(tmp_path / "iconqa_data", problems_json)
    samples = _load("iconqa", tmp_path)                      # the folder holding iconqa_data/ works too
    assert [s.id for s in samples] == (["37", "12"] if problems_json else ["12", "37"])
    first = next(s for s in samples if s.id == "37")
    assert first.choices == ("circle", "square") and first.label == 1 and first.answers == ("square",)
    assert first.prompt == VQA + "Which shape is this? Options: circle, square."
    assert first.images[0].endswith("iconqa/val/choose_txt/37/image.png") and first.meta == {"grade": "prek"}
    original = _load("iconqa", tmp_path, prompt_style="tinygpt-v")
    assert {s.prompt for s in original} == {"Which shape is this?", "How many dots?"}


@pytest.mark.parametrize("annotations", ["Annotations/val.json", "val.json"])
def test_vizwiz_loader(tmp_path, annotations):
    write_vizwiz(tmp_path, annotations)
    samples = _load("vizwiz", tmp_path)
    assert [s.id for s in samples] == ["VizWiz_val_00000000", "VizWiz_val_00000001"]
    assert samples[0].answers == ("basil",) * 7 + ("spice",) * 3
    assert samples[0].prompt.startswith("[vqa] The question is 'What is this?' Based on the image")
    assert samples[1].meta == {"answer_type": "unanswerable", "answerable": 0}


def test_hateful_memes_loader(tmp_path):
    write_hateful_memes(tmp_path)
    samples = _load("hateful_memes", tmp_path)
    assert [(s.id, s.label, s.choices) for s in samples] == [("42953", 0, ("yes", "no")), ("8291", 1, ("yes", "no"))]
    assert samples[1].images[0].endswith("img/08291.png")
    assert samples[0].prompt == ("[vqa] This is an image with the text 'a nice day' written on it. "
                                 "Is this image hateful? Answer yes or no.")
    assert _load("hateful_memes", tmp_path, prompt_style="tinygpt-v")[0].prompt == \
        "This is an image writting 'a nice day'. Is this image hateful? Answer yes or no. Answer:"
    moved = tmp_path / "elsewhere"
    _image(moved / "42953.png")
    assert _load("hateful_memes", tmp_path, images=str(moved), limit=1)[0].images[0] == \
        str((moved / "42953.png").resolve())


@pytest.mark.parametrize("name", ["vqav2", "okvqa"])
def test_vqa_loaders(tmp_path, name):
    write_vqa(tmp_path, name)
    samples = _load(name, tmp_path)
    assert [s.id for s in samples] == ["262148000", "42001"]
    assert samples[0].answers == ("down",) * 10 and samples[1].meta == {"answer_type": "number"}
    assert samples[1].images[0].endswith("val2014/COCO_val2014_000000000042.jpg")
    assert samples[0].prompt == VQA + "Where is he looking?"


def test_refcoco_loader_boxes_in_pixels(tmp_path):
    write_refcoco(tmp_path)
    samples = _load("refcoco", tmp_path)
    assert [s.id for s in samples] == ["5_0", "5_1"]
    first = samples[0]
    assert first.box == (20.0, 10.0, 100.0, 60.0) and first.image_size == (200, 100)   # [x, y, w, h] -> x1y1x2y2
    assert first.prompt == "[refer] give me the location of the lady in blue"
    assert first.answers == ("{<10><10><50><60>}",) and first.max_new_tokens == 20
    assert first.images[0].endswith("train2014/COCO_train2014_000000000007.jpg")
    assert [s.id for s in _load("refcoco", tmp_path, "testA")] == ["6_0"]


def test_refcocog_reads_umd_under_an_annotation_root(tmp_path):
    images = tmp_path / "coco" / "train2014"
    write_refcoco(tmp_path / "ann" / "refcocog", "refs(umd).p", images=images)
    samples = _load("refcocog", tmp_path / "ann", "test", images=str(images))
    assert [(s.id, s.box, s.image_size) for s in samples] == [("8_0", (1.0, 2.0, 4.0, 6.0), (50, 50))]
    assert get_benchmark("refcocog").splits == ("val", "test")


def test_pope_loader(tmp_path):
    write_pope(tmp_path)
    everything = _load("pope", tmp_path)
    assert [s.id for s in everything] == ["random/0", "random/1", "popular/0", "popular/1", "adversarial/0",
                                          "adversarial/1"]
    assert [s.label for s in everything] == [1, 0] * 3
    adversarial = _load("pope", tmp_path, "adversarial")
    assert [s.id for s in adversarial] == ["0", "1"]
    assert adversarial[1].prompt == VQA + "Is there a fork in the image?" and adversarial[1].meta == {
        "category": "adversarial"}


# --- errors ----------------------------------------------------------------------------------------------------------

WRITERS = {"gqa": write_gqa, "vsr": write_vsr, "iconqa": write_iconqa, "vizwiz": write_vizwiz,
           "hateful_memes": write_hateful_memes, "vqav2": lambda r: write_vqa(r, "vqav2"),
           "okvqa": lambda r: write_vqa(r, "okvqa"), "refcoco": write_refcoco, "pope": write_pope}

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
    _jsonl(path, content) if lines else _json(path, content)


@pytest.mark.parametrize("name", sorted(WRITERS))
def test_missing_file_names_the_file(tmp_path, name):
    WRITERS[name](tmp_path)
    broken = "pid_splits.json" if name == "iconqa" else BREAKS[name][0]   # without problems.json: data.json files
    (tmp_path / broken).unlink()
    with pytest.raises(UserError, match=r"does not exist") as error:
        _load(name, tmp_path)
    assert str(tmp_path / broken) in str(error.value)


@pytest.mark.parametrize("name", sorted(WRITERS))
def test_record_missing_a_field_names_file_and_field(tmp_path, name):
    WRITERS[name](tmp_path)
    broken, change, field = BREAKS[name]
    _rewrite(tmp_path / broken, change)
    with pytest.raises(UserError) as error:
        _load(name, tmp_path)
    message = str(error.value)
    assert str(tmp_path / broken) in message and repr(field) in message, message


def test_refcoco_pickle_with_code_is_refused(tmp_path):
    write_refcoco(tmp_path)
    (tmp_path / "refs(unc).p").write_bytes(pickle.dumps([{"ref_id": 1, "split": "val", "x": Path("a")}]))
    with pytest.raises(UserError, match=r"refs\(unc\)\.p: refused global"):
        _load("refcoco", tmp_path)


def test_missing_image_and_bad_options(tmp_path):
    write_gqa(tmp_path)
    (tmp_path / "images" / "n2.jpg").unlink()
    assert len(_load("gqa", tmp_path, limit=1)) == 1                       # the limit stops before the missing one
    with pytest.raises(UserError, match=r"question 202: image .*n2\.jpg does not exist"):
        _load("gqa", tmp_path)
    with pytest.raises(UserError, match=r"options\.promt: unknown option .*did you mean 'prompt'"):
        _load("gqa", tmp_path, promt="{question}")
    with pytest.raises(UserError, match=r"options\.prompt: unknown field \{caption\}"):
        _load("gqa", tmp_path, prompt="{caption}")
    with pytest.raises(UserError, match=r"options\.prompt_style: expected one of official, tinygpt-v"):
        _load("gqa", tmp_path, prompt_style="llava")
    with pytest.raises(UserError, match=r"options\.limit: expected a whole number >= 1"):
        _load("gqa", tmp_path, limit=0)
    with pytest.raises(UserError, match=r"options\.images: image directory .* does not exist"):
        _load("gqa", tmp_path, images=str(tmp_path / "nowhere"))


def test_vizwiz_leaving_the_image_folder_is_refused(tmp_path):
    write_vizwiz(tmp_path)
    _rewrite(tmp_path / "Annotations" / "val.json", lambda c: c[0].update(image="../secret.jpg"))
    with pytest.raises(UserError, match=r"record 0: field image: .*'\.\.'"):
        _load("vizwiz", tmp_path)


# --- scores on hand-made predictions ---------------------------------------------------------------------------------

def test_gqa_score(tmp_path):
    write_gqa(tmp_path)
    samples = _load("gqa", tmp_path)
    texts = ["Yes.", "the table is red"]
    official = _score("gqa", samples, texts)
    assert official["value"] == 0.5 and official["n"] == 2           # "yes" == "yes"; "table is red" != "table"
    assert official["by_structural"] == {"query": 0.0, "verify": 1.0}
    assert _score("gqa", samples, texts, scoring="tinygpt-v-compat")["value"] == 1.0   # "the table" is a substring


def test_vsr_score(tmp_path):
    write_vsr(tmp_path)
    one = _load("vsr", tmp_path)
    samples = [replace(one[i % 2], id=str(i)) for i in range(5)]   # labels 1 0 1 0 1
    texts = ["True.", "False, it is not.", "no", "true or false", "I think so"]
    official = _score("vsr", samples, texts)
    # parsed: T, F, F, T, None -> right, right, wrong, wrong, wrong; TP 1, FP 1, FN 2 (the unparsed "true" item)
    assert official["value"] == pytest.approx(2 / 5) and official["unparsed"] == pytest.approx(1 / 5)
    assert official["precision"] == pytest.approx(1 / 2) and official["recall"] == pytest.approx(1 / 3)
    assert official["f1"] == pytest.approx(0.4) and official["yes_ratio"] == pytest.approx(2 / 5)
    compat = _score("vsr", samples, texts, scoring="tinygpt-v-compat")
    assert compat["value"] == pytest.approx(3 / 5)        # "true or false" contains the label "false"


def test_iconqa_score(tmp_path):
    write_iconqa(tmp_path)
    samples = _load("iconqa", tmp_path)                   # 37: label 1 of 2; 12: label 0 of 3
    official = _score("iconqa", samples, ["it is a square", "(c)"], [(-2.0, -1.0), (-3.0, -0.5, -0.1)])
    assert official["metric"] == "accuracy_likelihood" and official["value"] == 0.5
    assert official["accuracy_generation"] == 0.5 and official["generation_unparsed"] == 0.0
    without_scores = _score("iconqa", samples, ["square", "nothing"])
    assert without_scores["metric"] == "accuracy_generation" and without_scores["value"] == 0.5
    assert without_scores["generation_unparsed"] == 0.5 and without_scores["accuracy_likelihood"] is None
    compat = _score("iconqa", samples, ["x", "y"], scoring="tinygpt-v-compat")
    assert compat["value"] == 0.5 and compat["compat_unscorable"] == 0    # right only where the answer index is 0
    piped = [replace(samples[1], choices=("a|b", "c", "d"))]
    assert _score("iconqa", piped, ["a"], scoring="tinygpt-v-compat")["compat_unscorable"] == 1


def test_vizwiz_score(tmp_path):
    write_vizwiz(tmp_path)
    samples = _load("vizwiz", tmp_path)                   # 7 "basil" + 3 "spice"; 10 "unanswerable"
    official = _score("vizwiz", samples, ["Spice.", "unanswerable"])
    assert official["value"] == pytest.approx((0.9 + 1.0) / 2)   # 3 of 10 match: 0.9
    assert official["answerable"] == pytest.approx(0.9) and official["unanswerable"] == 1.0
    assert official["by_answer_type"] == {"other": pytest.approx(0.9), "unanswerable": 1.0}
    assert _score("vizwiz", samples, ["", ""])["value"] == 0.0
    assert _score("vizwiz", samples, ["", ""], scoring="tinygpt-v-compat")["value"] == 1.0   # "" in every answer


def test_hateful_memes_score(tmp_path):
    write_hateful_memes(tmp_path)
    two = _load("hateful_memes", tmp_path)                # labels 0, 1
    samples = [replace(two[i % 2], id=str(i), label=label) for i, label in enumerate([1, 0, 1, 0])]
    p_yes = [0.9, 0.2, 0.4, 0.6]
    scores = [(math.log(p), math.log(1 - p)) for p in p_yes]
    texts = ["Yes", "no.", "nothing hateful, yes", "yes and no"]
    official = _score("hateful_memes", samples, texts, scores)
    assert official["metric"] == "auroc" and official["value"] == pytest.approx(0.75)   # 3 of 4 pairs ordered
    assert official["accuracy_likelihood"] == 0.5 and official["accuracy"] == 0.5
    assert official["unparsed"] == 0.25 and official["yes_ratio"] == 0.5
    compat = _score("hateful_memes", samples, texts, scoring="tinygpt-v-compat")
    assert compat["value"] == 0.75                         # "yes" anywhere: 1, 0, 1, 1 against 1, 0, 1, 0


@pytest.mark.parametrize("name", ["vqav2", "okvqa"])
def test_vqa_score(tmp_path, name):
    write_vqa(tmp_path, name)
    samples = _load(name, tmp_path)
    official = _score(name, samples, ["Down.", "two"])
    assert official["value"] == 1.0 and official["by_answer_type"] == {"number": 1.0, "other": 1.0}
    assert _score(name, samples, ["up", "two"])["value"] == 0.5
    compat = _score(name, samples, ["up", "two"], scoring="tinygpt-v-compat")
    assert compat["value"] == 0.5 and compat["compat"] == "same as official"


def test_refcoco_score(tmp_path):
    write_refcoco(tmp_path)
    one = _load("refcoco", tmp_path)[0]                   # 200 x 100 image, box (20, 10, 100, 60)
    samples = [replace(one, id=str(i)) for i in range(4)]
    texts = ["{<10><10><50><60>}",                        # the box itself: IoU 1
             "no idea",                                   # no box
             "{<10><10><30><60>}",                        # (20, 10, 60, 60): IoU exactly 0.5
             "it is at {<10><10><50><60>}"]               # a box, but not at the start
    official = _score("refcoco", samples, texts)
    assert official["value"] == 0.75 and official["mean_iou"] == pytest.approx(0.625)
    assert official["unparsed"] == 0.25
    compat = _score("refcoco", samples, texts, scoring="tinygpt-v-compat")
    assert compat["value"] == 0.5                         # must start with the box; +1-pixel IoU 0.506 > 0.5


def test_pope_score(tmp_path):
    write_pope(tmp_path)
    samples = _load("pope", tmp_path)                     # per category: yes item, no item
    texts = ["Yes", "No", "yes", "yes", "maybe", "no"]
    official = _score("pope", samples, texts)
    by = official["by_category"]
    assert by["random"]["f1"] == 1.0 and by["random"]["yes_ratio"] == 0.5
    assert by["popular"]["accuracy"] == 0.5 and by["popular"]["precision"] == 0.5
    assert by["popular"]["f1"] == pytest.approx(2 / 3) and by["popular"]["yes_ratio"] == 1.0
    assert by["adversarial"]["f1"] == 0.0 and by["adversarial"]["unparsed"] == 0.5
    assert official["value"] == pytest.approx((1 + 2 / 3 + 0) / 3) and official["accuracy"] == pytest.approx(2 / 3)
    single = _score("pope", _load("pope", tmp_path, "popular"), ["yes", "yes"])
    assert single["value"] == pytest.approx(2 / 3) and list(single["by_category"]) == ["popular"]
    assert _score("pope", samples, texts, scoring="tinygpt-v-compat")["compat"] == "same as official"


def test_published_figures_name_tinygpt_v_first_where_reported():
    reported = {"gqa": 33.6, "vsr": 53.2, "iconqa": 43.3, "vizwiz": 24.8, "hateful_memes": 53.2}
    for name, figure in reported.items():
        paper = get_benchmark(name).paper
        assert next(iter(paper)).startswith("TinyGPT-V") and next(iter(paper.values())) == figure


# --- the synthetic files in every layout -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic") / "benchmarks"
    counts = write_benchmark_files(out, seed=0, per_benchmark=4)
    return out, counts


def _perfect(sample) -> Prediction:
    """The right answer, and the highest score on the right choice."""
    if sample.choices == ("yes", "no"):
        right = 0 if sample.label else 1
        return Prediction(sample.id, sample.choices[right], tuple(0.0 if i == right else -5.0 for i in range(2)))
    scores = tuple(0.0 if i == sample.label else -5.0 for i in range(len(sample.choices))) or None
    return Prediction(sample.id, sample.answers[0], scores)


def test_synthetic_files_load_and_score_perfectly(synthetic):
    out, counts = synthetic
    assert set(counts) == set(NAMES) == set(names()) - {"shapes", "multi_image"}
    assert json.loads((out / "manifest.json").read_text())["counts"] == counts
    for name in NAMES:
        bench = get_benchmark(name)
        samples = [s for split in bench.splits if name != "pope" or split == "all"
                   for s in _load_if_present(bench, out / name, split)]
        assert len(samples) == counts[name], name
        assert all(Path(image).is_file() for s in samples for image in s.images)
        default = bench.load(out / name, bench.splits[0], {})
        result = bench.score(default, [_perfect(s) for s in default], "official")
        assert result["value"] == 1.0, (name, result)


def _load_if_present(bench, root, split):
    try:
        return bench.load(root, split, {})
    except UserError as error:
        assert "does not exist" in str(error)
        return []


def test_synthetic_contents(synthetic):
    out, counts = synthetic
    assert counts["gqa"] == counts["vizwiz"] == counts["hateful_memes"] == 4
    memes = [json.loads(line) for line in (out / "hateful_memes" / "dev.jsonl").read_text().splitlines()]
    assert [m["label"] for m in memes] == [1, 0, 1, 0] and all(m["text"].startswith("is there a") for m in memes)
    vizwiz = json.loads((out / "vizwiz" / "Annotations" / "val.json").read_text())
    unanswerable = [r for r in vizwiz if r["answerable"] == 0]
    assert len(unanswerable) == 1 and [a["answer"] for a in unanswerable[0]["answers"]].count("unanswerable") == 8
    assert all(len(r["answers"]) == 10 for r in vizwiz)
    vsr = [json.loads(line) for line in (out / "vsr" / "test.jsonl").read_text().splitlines()]
    assert [r["label"] for r in vsr] == [1, 0, 1, 0]
    for category in ("random", "popular", "adversarial"):
        pope = _load("pope", out / "pope", category)
        assert sum(s.label for s in pope) * 2 == len(pope)            # as many no as yes
    refcoco = get_benchmark("refcoco")
    assert all(refcoco.load(out / "refcoco", split, {}) for split in refcoco.splits)


def test_synthetic_scenes_are_held_out(synthetic):
    seen = benchmark_files.training_signatures(0, 224)
    plan = benchmark_files.Plan(0, "gqa", 4, 224, seen, False)
    assert len(seen) > 6000
    assert not {s.signature() for s in plan.scenes()} & seen
    forced = benchmark_files.Plan(0, "gqa", 2, 224, frozenset({plan.scenes(1)[0].signature()}), False)
    assert forced.scenes()[0].signature() != plan.scenes(1)[0].signature()   # a seen scene is skipped


def test_synthetic_rewrite_and_refusal(tmp_path, capsys):
    out = tmp_path / "benchmarks"
    assert benchmark_files.main(["--out", str(out), "--per-benchmark", "1"]) == 0
    assert "pope" in capsys.readouterr().out
    first = (out / "gqa" / "testdev_balanced_questions.json").read_bytes()
    assert write_benchmark_files(out, per_benchmark=1)["gqa"] == 1                 # an earlier output is replaced
    assert (out / "gqa" / "testdev_balanced_questions.json").read_bytes() == first  # same seed, same files
    mine = tmp_path / "mine"
    (mine / "keep.txt").parent.mkdir()
    (mine / "keep.txt").write_text("x")
    with pytest.raises(UserError, match="was not written by"):
        write_benchmark_files(mine, per_benchmark=1)
    assert benchmark_files.main(["--out", str(tmp_path / "x"), "--per-benchmark", "0"]) == 2
    assert "--per-benchmark: expected a whole number >= 1" in capsys.readouterr().err
