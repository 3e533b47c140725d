"""Held-out multi-image questions (tinygpt.tiny.synthetic.multi_image_eval) and their benchmark
(tinygpt.evaluation.benchmarks.multi_image): same seed -> same bytes and the rest of the tree untouched, every answer
re-derived from the scenes, balanced answers per family, the scorer on hand-made predictions, a run through the
runner on a tiny model, and an error naming the file for a malformed record."""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import save_decisive_tiny_model
from tinygpt.errors import UserError
from tinygpt.evaluation.benchmark import Prediction, Sample
from tinygpt.evaluation.benchmarks import get_benchmark
from tinygpt.evaluation.config import load_eval_config
from tinygpt.evaluation.predict import conversation
from tinygpt.evaluation.runner import PREDICTIONS, run_evaluation
from tinygpt.tiny.synthetic import Scale, generate, multi_image_eval
from tinygpt.tiny.synthetic.multi_image_eval import FAMILIES, build_question, pair_count
from tinygpt.tiny.synthetic.scenes import render_jpeg

BENCH = get_benchmark("multi_image")
SPLIT = BENCH.splits[0]
MICRO = Scale(laion=4, cc_sbu=2, align=2, instruct_images=4, vqa_per_image=1, multi_image=2, unnatural=2,
              eval_images=3, eval_vqa_per_image=1, shard_size=4)
SIZE = 64
TAG = "<Img><ImageHere></Img>"


