"""The audit's fixes: a damaged benchmark image names its file, Ctrl-C is one line (status 130), the report table
tells runs apart and names the official metric, a summary.json of the wrong shape is one error line, --options
values that read as YAML mappings get a quoting hint, and the harness doc names the launch configs that work."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from tinygpt.chat.messages import UnreadableImage
from tinygpt.config.options import parse_options
from tinygpt import errors
from tinygpt.evaluation import report
from tinygpt.evaluation.benchmark import Sample
from tinygpt.evaluation.predict import conversation

ROOT = Path(__file__).resolve().parents[1]


def test_a_damaged_benchmark_image_names_its_file(tmp_path):
    damaged = tmp_path / "images" / "COCO_val2014_000000000042.jpg"
    damaged.parent.mkdir()
    damaged.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    image = conversation(Sample("20000030", (str(damaged),), "What is it?")).turns[0].images[0]
    with pytest.raises(UnreadableImage) as caught:
        image.open()
    message = str(caught.value)
    assert message.startswith(f"sample 20000030: images[0] {damaged}: not a readable image")


def test_ctrl_c_is_one_line_and_status_130(capsys):
    def interrupted():
        raise KeyboardInterrupt

    try:
        code = errors.report_errors(interrupted)
    except KeyboardInterrupt:
        pytest.fail("report_errors let KeyboardInterrupt through (a traceback)")
    assert code == 130
    assert capsys.readouterr().err == "interrupted\n"


def _summary(benchmark, official, compat, scoring="official", model="/x/outputs/tiny/stage4"):
    return {"benchmark": benchmark, "title": benchmark.upper(), "split": "val", "n": 10,
            "metric": (compat if scoring != "official" else official)[0], "scoring": scoring,
            "scores": {"official": {"metric": official[0], "value": official[1]},
                       "tinygpt-v-compat": {"metric": compat[0], "value": compat[1]}},
            "paper": {"TinyGPT-V (paper v1)": 53.2}, "backend": "torch:cpu", "model": model, "warning": None}


def _write(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def test_the_table_names_each_run_and_the_official_metric(tmp_path, capsys):
    vsr = _summary("vsr", ("exact_match", 0.5), ("substring_accuracy", 0.6), scoring="tinygpt-v-compat")
    files = [_write(tmp_path / "a" / "vsr" / "summary.json", vsr),
             _write(tmp_path / "b" / "vsr" / "summary.json", {**vsr, "model": "/x/outputs/other"}),
             _write(tmp_path / "b" / "gqa_stage4" / "summary.json",
                    _summary("gqa", ("accuracy", 0.2), ("accuracy", 0.275)))]
    assert report.main([str(f) for f in files]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:5] == ["run", "benchmark", "split", "official", "metric"]
    assert lines[1].split()[:4] == ["a/vsr", "vsr", "val", "exact_match"]
    assert lines[2].split()[:4] == ["b/vsr", "vsr", "val", "exact_match"]
    assert lines[3].split()[:4] == ["b/gqa_stage4", "gqa", "val", "accuracy"]
    assert "* a/vsr: the compat column is substring_accuracy" in lines
    assert all(len(line) <= 120 for line in lines)
    # without file names, the model path's end tells the runs apart
    assert report.format_table([vsr]).splitlines()[1].split()[0] == "tiny/stage4"


def test_one_run_names_each_scorings_metric():
    text = report.format_run(_summary("vsr", ("exact_match", 0.5), ("substring_accuracy", 0.6),
                                      scoring="tinygpt-v-compat"))
    assert re.search(r"this run, official +50\.0  exact_match$", text, re.M)
    assert re.search(r"this run, tinygpt-v-compat \* +60\.0  substring_accuracy$", text, re.M)


@pytest.mark.parametrize("data, problem", [
    ({"scores": []}, "scores: expected a mapping of scorings, got a list"),
    ({"scores": {"official": 5}}, "scores.official: expected a mapping with metric and value, got int"),
    ({"scores": {"official": {"value": "high"}}}, "scores.official.value: expected a number, got a string"),
    ({"scores": {}, "paper": [1]}, "paper: expected a mapping, got a list"),
])
def test_a_summary_of_the_wrong_shape_is_one_error_line(tmp_path, capsys, data, problem):
    path = _write(tmp_path / "run" / "summary.json", data)
    assert report.main([str(path), str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == f"error: {path}: not a summary.json written by tinygpt evaluate ({problem})\n"


def test_options_that_read_as_yaml_say_to_quote(capsys):
    # PyYAML's own words vary by version: "did not find expected <document start>" (6.0.4), "expected '<document
    # start>', but found '{'" (6.0.1)
    with pytest.raises(Exception, match=re.escape(
            "--options: benchmark.options.prompt=[vqa] {question}: not valid YAML (") + r"[^()]*<document start>.*\); "
            + re.escape("if the value is text, quote it: 'benchmark.options.prompt=\"[vqa] {question}\"'")):
        parse_options(["benchmark.options.prompt=[vqa] {question}"], example="run.seed=3")
    for value, kind in (("Q: {question}", "mapping"), ("{question}", "mapping")):
        with pytest.raises(Exception, match=re.escape(
                f"the value reads as a YAML {kind}, not as text; to pass text, quote it: "
                f"'benchmark.options.prompt=\"{value}\"'")):
            parse_options([f"benchmark.options.prompt={value}"], example="run.seed=3")
    tree, _ = parse_options(['benchmark.options.prompt="[vqa] {question}"', "benchmark.split=[a, b]",
                             "model.x={r: 4}"], example="run.seed=3")
    assert tree.benchmark.options.prompt == "[vqa] {question}"
    assert list(tree.benchmark.split) == ["a", "b"] and tree.model.x.r == 4


def test_the_harness_doc_names_only_launch_configs_for_pretrained():
    row = next(line for line in (ROOT / "docs" / "evaluation-harnesses.md").read_text().splitlines()
               if line.startswith("| `pretrained` |"))
    launch = row.split("A launch config (", 1)[1].split(";", 1)[0]
    names = re.findall(r"`(?:eval_configs/)?([\w.+-]+\.yaml)`", launch)
    names += [f"stage{k}.yaml" for k in range(1, 5) if "`stage1.yaml`-`stage4.yaml`" in launch]
    assert {"tiny.yaml", "gguf.yaml", "stage4.yaml"} <= set(names)
    for name in names:
        sections = set(yaml.safe_load((ROOT / "eval_configs" / name).read_text()))
        assert sections <= {"model", "generation", "limits"}, name
