"""The official layouts of the evaluation benchmarks, written by hand on a few samples (no real dataset needed),
and the calls that load and score them; shared by test_eval_benchmarks.py and test_eval_benchmark_scores.py."""

import json
import pickle
from pathlib import Path

from PIL import Image

from tinygpt.evaluation.benchmark import Prediction
from tinygpt.evaluation.benchmarks import get_benchmark

VQA = "[vqa] Based on the image, respond to this question with a short answer: "


def image_file(path: Path, size=(8, 6)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (200, 30, 30)).save(path)
    return path


def json_file(path: Path, content) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content), encoding="utf-8")
    return path


def jsonl_file(path: Path, records) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def load_bench(name, root, split=None, **options):
    bench = get_benchmark(name)
    return bench.load(Path(root), split or bench.splits[0], options)


def score_bench(name, samples, texts=None, scores=None, scoring="official"):
    texts = texts or [None] * len(samples)
    scores = scores or [None] * len(samples)
    predictions = [Prediction(s.id, t, tuple(c) if c is not None else None) for s, t, c in zip(samples, texts, scores)]
    return get_benchmark(name).score(samples, predictions, scoring)


# --- the official layouts, written by hand ---------------------------------------------------------------------------

def write_gqa(root: Path) -> None:
    json_file(root / "testdev_balanced_questions.json", {
        "201": {"imageId": "n1", "question": "Is the sky blue?", "answer": "yes", "fullAnswer": "Yes, it is.",
                "types": {"structural": "verify", "semantic": "attr", "detailed": "verifyAttr"}},
        "202": {"imageId": "n2", "question": "What is on the table?", "answer": "the table",
                "types": {"structural": "query", "semantic": "rel"}},
    })
    image_file(root / "images" / "n1.jpg")
    image_file(root / "images" / "n2.jpg")


def write_vsr(root: Path) -> None:
    jsonl_file(root / "test.jsonl", [
        {"image": "000000017697.jpg", "image_link": "http://x", "caption": "The car is behind the cat.", "label": 1,
         "relation": "behind", "subj": "car", "obj": "cat"},
        {"image": "000000199940.jpg", "caption": "The cat is under the bag.", "label": 0, "relation": "under"},
    ])
    image_file(root / "images" / "000000017697.jpg")
    image_file(root / "images" / "000000199940.jpg")


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
        image_file(folder / "image.png")
        json_file(folder / "data.json", ICONQA_PROBLEMS[pid])
    if problems_json:
        json_file(root / "problems.json", ICONQA_PROBLEMS)
        json_file(root / "pid_splits.json", {"choose_txt_val": ["37", "12"], "choose_txt_test": [],
                                         "fill_in_blank_val": ["99"]})


def write_vizwiz(root: Path, annotations: str = "Annotations/val.json") -> None:
    json_file(root / annotations, [
        {"image": "VizWiz_val_00000000.jpg", "question": "What is this?", "answer_type": "other", "answerable": 1,
         "answers": [{"answer": "basil", "answer_confidence": "yes"}] * 7
         + [{"answer": "spice", "answer_confidence": "maybe"}] * 3},
        {"image": "VizWiz_val_00000001.jpg", "question": "What color?", "answer_type": "unanswerable",
         "answerable": 0, "answers": [{"answer": "unanswerable", "answer_confidence": "yes"}] * 10},
    ])
    image_file(root / "val" / "VizWiz_val_00000000.jpg")
    image_file(root / "val" / "VizWiz_val_00000001.jpg")


def write_hateful_memes(root: Path) -> None:
    jsonl_file(root / "dev.jsonl", [{"id": 42953, "img": "img/42953.png", "label": 0, "text": "a nice day"},
                                {"id": 8291, "img": "img/08291.png", "label": 1, "text": "a mean text"}])
    image_file(root / "img" / "42953.png")
    image_file(root / "img" / "08291.png")


VQA_FILES = {"vqav2": ("v2_OpenEnded_mscoco_val2014_questions.json", "v2_mscoco_val2014_annotations.json"),
             "okvqa": ("OpenEnded_mscoco_val2014_questions.json", "mscoco_val2014_annotations.json")}


def write_vqa(root: Path, name: str) -> None:
    questions, annotations = VQA_FILES[name]
    json_file(root / questions, {"task_type": "Open-Ended", "questions": [
        {"image_id": 262148, "question": "Where is he looking?", "question_id": 262148000},
        {"image_id": 42, "question": "How many?", "question_id": 42001}]})
    json_file(root / annotations, {"annotations": [
        {"question_id": 42001, "image_id": 42, "answer_type": "number",
         "answers": [{"answer": "2", "answer_confidence": "yes", "answer_id": i} for i in range(10)]},
        {"question_id": 262148000, "image_id": 262148, "answer_type": "other",
         "answers": [{"answer": "down", "answer_confidence": "yes", "answer_id": i} for i in range(10)]}]})
    image_file(root / "val2014" / "COCO_val2014_000000262148.jpg")
    image_file(root / "val2014" / "COCO_val2014_000000000042.jpg")


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
    json_file(folder / "instances.json", {
        "images": [{"id": 7, "file_name": "COCO_train2014_000000000007.jpg", "width": 200, "height": 100},
                   {"id": 9, "file_name": "COCO_train2014_000000000009.jpg", "width": 50, "height": 50}],
        "annotations": [{"id": 11, "image_id": 7, "bbox": [20, 10, 80, 50]},
                        {"id": 12, "image_id": 7, "bbox": [0.5, 0.5, 10, 10]},
                        {"id": 13, "image_id": 9, "bbox": [1, 2, 3, 4]}]})
    for image_id, size in ((7, (200, 100)), (9, (50, 50))):
        image_file((images or folder / "train2014") / f"COCO_train2014_{image_id:012d}.jpg", size)


def write_pope(root: Path) -> None:
    for category, negative in (("random", "zebra"), ("popular", "chair"), ("adversarial", "fork")):
        jsonl_file(root / f"coco_pope_{category}.json", [
            {"question_id": 0, "image": "COCO_val2014_000000548882.jpg", "image_id": 548882,
             "text": "Is there a dining table in the image?", "label": "yes"},
            {"question_id": 1, "image": "COCO_val2014_000000548882.jpg", "image_id": 548882,
             "text": f"Is there a {negative} in the image?", "label": "no"}])
    image_file(root / "val2014" / "COCO_val2014_000000548882.jpg")


# --- loaders ---------------------------------------------------------------------------------------------------------


WRITERS = {"gqa": write_gqa, "vsr": write_vsr, "iconqa": write_iconqa, "vizwiz": write_vizwiz,
           "hateful_memes": write_hateful_memes, "vqav2": lambda r: write_vqa(r, "vqav2"),
           "okvqa": lambda r: write_vqa(r, "okvqa"), "refcoco": write_refcoco, "pope": write_pope}
