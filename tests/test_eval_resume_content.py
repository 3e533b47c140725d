"""Resuming `python evaluate.py` checks the benchmark's CONTENT, not only its path: annotation files rewritten at the
same path (other questions, other answers) refuse the saved predictions (rerun with --restart), an unchanged tree
(even touched) still resumes, and a predictions file from before the content check says so clearly. Everything runs on
a stand-in engine over a few POPE records written in tmp_path; every benchmark's ``data_files`` is checked against
the files its loader really opens, on the hand-written layouts of tests/benchmark_layouts.py."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

from benchmark_layouts import WRITERS, image_file, json_file, write_iconqa, write_pope, write_refcoco, write_vizwiz
from tinygpt.errors import UserError
from tinygpt.evaluation.benchmarks import data_files, get_benchmark, names
from tinygpt.evaluation.config import load_eval_config
from tinygpt.evaluation import resume
from tinygpt.evaluation.runner import PREDICTIONS, run_evaluation

N = 6


class _Engine:
    """Answers "yes" when the question names a square, else "no"; counts what it was asked."""

    name = "stand-in"
    backend = SimpleNamespace(prompt=SimpleNamespace(template="[INST] {} [/INST]", end_sym=""))
    stop_strings = ()

    def __init__(self):
        self.asked = 0

    def chat_batch(self, conversations, settings=None):
        self.asked += len(conversations)
        return ["yes" if "square" in c.turns[-1].user else "no" for c in conversations]


def _records(shape_when_yes: str = "square", n: int = N) -> str:
    return "".join(json.dumps({"question_id": i, "image": "COCO_val2014_000000000001.jpg", "image_id": 1,
                               "text": f"Is there a {shape_when_yes if i % 2 else 'circle'} in the image?",
                               "label": "yes" if i % 2 else "no"}) + "\n" for i in range(n))


def _setup(tmp_path: Path) -> tuple[Path, object]:
    """A POPE root (annotation coco_pope_random.json), a model directory, and the eval config over them."""
    root = tmp_path / "pope"
    (root / "val2014").mkdir(parents=True)
    Image.new("RGB", (8, 8), "red").save(root / "val2014" / "COCO_val2014_000000000001.jpg")
    (root / "coco_pope_random.json").write_text(_records())
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "tinygptv", "base_model": None}))
    (model / "model.safetensors").write_bytes(b"w" * 64)
    path = tmp_path / "pope.yaml"
    path.write_text(f"model: {{backend: torch, path: {model}, device: cpu}}\n"
                    f"benchmark: {{name: pope, root: {root}, split: random}}\n"
                    f"run: {{out_dir: {tmp_path / 'out'}, batch_size: 2}}\n")
    return root / "coco_pope_random.json", load_eval_config(path, check_model=False)


def _rewrite(path: Path, text: str) -> None:
    """The file written again at the same path (a new version of the annotations): new content, a later mtime."""
    before = path.stat().st_mtime_ns
    path.write_text(text)
    os.utime(path, ns=(before + 10**9, before + 10**9))


def _limited(cfg, limit: int):
    return dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, limit=limit))


def _header(tmp_path: Path) -> dict:
    return json.loads((tmp_path / "out" / PREDICTIONS).read_text().splitlines()[0])["fingerprint"]


# ---- 1. the annotation file rewritten at the same path -------------------------------------------------------------

@pytest.mark.parametrize("change", ["questions", "answers"])
def test_annotations_rewritten_at_the_same_path_refuse_the_saved_predictions(tmp_path, change):
    annotations, cfg = _setup(tmp_path)
    first = run_evaluation(cfg, engine=_Engine(), quiet=True)
    assert first["n"] == N and first["value"] == 1.0
    if change == "questions":  # the odd questions now ask about a triangle: the saved "yes" answers are stale
        _rewrite(annotations, _records("triangle"))
    else:  # same questions, other labels
        _rewrite(annotations, _records().replace('"label": "yes"', '"label": "maybe"').replace(
            '"label": "no"', '"label": "yes"').replace('"label": "maybe"', '"label": "no"'))
    engine = _Engine()
    with pytest.raises(UserError, match=r"predictions of another run \(.*data_id .*the benchmark files changed since "
                                        r"these predictions were made.*--restart"):
        run_evaluation(cfg, engine=engine, quiet=True)
    assert engine.asked == 0
    fresh = run_evaluation(cfg, restart=True, engine=engine, quiet=True)  # --restart: moved aside, all asked again
    assert fresh["timing"]["reused"] == 0 and engine.asked == N
    assert _header(tmp_path)["data_id"] != json.loads(next((tmp_path / "out").glob(
        f"{PREDICTIONS}.*.old")).read_text().splitlines()[0])["fingerprint"]["data_id"]


def test_a_partial_run_over_rewritten_annotations_is_refused_too(tmp_path):
    annotations, cfg = _setup(tmp_path)
    run_evaluation(_limited(cfg, 2), engine=_Engine(), quiet=True)
    _rewrite(annotations, _records("triangle"))
    with pytest.raises(UserError, match="the benchmark files changed"):
        run_evaluation(cfg, engine=_Engine(), quiet=True)


# ---- 2. nothing changed: the fingerprint is stable -----------------------------------------------------------------

def test_the_fingerprint_is_stable_when_nothing_changed(tmp_path, capsys):
    annotations, cfg = _setup(tmp_path)
    assert resume.fingerprint(cfg) == resume.fingerprint(cfg)
    before = resume.fingerprint(cfg)
    _rewrite(annotations, annotations.read_text())  # the same bytes written again (a re-download): still the same
    (annotations.parent / "val2014" / "COCO_val2014_000000000002.jpg").write_bytes(b"x")  # images are not hashed
    (annotations.parent / "coco_pope_popular.json").write_text(_records("hexagon"))  # another split's file
    assert resume.fingerprint(cfg) == before and len(before["data_id"]) == 16
    assert resume.fingerprint(_limited(cfg, 3)) == before  # the limit is not in it
    run_evaluation(_limited(cfg, 3), engine=_Engine(), quiet=True)
    capsys.readouterr()
    engine = _Engine()
    again = run_evaluation(cfg, engine=engine, quiet=True)  # a rerun with a larger limit continues
    assert again["timing"]["reused"] == 3 and engine.asked == N - 3
    assert f"resuming: 3 of {N} predictions" in capsys.readouterr().err
    assert _header(tmp_path) == before


# ---- 3. a predictions file from before the content check -----------------------------------------------------------

def test_predictions_from_the_previous_fingerprint_format_get_a_clear_message(tmp_path):
    _, cfg = _setup(tmp_path)
    run_evaluation(cfg, engine=_Engine(), quiet=True)
    path = tmp_path / "out" / PREDICTIONS
    lines = path.read_text().splitlines()
    old = {k: v for k, v in json.loads(lines[0])["fingerprint"].items() if k != "data_id"}
    path.write_text("\n".join([json.dumps({"fingerprint": old}), *lines[1:]]) + "\n")
    with pytest.raises(UserError, match=r"predictions of another run \(.*made before tinygpt recorded the benchmark "
                                        r"files' content.*--restart") as error:
        run_evaluation(cfg, engine=_Engine(), quiet=True)
    assert str(path) in str(error.value)
    assert run_evaluation(cfg, restart=True, engine=_Engine(), quiet=True)["timing"]["reused"] == 0


def test_a_header_that_is_not_an_object_is_a_clear_error(tmp_path):
    _, cfg = _setup(tmp_path)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / PREDICTIONS).write_text(json.dumps({"fingerprint": ["pope"]}) + "\n")
    with pytest.raises(UserError, match="line 1 is not a predictions header.*--restart"):
        run_evaluation(cfg, engine=_Engine(), quiet=True)


# ---- 4. every benchmark names the files its loader reads -----------------------------------------------------------

def _write_shapes(root: Path) -> None:
    image = "images/shapes_eval_000001.jpg"
    image_file(root / image)
    json_file(root / "captions.json", [{"image": image, "caption": ["a red square"]}])
    json_file(root / "vqa.json", [{"image": image, "question": "what color is the square?", "answer": ["red"],
                                  "kind": "color"}])
    json_file(root / "refer.json", [{"image": image, "sents": "red square", "bbox": [1, 1, 4, 3],
                                    "box_text": "{<12><16><62><66>}", "width": 8, "height": 6}])


def _write_multi_image(root: Path) -> None:
    image_file(root / "images" / "a.jpg")
    image_file(root / "images" / "b.jpg")
    json_file(root / "questions.json", [{"question_id": "q1", "images": ["images/a.jpg", "images/b.jpg"],
                                         "question": "which image has a red square?", "answer": "the first image",
                                         "family": "which_has"}])


LAYOUTS = {  # (benchmark, split, writer): every registered benchmark, each file placement its loader accepts
    **{f"{name}": (name, None, writer) for name, writer in WRITERS.items()},
    "iconqa-folders": ("iconqa", None, lambda root: write_iconqa(root, problems_json=False)),
    "iconqa-archive": ("iconqa", None, lambda root: write_iconqa(root / "iconqa_data")),
    "vizwiz-flat": ("vizwiz", None, lambda root: write_vizwiz(root, annotations="val.json")),
    "pope-all": ("pope", "all", write_pope),
    "refcoco-subfolder": ("refcoco", None, lambda root: write_refcoco(root / "refcoco", images=root / "train2014")),
    "refcoco+": ("refcoco+", None, write_refcoco),
    "refcocog": ("refcocog", "val", lambda root: write_refcoco(root, refs_name="refs(umd).p")),
    "shapes": ("shapes", None, _write_shapes),
    "multi_image": ("multi_image", None, _write_multi_image),
}
IMAGE_SUFFIXES = (".jpg", ".png")
_opened: list[str] | None = None


def _audit(event: str, args: tuple) -> None:
    if _opened is not None and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        _opened.append(os.path.realpath(os.fsdecode(args[0])))


def test_every_registered_benchmark_has_a_layout_here():
    assert set(names()) <= {name for name, _, _ in LAYOUTS.values()}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_data_files_are_the_files_the_loader_reads_and_their_content_is_in_the_fingerprint(tmp_path, layout):
    """What ``load`` opens (an audit hook sees every open) is what `data_files` names, images aside; a byte more in
    any of them changes data_id, the limit does not change the list."""
    global _opened
    name, split, write = LAYOUTS[layout]
    bench = get_benchmark(name)
    split = split or bench.splits[0]
    write(tmp_path)
    if not getattr(_audit, "added", False):
        sys.addaudithook(_audit)
        _audit.added = True
    _opened = []
    try:
        samples = bench.load(tmp_path, split, {})
    finally:
        opened, _opened = _opened, None
    assert samples
    read = {path for path in opened if not path.endswith(IMAGE_SUFFIXES) and path.startswith(str(tmp_path.resolve()))}
    named = data_files(name, tmp_path, split, {})
    assert read and read == {os.path.realpath(p) for p in named}, (read, named)
    assert data_files(name, tmp_path, split, {"limit": 1}) == named
    before = resume.data_id(named, tmp_path)
    assert resume.data_id(list(data_files(name, tmp_path, split, {})), tmp_path) == before
    for path in named:
        with open(path, "ab") as f:
            f.write(b" ")
        after = resume.data_id(named, tmp_path)
        assert after != before, path
        before = after