def _digest(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _generate(out: Path, seed: int = 3) -> Path:
    generate(out, seed=seed, scale=MICRO, pretrain_size=32, instruct_size=SIZE, progress=False)
    return out


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    return _generate(tmp_path_factory.mktemp("multi") / "data")


@pytest.fixture(scope="module")
def split(tree) -> Path:
    return tree / "eval" / "multi_image"


# ---- the generator -------------------------------------------------------------------------------------------------

def test_same_seed_same_bytes_and_the_rest_of_the_tree_untouched(tree, split, tmp_path, monkeypatch):
    assert _digest(_generate(tmp_path / "again")) == _digest(tree)
    other = _digest(_generate(tmp_path / "other", seed=4) / "eval" / "multi_image")
    mine = _digest(split)
    assert other.keys() == mine.keys() and all(other[k] != mine[k] for k in mine if k != "manifest.json")
    # without the split, every other file is the same byte for byte (it draws on its own random stream only)
    monkeypatch.setattr("tinygpt.tiny.synthetic.write_multi_image_eval", lambda *args, **kwargs: {})
    without = _digest(_generate(tmp_path / "without"))
    assert {k: v for k, v in _digest(tree).items() if not k.startswith("eval/multi_image/")} == \
        {k: v for k, v in without.items() if not k.startswith("eval/multi_image/")}
    top = json.loads((tree / "manifest.json").read_text())
    assert "eval/multi_image" not in top["roots"] and top["roots"]["eval"] == json.loads(
        (tree / "eval" / "manifest.json").read_text())["counts"]


def test_the_split_has_its_manifest_and_the_pictures_of_its_scenes(split):
    records = json.loads((split / "questions.json").read_text())
    assert pair_count(MICRO.eval_images) == 6 and len(records) == 6
    assert [r["family"] for r in records] == list(FAMILIES) * 2
    manifest = json.loads((split / "manifest.json").read_text())
    assert manifest["seed"] == 3 and manifest["split"] == "eval" and manifest["format"] == "multi_image_eval"
    assert manifest["counts"] == {"pairs": 6, "images": 12, "questions.json": 6,
                                  "families": {family: 2 for family in FAMILIES}}
    # nothing of the training sets at this size: the pairs come out as drawn for an empty `seen`
    for index, record in enumerate(records):
        pair, expected = build_question(3, index, SIZE, frozenset())
        assert {k: record[k] for k in expected} == expected
        assert record["images"] == [f"images/{index + 1:06d}_{k}.jpg" for k in range(2)]
        assert [(split / p).read_bytes() for p in record["images"]] == [render_jpeg(s) for s in pair]


def _derived_answer(pair, question: str) -> str:
    """The answer re-derived from the two scenes' objects, asserting the question needs both images."""
    if match := re.fullmatch(r"which image has a (\w+) (\w+)\?", question):
        owners = [k for k, scene in enumerate(pair)
                  if any((o.colour, o.shape) == match.groups() for o in scene.objects)]
        assert len(owners) == 1
        return ("the first image", "the second image")[owners[0]]
    if match := re.fullmatch(r"how many (\w+) are there in both images\?", question):
        shape = next(s for s, plural in multi_image_eval.texts.PLURALS.items() if plural == match.group(1))
        counts = [sum(o.shape == shape for o in scene.objects) for scene in pair]
        assert min(counts) >= 1   # in each image: neither one alone gives the total
        return str(sum(counts))
    match = re.fullmatch(r"which image's (\w+) is larger\?", question)
    assert match, question
    found = [[o for o in scene.objects if o.shape == match.group(1)] for scene in pair]
    assert [len(f) for f in found] == [1, 1] and found[0][0].size != found[1][0].size
    return ("the first image", "the second image")[found[1][0].size == "large"]


def test_every_question_is_answerable_from_both_images_and_answers_are_balanced():
    count = pair_count(300)   # the tiny scale's split
    by_family: dict[str, Counter] = {family: Counter() for family in FAMILIES}
    for index in range(count):
        pair, record = build_question(0, index, 224, frozenset())
        assert _derived_answer(pair, record["question"]) == record["answer"], record
        by_family[record["family"]][record["answer"]] += 1
    assert count == 150 and all(sum(c.values()) == 50 for c in by_family.values())
    assert by_family["which_has"] == by_family["compare_size"] == Counter({"the first image": 25,
                                                                            "the second image": 25})
    assert by_family["count_both"] == Counter({"2": 13, "3": 13, "4": 12, "5": 12})


def test_a_scene_of_the_training_sets_is_never_used():
    first, _ = build_question(0, 0, 224, frozenset())
    seen = frozenset(scene.signature() for scene in first)
    again, record = build_question(0, 0, 224, seen)
    assert not {scene.signature() for scene in again} & seen and record["family"] == "which_has"


# ---- the benchmark -------------------------------------------------------------------------------------------------

def test_load_gives_two_images_and_the_training_wording(split):
    records = json.loads((split / "questions.json").read_text())
    samples = BENCH.load(split, SPLIT, {})
    assert [s.id for s in samples] == [str(r["question_id"]) for r in records]
    first = samples[0]
    assert first.prompt == f"Image 1: {TAG} Image 2: {TAG} {records[0]['question']}"
    assert first.images == tuple(str((split / p).resolve()) for p in records[0]["images"])
    assert first.answers == (records[0]["answer"],) and first.max_new_tokens == 8 and first.generate
    assert first.meta["family"] == records[0]["family"]
    assert len(conversation(first).turns[0].images) == 2
    assert [s.id for s in BENCH.load(split, SPLIT, {"limit": 2})] == ["1", "2"]
    with pytest.raises(UserError, match=r"benchmark\.options\.limt"):
        BENCH.load(split, SPLIT, {"limt": 2})
    with pytest.raises(UserError, match=r"benchmark\.split"):
        BENCH.load(split, "test", {})


def _sample(i: int, family: str, answer: str) -> Sample:
    return Sample(id=str(i), images=("a.jpg", "b.jpg"), prompt="", answers=(answer,),
                  meta={"family": family, "question": f"q{i}"})


def test_the_scorer_on_hand_made_predictions():
    samples = [_sample(0, "which_has", "the first image"), _sample(1, "which_has", "the second image"),
               _sample(2, "count_both", "3"), _sample(3, "count_both", "4"), _sample(4, "count_both", "3"),
               _sample(5, "compare_size", "the second image")]
    texts = ["The first image.", "first", "three", "4", "I see a circle", None]
    result = BENCH.score(samples, [Prediction(str(i), t) for i, t in enumerate(texts)], "official")
    assert result["metric"] == "accuracy" and result["n"] == 6
    assert result["value"] == result["accuracy"] == pytest.approx(3 / 6)
    assert result["per_family"] == {"which_has": 0.5, "count_both": pytest.approx(2 / 3), "compare_size": 0.0}
    assert result["unparsed"] == pytest.approx(3 / 6)   # "first", "I see a circle", no text
    assert result["majority_baseline"] == pytest.approx((1 + 2 + 1) / 6)
    assert result["counts"] == {"which_has": 2, "count_both": 3, "compare_size": 1}
    assert result["examples"]["count_both"][0] == ["q2", "3", "three"]
    compat = BENCH.score(samples, [Prediction(str(i), t) for i, t in enumerate(texts)], "tinygpt-v-compat")
    assert compat == {**result, "compat": "same as official"}
    with pytest.raises(UserError, match="no prediction for the sample 5"):
        BENCH.score(samples, [Prediction(str(i), t) for i, t in enumerate(texts[:5])], "official")


@pytest.mark.parametrize("change, message", [
    (lambda r: r.pop("answer"), r"record 0 lacks the field 'answer'"),
    (lambda r: r.update(family="colour"), r"record 0: family: expected one of"),
    (lambda r: r.update(images=["images/000001_0.jpg"]), r"record 0: images: expected a list of two"),
    (lambda r: r.update(images=["images/000001_0.jpg", "images/missing.jpg"]), r"record 0: images: images/missing"),
    (lambda r: r.update(images=["images/000001_0.jpg", "../escape.jpg"]), r"record 0: image path"),
])
def test_a_malformed_record_names_the_file_and_the_record(split, tmp_path, change, message):
    import shutil

    root = tmp_path / "multi_image"
    shutil.copytree(split, root)
    records = json.loads((root / "questions.json").read_text())
    change(records[0])
    (root / "questions.json").write_text(json.dumps(records))
    with pytest.raises(UserError, match=re.escape(str(root / "questions.json")) + ": " + message):
        BENCH.load(root, SPLIT, {})
    (root / "questions.json").write_text("[{")
    with pytest.raises(UserError, match=re.escape(str(root / "questions.json")) + ": not valid JSON"):
        BENCH.load(root, SPLIT, {})


# ---- through the runner ----------------------------------------------------------------------------------------------

def _config(tmp_path: Path, model: Path, split: Path) -> Path:
    path = tmp_path / "multi_image.yaml"
    path.write_text(f"model: {{backend: torch, path: {model}, device: cpu}}\n"
                    f"benchmark: {{name: multi_image, root: {split}}}\n"
                    f"run: {{out_dir: {tmp_path / 'out'}, batch_size: 4}}\n")
    return path


class _HalfRight:
    """A stand-in engine answering the samples in order: right on even positions, "no idea" on odd ones."""

    name = "half-right"
    backend = SimpleNamespace(prompt=SimpleNamespace(template="[INST] {} [/INST]", end_sym=""))
    stop_strings = ()

    def __init__(self, samples: list[Sample]):
        self.answers = iter(s.answers[0] if k % 2 == 0 else "no idea" for k, s in enumerate(samples))
        self.images: list[int] = []

    def chat_batch(self, conversations, settings=None):
        self.images += [len(c.turns[-1].images) for c in conversations]
        return [next(self.answers) for _ in conversations]


def test_a_run_through_the_runner_on_a_tiny_model(split, tmp_path):
    model = save_decisive_tiny_model(tmp_path / "model")
    samples = BENCH.load(split, SPLIT, {})
    summary = run_evaluation(load_eval_config(_config(tmp_path, model, split)), quiet=True)
    lines = [json.loads(line) for line in (tmp_path / "out" / PREDICTIONS).read_text().splitlines()]
    assert lines[0]["fingerprint"]["benchmark"] == "multi_image"
    assert [line["id"] for line in lines[1:]] == [s.id for s in samples] and all(line["text"] is not None
                                                                                 for line in lines[1:])
    again = BENCH.score(samples, [Prediction.from_json(line) for line in lines[1:]], "official")
    assert summary["n"] == 6 and summary["metric"] == "accuracy" and summary["value"] == again["value"]
    assert summary["extras"]["per_family"] == again["per_family"] and summary["synthetic"] is True
    assert summary["prompt"]["example"] == samples[0].prompt

    engine = _HalfRight(samples)
    (tmp_path / "half").mkdir()
    half = run_evaluation(load_eval_config(_config(tmp_path / "half", model, split)), engine=engine, quiet=True)
    assert engine.images == [2] * 6
    assert half["value"] == 0.5 and half["extras"]["unparsed"] == 0.5
    assert half["extras"]["per_family"] == {family: 0.5 for family in FAMILIES}


def test_a_missing_default_split_is_not_written_by_evaluate_and_says_how_to_write_it(tmp_path, monkeypatch):
    from tinygpt.cli.evaluate import _write_synthetic_files

    monkeypatch.setenv("TINYGPT_TINY_DATA", str(tmp_path / "data"))
    cfg = load_eval_config(Path(__file__).resolve().parents[1] / "eval_configs" / "multi_image.yaml",
                           [f"run.out_dir={tmp_path / 'out'}"], check_model=False)
    assert cfg.benchmark.root == str(tmp_path / "data" / "eval" / "multi_image")
    _write_synthetic_files(cfg)
    assert not (tmp_path / "data").exists()   # not the benchmark_files tree: the generator writes this split
    with pytest.raises(UserError, match=r"multi_image\.yaml: benchmark\.root: .* is not a directory .*"
                                        r"python -m tinygpt\.tiny\.synthetic` writes data/synthetic/eval and "
                                        r"eval/multi_image"):
        run_evaluation(cfg, quiet=True)
