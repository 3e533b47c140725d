"""`python evaluate.py` / `tinygpt evaluate` (tinygpt.evaluation.config, runner, report; tinygpt/cli/evaluate.py):
every shipped eval config parses; every mistake names the file (or --options) and the key; a run writes
predictions.jsonl and summary.json; a run cut short (a line cut mid-way, or a process killed) and rerun gives the same
summary as an uninterrupted run; another run's predictions are refused (moved aside with --restart); the garbage
warning fires on nonsense and not on a good run; both command forms work."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import save_decisive_tiny_model
from tinygpt.errors import UserError
from tinygpt.evaluation.benchmark import Prediction, Sample
from tinygpt.evaluation.benchmarks import get_benchmark, names
from tinygpt.evaluation.config import load_eval_config
from tinygpt.evaluation.report import format_run, format_table
from tinygpt.evaluation.runner import PREDICTIONS, SUMMARY, garbage_problems, run_evaluation

ROOT = Path(__file__).resolve().parents[1]
LIMIT = 4  # the first 4 records of each file of the shapes split: 4 captions, 4 questions, 4 phrases


# ---- configs -------------------------------------------------------------------------------------------------------

def test_every_benchmark_has_a_shipped_config_on_the_tiny_model():
    for name in names():
        cfg = load_eval_config(ROOT / "eval_configs" / f"{name}.yaml", check_model=False)
        bench = get_benchmark(name)
        assert cfg.benchmark.name == name and cfg.benchmark.split == bench.splits[0]
        assert cfg.launch.model.backend == "torch" and cfg.launch.model.path == "outputs/tiny/stage4"
        assert cfg.benchmark.root.endswith({"shapes": "/eval", "multi_image": "/eval/multi_image"}.get(
            name, f"/benchmarks/{name}"))
        assert cfg.run.out_dir == f"outputs/eval/{name}-{cfg.benchmark.split}" and cfg.run.scoring == "official"


def _file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "mine.yaml"
    path.write_text("model: {backend: torch, path: x}\n" + text + "\n")
    return path


@pytest.mark.parametrize("text, message", [
    ("benchmark: {name: shapes, nme: x}", "unknown key benchmark.nme"),
    ("benchmark: {name: gpa}", "benchmark.name must be one of gqa, vsr"),
    ("benchmark: {name: gpa}", "(did you mean 'gqa'?)"),
    ("benchmark: {root: data}", "benchmark.name is required"),
    ("benchmark: {name: shapes, split: train}", "benchmark.split must be one of"),
    ("benchmark: {name: shapes, options: [1, 2]}", "benchmark.options must be a mapping"),
    ("benchmark: {name: shapes}\nrun: {scoring: lenient}", "run.scoring must be one of official, tinygpt-v-compat"),
    ("benchmark: {name: shapes}\nrun: {batch_size: 0}", "run.batch_size must be >= 1"),
    ("benchmark: {name: shapes}\nrun: {batch_size: many}", "run.batch_size must be an integer"),
    ("benchmark: {name: shapes}\nrun: {limit: 0}", "run.limit must be >= 1"),
    ("benchmark: {name: shapes, options: {limit: 3}}\nrun: {limit: 4}", "run.limit (4) and benchmark.options.limit"),
    ("benchmark: {name: shapes}\nrun: {scorin: official}", "unknown key run.scorin (did you mean 'scoring'?)"),
    ("benchmrk: {name: shapes}", "unknown section 'benchmrk' (did you mean 'benchmark'?)"),
    ("run: {batch_size: 2}", "benchmark section is required"),
    ("generation: {max_new_tokens: 9}",  # a launch config (eval_configs/gguf.yaml): what to give instead
     "a launch config (for chat, the demo and the server), not an evaluation config; evaluate its model with a "
     "benchmark's config, e.g. python evaluate.py --cfg-path eval_configs/gqa.yaml --options model.backend=torch "
     "model.path=x run.out_dir=outputs/eval/gqa-torch"),
    ("benchmark: {name: shapes}\ngeneration: {temperature: -1}", "generation.temperature: must be >= 0"),
])
def test_config_mistakes_name_the_file_and_the_key(tmp_path, text, message):
    path = _file(tmp_path, text)
    with pytest.raises(UserError) as raised:
        load_eval_config(path, check_model=False)
    assert str(raised.value).startswith(f"{path}: ") and message in str(raised.value)


@pytest.mark.parametrize("options, message", [
    (["run.scoring=lenient"], "run.scoring must be one of official, tinygpt-v-compat, got 'lenient'"),
    (["run.batchsize=3"], "unknown key run.batchsize (did you mean 'batch_size'?)"),
    (["benchmark.name=pope", "benchmark.split=nope"], "benchmark.split must be one of"),
])
def test_a_bad_override_names_options_and_the_key(tmp_path, options, message):
    path = _file(tmp_path, "benchmark: {name: shapes}")
    with pytest.raises(UserError) as raised:
        load_eval_config(path, options, check_model=False)
    assert str(raised.value).startswith(f"--options (over {path}): ") and message in str(raised.value)


def test_overrides_apply_and_malformed_ones_are_refused(tmp_path):
    path = _file(tmp_path, "benchmark: {name: shapes}")
    cfg = load_eval_config(path, ["run.limit=5", "benchmark.options.caption_prompt=bare", "run.batch_size=3"],
                           check_model=False)
    assert cfg.load_options == {"caption_prompt": "bare", "limit": 5} and cfg.run.batch_size == 3
    with pytest.raises(UserError, match="--options: 'oops' is not key=value"):
        load_eval_config(path, ["oops"], check_model=False)
    with pytest.raises(UserError, match="train it first"):
        load_eval_config(path)  # model.path x is no model directory


# ---- runs on the decisive tiny model -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def shapes_split(tmp_path_factory) -> Path:
    """A small held-out shapes split written by the synthetic generator."""
    import tinygpt.tiny.synthetic as synthetic

    micro = synthetic.Scale(laion=4, cc_sbu=4, align=4, instruct_images=4, vqa_per_image=2, multi_image=2,
                            unnatural=2, eval_images=6, eval_vqa_per_image=2, shard_size=8)
    out = tmp_path_factory.mktemp("shapes") / "data"
    synthetic.generate(out, scale=micro, pretrain_size=32, instruct_size=64, progress=False)
    return out / "eval"


def _config(tmp_path: Path, model: Path, split: Path, backend: str = "torch", batch: int = 4) -> Path:
    path = tmp_path / "shapes.yaml"
    path.write_text(f"model: {{backend: {backend}, path: {model}, device: cpu}}\n"
                    f"benchmark: {{name: shapes, root: {split}}}\n"
                    f"run: {{out_dir: {tmp_path / 'out'}, batch_size: {batch}, limit: {LIMIT}}}\n")
    return path


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _without_timing(summary: dict) -> dict:
    return {k: v for k, v in summary.items() if k != "timing"}


@pytest.fixture(scope="module")
def full_run(chat_model, shapes_split, tmp_path_factory):
    """(config, summary, predictions file text) of an uninterrupted run."""
    tmp = tmp_path_factory.mktemp("full")
    cfg = _config(tmp, chat_model[0], shapes_split)
    summary = run_evaluation(load_eval_config(cfg), quiet=True)
    return cfg, summary, (tmp / "out" / PREDICTIONS).read_text()


def test_a_run_writes_predictions_and_a_summary(full_run, chat_model, shapes_split):
    cfg, summary, text = full_run
    bench = get_benchmark("shapes")
    samples = bench.load(shapes_split, "held-out", {"limit": LIMIT})  # what the run scored
    lines = [json.loads(line) for line in text.splitlines()]
    assert lines[0]["fingerprint"]["model"] == str(chat_model[0].resolve())
    assert [line["id"] for line in lines[1:]] == [s.id for s in samples]
    assert json.loads((cfg.parent / "out" / SUMMARY).read_text()) == summary
    again = bench.score(samples, [Prediction.from_json(line) for line in lines[1:]], "official")
    assert summary["n"] == len(samples) and summary["metric"] == "vqa_accuracy"
    assert summary["value"] == again["value"] and summary["scores"]["official"]["value"] == again["value"]
    assert set(summary["scores"]) == {"official", "tinygpt-v-compat"}
    assert summary["backend"].startswith("torch") and summary["model"] == str(chat_model[0].resolve())
    assert set(summary["versions"]) == {"python", "torch", "transformers", "tinygpt"}
    assert summary["commit"] is None or re.fullmatch(r"[0-9a-f]{40}(-dirty)?", summary["commit"])
    assert summary["timing"]["predicted"] == len(samples) and summary["timing"]["reused"] == 0
    assert summary["timing"]["samples_per_second"] > 0


def test_a_run_cut_mid_line_resumes_to_the_same_summary(full_run, tmp_path):
    cfg, summary, text = full_run
    out = tmp_path / "out"
    out.mkdir()
    lines = text.splitlines(keepends=True)
    (out / PREDICTIONS).write_text("".join(lines[:4]) + lines[4][: len(lines[4]) // 2])  # header + 3, a cut line
    resumed = run_evaluation(load_eval_config(cfg, [f"run.out_dir={out}"]), quiet=True)
    assert _without_timing(resumed) == _without_timing(summary)
    assert resumed["timing"]["reused"] == 3 and resumed["timing"]["predicted"] == summary["n"] - 3
    assert (out / PREDICTIONS).read_text() == text  # the cut line was dropped and redone


def test_predictions_of_another_model_are_refused_and_restart_moves_them_aside(full_run, tmp_path):
    cfg, summary, text = full_run
    out = tmp_path / "out"
    out.mkdir()
    (out / PREDICTIONS).write_text(text)
    other = save_decisive_tiny_model(tmp_path / "other", seed=1)
    options = [f"run.out_dir={out}", f"model.path={other}"]
    with pytest.raises(UserError, match=r"predictions of another run \(model .*--restart"):
        run_evaluation(load_eval_config(cfg, options), quiet=True)
    assert (out / PREDICTIONS).read_text() == text  # untouched
    fresh = run_evaluation(load_eval_config(cfg, options), restart=True, quiet=True)
    assert fresh["model"] == str(Path(other).resolve()) and fresh["timing"]["reused"] == 0
    old = list(out.glob(f"{PREDICTIONS}.*.old"))
    assert len(old) == 1 and old[0].read_text() == text


def test_the_garbage_warning_fires_on_nonsense(full_run, capsys):
    cfg, summary, text = full_run  # a random (decisive) model: its answers are nonsense
    assert summary["warning"] and "under 5%" in summary["warning"]
    assert "WARNING" in format_run(summary)


class _Oracle:
    """A stand-in engine that answers every shapes sample right (from the split's own files)."""

    name = "oracle"
    backend = SimpleNamespace(prompt=SimpleNamespace(template="[INST] {} [/INST]", end_sym=""))
    stop_strings = ()

    def __init__(self, samples: list[Sample]):
        self.right = {s.prompt: s.meta["box_text"] if s.box else s.answers[0] for s in samples}

    def chat_batch(self, conversations, settings=None):
        return [self.right[c.turns[-1].user] for c in conversations]


def test_the_garbage_warning_stays_quiet_on_a_good_run(chat_model, shapes_split, tmp_path, capsys):
    samples = get_benchmark("shapes").load(shapes_split, "held-out", {"limit": LIMIT})
    cfg = load_eval_config(_config(tmp_path, chat_model[0], shapes_split))
    summary = run_evaluation(cfg, engine=_Oracle(samples), quiet=True)
    assert summary["value"] == 1.0 and summary["extras"]["grounding_accuracy"] == 1.0
    assert summary["warning"] is None and "WARNING" not in capsys.readouterr().err


def test_garbage_rules():
    varied = [Prediction(str(i), text=t) for i, t in enumerate(["yes", "no"] * 6)]
    assert garbage_problems({"metric": "accuracy", "value": 0.8, "yes_ratio": 0.5, "unparsed": 0}, [], varied) == []
    assert "under 5%" in garbage_problems({"metric": "accuracy", "value": 0.04}, [], varied)[0]
    same = [Prediction(str(i), text="Yes") for i in range(12)]
    problems = garbage_problems({"metric": "accuracy", "value": 0.5, "yes_ratio": 1.0}, [], same)
    assert any("every answer is yes" in p for p in problems) and any("all 12 generated answers" in p for p in problems)
    assert "every answer is no" in garbage_problems({"value": 0.5, "yes_ratio": 0.0}, [], varied)[0]
    # every answer one class is garbage whatever the headline (it used to pass above 50% "chance": POPE's headline is
    # F1, 66.7% for answering yes to everything); fewer than 10 answers are too few to say so
    assert "every answer is yes" in garbage_problems({"metric": "f1", "value": 0.667, "yes_ratio": 1.0}, [], varied)[0]
    assert garbage_problems({"metric": "accuracy", "value": 0.6, "yes_ratio": 1.0}, [], varied[:9]) == []
    assert "unparsable" in garbage_problems({"value": 0.3, "grounding_unparsed": 0.6}, [], varied)[0]
    assert "60% of the answers are unparsable" in garbage_problems({"value": 0.3, "unparsed": 0.6}, [], varied)[0]


def test_the_table_shows_official_compat_gap_and_paper():
    summary = {"benchmark": "gqa", "title": "GQA", "split": "testdev", "n": 10, "metric": "accuracy", "value": 0.2,
               "scoring": "official", "extras": {"n": 10, "unparsed": 0.1},
               "scores": {"official": {"value": 0.2}, "tinygpt-v-compat": {"value": 0.275}},
               "paper": {"TinyGPT-V (paper v1)": 33.6, "InstructBLIP 13B": 49.5}, "backend": "torch:cpu",
               "model": "m", "warning": None}
    text = format_run(summary)
    assert "this run, official *" in text and "20.0" in text and "27.5" in text and "+7.5" in text
    assert "paper: TinyGPT-V (paper v1)" in text and "33.6" in text and "49.5" in text and "unparsed 10.0" in text
    row = format_table([summary]).splitlines()[1].split()
    assert row == ["m", "gqa", "testdev", "accuracy", "10", "20.0", "27.5", "+7.5", "33.6", "torch:cpu"]


# ---- the command lines ---------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_both_command_forms_and_a_killed_run(full_run, tmp_path, capsys):
    """python evaluate.py killed mid-run (SIGKILL), then `tinygpt evaluate` finishes it: the same summary."""
    from tinygpt.cli import main

    cfg, summary, text = full_run
    out = tmp_path / "out"
    options = ["--options", f"run.out_dir={out}", "run.batch_size=1"]
    first = subprocess.Popen([sys.executable, "evaluate.py", "--cfg-path", str(cfg), "--quiet", *options], cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and first.poll() is None:
        if (out / PREDICTIONS).is_file() and len((out / PREDICTIONS).read_text().splitlines()) >= 3:
            break
        time.sleep(0.02)
    first.send_signal(signal.SIGKILL)
    first.communicate(timeout=30)
    assert first.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    done = len((out / PREDICTIONS).read_text().splitlines()) - 1
    assert 2 <= done < summary["n"]
    assert main(["evaluate", "--cfg-path", str(cfg), "--quiet", *options]) == 0  # the console script's code path
    printed = capsys.readouterr().out
    assert "this run, official *" in printed and f"results: {out}/{SUMMARY}" in printed
    resumed = json.loads((out / SUMMARY).read_text())
    assert _without_timing(resumed) == _without_timing(summary)  # batch 1 against 4: the same answers
    assert resumed["timing"]["reused"] == done


def test_a_user_error_is_one_line_and_exit_2(tmp_path, capsys):
    from tinygpt.cli import main

    assert main(["evaluate", "--cfg-path", str(_file(tmp_path, "benchmark: {name: gpa}"))]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "benchmark.name must be one of" in err[0]


def test_the_default_synthetic_root_is_written_when_missing(tmp_path, monkeypatch, capsys):
    from tinygpt.cli.evaluate import _write_synthetic_files

    monkeypatch.setenv("TINYGPT_TINY_DATA", str(tmp_path / "data"))
    cfg = load_eval_config(ROOT / "eval_configs" / "pope.yaml", check_model=False)
    assert cfg.benchmark.root == str(tmp_path / "data" / "benchmarks" / "pope")
    _write_synthetic_files(load_eval_config(ROOT / "eval_configs" / "gqa.yaml", [f"benchmark.root={tmp_path / 'x'}"],
                                            check_model=False))
    assert not (tmp_path / "x").exists()  # not the default root: never written
    _write_synthetic_files(cfg)
    assert (tmp_path / "data" / "benchmarks" / "pope" / "coco_pope_random.json").is_file()
    assert len(get_benchmark("pope").load(Path(cfg.benchmark.root), "random", {})) > 0


def test_the_speed_bench_runs_both_batch_sizes_with_the_same_answers(chat_model, shapes_split):
    from tinygpt.chat.engine import ChatEngine
    from tinygpt.evaluation.bench import bench_rows

    engine = ChatEngine.from_model_dir(chat_model[0], device="cpu")
    rows = bench_rows({"torch": engine}, lambda e: get_benchmark("shapes").load(shapes_split, "held-out",
                                                                                {"limit": 1}), 3, repeat=1)
    assert [row[:3] for row in rows[1:]] == [["torch", "3", "3"], ["torch", "1", "3"]]
    assert [row[-1] for row in rows[1:]] == ["3/3", "3/3"] and rows[2][-2] == "1.00x"
