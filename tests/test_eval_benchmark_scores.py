"""The benchmark scores on hand-computed predictions (official and tinygpt-v-compat) over the hand-written layouts of
tests/benchmark_layouts.py, and the synthetic benchmark files end to end."""

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest

from tinygpt.errors import UserError
from tinygpt.evaluation.benchmark import Prediction
from tinygpt.evaluation.benchmarks import get_benchmark, names
from tinygpt.tiny.synthetic import benchmark_files
from tinygpt.tiny.synthetic.benchmark_files import NAMES, write_benchmark_files

from benchmark_layouts import (load_bench, score_bench, write_gqa, write_hateful_memes,
                               write_iconqa, write_pope, write_refcoco, write_vizwiz, write_vqa, write_vsr)


def test_gqa_score(tmp_path):
    write_gqa(tmp_path)
    samples = load_bench("gqa", tmp_path)
    texts = ["Yes.", "the table is red"]
    official = score_bench("gqa", samples, texts)
    assert official["value"] == 0.5 and official["n"] == 2           # "yes" == "yes"; "table is red" != "table"
    assert official["by_structural"] == {"query": 0.0, "verify": 1.0}
    assert score_bench("gqa", samples, texts, scoring="tinygpt-v-compat")["value"] == 1.0   # "the table" is a substring


def test_vsr_score(tmp_path):
    write_vsr(tmp_path)
    one = load_bench("vsr", tmp_path)
    samples = [replace(one[i % 2], id=str(i)) for i in range(5)]   # labels 1 0 1 0 1
    texts = ["True.", "False, it is not.", "no", "true or false", "I think so"]
    official = score_bench("vsr", samples, texts)
    # parsed: T, F, F, T, None -> right, right, wrong, wrong, wrong; TP 1, FP 1, FN 2 (the unparsed "true" item)
    assert official["value"] == pytest.approx(2 / 5) and official["unparsed"] == pytest.approx(1 / 5)
    assert official["precision"] == pytest.approx(1 / 2) and official["recall"] == pytest.approx(1 / 3)
    assert official["f1"] == pytest.approx(0.4) and official["yes_ratio"] == pytest.approx(2 / 5)
    compat = score_bench("vsr", samples, texts, scoring="tinygpt-v-compat")
    assert compat["value"] == pytest.approx(3 / 5)        # "true or false" contains the label "false"


def test_iconqa_score(tmp_path):
    write_iconqa(tmp_path)
    samples = load_bench("iconqa", tmp_path)                   # 37: label 1 of 2; 12: label 0 of 3
    official = score_bench("iconqa", samples, ["it is a square", "(c)"], [(-2.0, -1.0), (-3.0, -0.5, -0.1)])
    assert official["metric"] == "accuracy_likelihood" and official["value"] == 0.5
    assert official["accuracy_generation"] == 0.5 and official["generation_unparsed"] == 0.0
    without_scores = score_bench("iconqa", samples, ["square", "nothing"])
    assert without_scores["metric"] == "accuracy_generation" and without_scores["value"] == 0.5
    assert without_scores["generation_unparsed"] == 0.5 and without_scores["accuracy_likelihood"] is None
    compat = score_bench("iconqa", samples, ["x", "y"], scoring="tinygpt-v-compat")
    assert compat["value"] == 0.5 and compat["compat_unscorable"] == 0    # right only where the answer index is 0
    piped = [replace(samples[1], choices=("a|b", "c", "d"))]
    assert score_bench("iconqa", piped, ["a"], scoring="tinygpt-v-compat")["compat_unscorable"] == 1


def test_vizwiz_score(tmp_path):
    write_vizwiz(tmp_path)
    samples = load_bench("vizwiz", tmp_path)                   # 7 "basil" + 3 "spice"; 10 "unanswerable"
    official = score_bench("vizwiz", samples, ["Spice.", "unanswerable"])
    assert official["value"] == pytest.approx((0.9 + 1.0) / 2)   # 3 of 10 match: 0.9
    assert official["answerable"] == pytest.approx(0.9) and official["unanswerable"] == 1.0
    assert official["by_answer_type"] == {"other": pytest.approx(0.9), "unanswerable": 1.0}
    assert score_bench("vizwiz", samples, ["", ""])["value"] == 0.0
    assert score_bench("vizwiz", samples, ["", ""], scoring="tinygpt-v-compat")["value"] == 1.0   # "" in every answer


