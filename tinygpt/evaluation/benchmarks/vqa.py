"""VQAv2 and OK-VQA (val): open questions about COCO images, ten human answers each, the official VQA accuracy.

Layout (the official question and annotation files of visualqa.org and okvqa.allenai.org, COCO 2014 images)::

    root/v2_OpenEnded_mscoco_val2014_questions.json   (OK-VQA: OpenEnded_mscoco_val2014_questions.json)
        {"questions": [{"image_id": 262148, "question": "Where is he looking?", "question_id": 262148000}, ...]}
    root/v2_mscoco_val2014_annotations.json           (OK-VQA: mscoco_val2014_annotations.json)
        {"annotations": [{"question_id": 262148000, "image_id": 262148, "answer_type": "other",
                          "question_type": "where is he", "answers": [{"answer": "down", "answer_confidence": "yes",
                          "answer_id": 1}, ... ten], "multiple_choice_answer": "down"}, ...]}
    root/val2014/COCO_val2014_000000262148.jpg

Splits: ``val`` (default), ``train`` (``train2014`` in every name; test-dev has no public answers, so the published
VQAv2 test-dev figures below are not directly comparable with a val run). Sample id: the question id.

Prompt fields: ``{question}``. Official and ``tinygpt-v``: ``[vqa] Based on the image, respond to this question with
a short answer: {question}`` (MiniGPT-v2's VQA prompt; TinyGPT-V did not report these two). Up to 10 new tokens.

Scoring: official = the VQA accuracy (`metrics.vqa_accuracy`), with accuracy per ``answer_type`` (yes/no, number,
other). tinygpt-v-compat is the same as official (TinyGPT-V's OK-VQA scorer was the official VQAEval); the result
says so in ``compat``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from ...data.formats.base import read_json
from ...errors import UserError
from ..benchmark import Benchmark, Prediction, Sample
from ..metrics import mean, vqa_accuracy
from .common import (SAME_AS_OFFICIAL, VQA_PROMPT, aligned, answer_texts, breakdown, check_scoring, fill, image_dir,
                     image_file, need, parse_options, published, take, template, text_of)

SPLITS = ("val", "train")
MAX_NEW_TOKENS = 10
FILES = {  # benchmark -> (questions, annotations) file name patterns
    "vqav2": ("v2_OpenEnded_mscoco_{split}2014_questions.json", "v2_mscoco_{split}2014_annotations.json"),
    "okvqa": ("OpenEnded_mscoco_{split}2014_questions.json", "mscoco_{split}2014_annotations.json"),
}


def _list(path: Path, key: str) -> list:
    content = read_json(path, f"VQA {key} file")
    if not isinstance(content, dict) or not isinstance(content.get(key), list):
        raise UserError(f"{path}: missing field {key!r} (a list)")
    return content[key]


def _data_files(name: str):
    def data_files(root: Path, split: str, options: dict) -> list[Path]:
        """The questions file and the annotations file `load` reads."""
        return [Path(root) / pattern.format(split=split) for pattern in FILES[name]]

    return data_files


def _loader(name: str):
    def load(root: Path, split: str, options: dict) -> list[Sample]:
        opts = parse_options(name, options)
        root = Path(root)
        questions_path, annotations_path = _data_files(name)(root, split, options)
        prompt = template(opts, VQA_PROMPT, VQA_PROMPT, ("question",))
        questions = _list(questions_path, "questions")
        annotations = {}
        for index, record in enumerate(_list(annotations_path, "annotations")):
            annotations[need(record, "question_id", f"{annotations_path} annotation {index}", int)] = record
        images = image_dir(root, opts, f"{split}2014")

        def samples() -> Iterator[Sample]:
            for index, record in enumerate(questions):
                where = f"{questions_path} question {index}"
                qid = need(record, "question_id", where, int)
                image_id = need(record, "image_id", where, int)
                annotation = annotations.get(qid)
                if annotation is None:
                    raise UserError(f"{annotations_path}: missing the annotation of question_id {qid}")
                answer_type = annotation.get("answer_type") if isinstance(annotation.get("answer_type"), str) else None
                yield Sample(id=str(qid),
                             images=(image_file(images, f"COCO_{split}2014_{image_id:012d}.jpg", where),),
                             prompt=fill(prompt, question=need(record, "question", where)),
                             max_new_tokens=MAX_NEW_TOKENS,
                             answers=answer_texts(annotation, f"{annotations_path} question_id {qid}"),
                             meta={"answer_type": answer_type})

        return take(samples(), opts)

    return load


def score(samples: list[Sample], predictions: list[Prediction], scoring: str) -> dict:
    check_scoring(scoring)
    values = [vqa_accuracy(text_of(p), s.answers) for s, p in zip(samples, aligned(samples, predictions))]
    result = {"metric": "vqa_accuracy", "value": mean(values), "n": len(samples),
              "by_answer_type": breakdown(values, [s.meta.get("answer_type") for s in samples])}
    if scoring == "tinygpt-v-compat":
        result["compat"] = SAME_AS_OFFICIAL
    return result


_LAYOUT = ('root/{q} {{"questions": [{{"image_id": 262148, "question": "Where is he looking?", "question_id": '
           '262148000}}]}} + root/{a} {{"annotations": [{{"question_id": 262148000, "answer_type": "other", '
           '"answers": [{{"answer": "down"}}, ...ten]}}]}} + root/val2014/COCO_val2014_000000262148.jpg')

BENCHMARKS = {
    name: Benchmark(
        name=name, title=title, splits=SPLITS, metric="vqa_accuracy", load=_loader(name), score=score,
        layout=_LAYOUT.format(q=FILES[name][0].format(split="val"), a=FILES[name][1].format(split="val")),
        paper=published(name))
    for name, title in (("okvqa", "OK-VQA (val)"), ("vqav2", "VQAv2 (val)"))
}
DATA_FILES = {name: _data_files(name) for name in BENCHMARKS}