def test_hateful_memes_score(tmp_path):
    write_hateful_memes(tmp_path)
    two = load_bench("hateful_memes", tmp_path)                # labels 0, 1
    samples = [replace(two[i % 2], id=str(i), label=label) for i, label in enumerate([1, 0, 1, 0])]
    p_yes = [0.9, 0.2, 0.4, 0.6]
    scores = [(math.log(p), math.log(1 - p)) for p in p_yes]
    texts = ["Yes", "no.", "nothing hateful, yes", "yes and no"]
    official = score_bench("hateful_memes", samples, texts, scores)
    assert official["metric"] == "auroc" and official["value"] == pytest.approx(0.75)   # 3 of 4 pairs ordered
    assert official["accuracy_likelihood"] == 0.5 and official["accuracy"] == 0.5
    assert official["unparsed"] == 0.25 and official["yes_ratio"] == 0.5
    compat = score_bench("hateful_memes", samples, texts, scoring="tinygpt-v-compat")
    assert compat["value"] == 0.75                         # "yes" anywhere: 1, 0, 1, 1 against 1, 0, 1, 0


@pytest.mark.parametrize("name", ["vqav2", "okvqa"])
def test_vqa_score(tmp_path, name):
    write_vqa(tmp_path, name)
    samples = load_bench(name, tmp_path)
    official = score_bench(name, samples, ["Down.", "two"])
    assert official["value"] == 1.0 and official["by_answer_type"] == {"number": 1.0, "other": 1.0}
    assert score_bench(name, samples, ["up", "two"])["value"] == 0.5
    compat = score_bench(name, samples, ["up", "two"], scoring="tinygpt-v-compat")
    assert compat["value"] == 0.5 and compat["compat"] == "same as official"


def test_refcoco_score(tmp_path):
    write_refcoco(tmp_path)
    one = load_bench("refcoco", tmp_path)[0]                   # 200 x 100 image, box (20, 10, 100, 60)
    samples = [replace(one, id=str(i)) for i in range(4)]
    texts = ["{<10><10><50><60>}",                        # the box itself: IoU 1
             "no idea",                                   # no box
             "{<10><10><30><60>}",                        # (20, 10, 60, 60): IoU exactly 0.5
             "it is at {<10><10><50><60>}"]               # a box, but not at the start
    official = score_bench("refcoco", samples, texts)
    assert official["value"] == 0.75 and official["mean_iou"] == pytest.approx(0.625)
    assert official["unparsed"] == 0.25
    compat = score_bench("refcoco", samples, texts, scoring="tinygpt-v-compat")
    assert compat["value"] == 0.5                         # must start with the box; +1-pixel IoU 0.506 > 0.5


def test_pope_score(tmp_path):
    write_pope(tmp_path)
    samples = load_bench("pope", tmp_path)                     # per category: yes item, no item
    texts = ["Yes", "No", "yes", "yes", "maybe", "no"]
    official = score_bench("pope", samples, texts)
    by = official["by_category"]
    assert by["random"]["f1"] == 1.0 and by["random"]["yes_ratio"] == 0.5
    assert by["popular"]["accuracy"] == 0.5 and by["popular"]["precision"] == 0.5
    assert by["popular"]["f1"] == pytest.approx(2 / 3) and by["popular"]["yes_ratio"] == 1.0
    # the official figures use POPE's own rule (no "No" / "no" / "not" in the first sentence = yes), under which
    # "maybe" is a yes (right on the yes item); the old strict first-word parse, which left it unparsed and wrong,
    # is kept as the strict_* figures
    assert by["adversarial"]["f1"] == 1.0 and by["adversarial"]["unparsed"] == 0.0
    assert by["adversarial"]["strict_f1"] == 0.0 and by["adversarial"]["strict_unparsed"] == 0.5
    assert official["value"] == pytest.approx((1 + 2 / 3 + 1) / 3) and official["accuracy"] == pytest.approx(5 / 6)
    assert official["strict_f1"] == pytest.approx((1 + 2 / 3 + 0) / 3)
    assert official["strict_accuracy"] == pytest.approx(2 / 3)
    single = score_bench("pope", load_bench("pope", tmp_path, "popular"), ["yes", "yes"])
    assert single["value"] == pytest.approx(2 / 3) and list(single["by_category"]) == ["popular"]
    assert score_bench("pope", samples, texts, scoring="tinygpt-v-compat")["compat"] == "same as official"


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
        pope = load_bench("pope", out / "pope", category)
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
