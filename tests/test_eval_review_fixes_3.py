"""Review fixes (3) of the evaluation paths: what lmms-eval really does with the plugin's answers (multiple-choice
picks the lowest loss, is_greedy at a token boundary, repeats of a sampled request, temperature 0 / top_k 1, a
numeric device); garbage flagged on every printed path (the lmms plugin, the speed bench, the report of a summary
without a warning); user errors of evaluate.py and the bench (a training config, a taken run.out_dir, a bad
--device) as one line, before anything is written."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

from test_eval_report_and_errors import _summary, _write
from test_evaluate import ROOT, shapes_split  # noqa: F401, F811 (a fixture)
from test_lmms_model import (DOCS, GREEDY, QUESTIONS, FakeRequest, StubEngine, _gen, _plugin, _visual,
                             evaluator_view)
from tinygpt.chat import ChatEngine, GenerationSettings
from tinygpt.evaluation import lmms_model
from tinygpt.evaluation.benchmark import Prediction
from tinygpt.evaluation.lmms_model import request_messages


class ScoringStub(StubEngine):
    """A stand-in engine with fixed log-probabilities per candidate and a fixed greedy answer."""

    def __init__(self, logprobs: dict, answer: str = "yes"):
        super().__init__(answer=answer)
        self.logprobs = logprobs

    def score(self, messages, candidates):
        return [self.logprobs[c] for c in candidates]

    def chat(self, messages, settings=None):
        self.calls.append((messages[0]["content"][-1]["text"], settings, 1))
        return self.answer


def _choices(plugin, choices, question="Is there a cat?"):
    """lmms-eval's multiple_choice requests of one document: (ctx, target_delimiter + choice, ...) per choice."""
    return evaluator_view(plugin.loglikelihood([FakeRequest((question, f" {c}", _visual, 0, "t", "test"))
                                                for c in choices]))


# ------------------------------------------------------------------------------------------------ loglikelihood
def test_lmms_eval_multiple_choice_picks_the_likeliest_choice():
    """lmms-eval's task.py: ``pred = np.argmin(lls)``, ``pred_norm = np.argmin(lls / completion_len)`` (its models
    return the loss); a log-probability there picked the least likely choice."""
    choices = ["no", "yes", "maybe"]
    plugin = _plugin(ScoringStub({"no": -4.0, "yes": -0.2, "maybe": -9.0}))
    results = _choices(plugin, choices)
    lls = np.array([ll for ll, _ in results])
    assert int(np.argmin(lls)) == 1
    assert int(np.argmin(lls / np.array([float(len(c)) for c in choices]))) == 1
    assert list(lls) == [4.0, 0.2, 9.0]


def test_the_loss_is_minus_the_engine_score(chat_model):
    engine = ChatEngine.from_model_dir(chat_model[0], device="cpu")
    results = _choices(_plugin(engine), ["yes", "no"], QUESTIONS[1])
    want = engine.score(request_messages(QUESTIONS[1], [DOCS[0]["image"]]), ["yes", "no"])
    assert [ll for ll, _ in results] == pytest.approx([-w for w in want])
    assert all(ll >= 0 for ll, _ in results)


class _Chunks:
    """A stand-in backend's ``text_length``: BOS + tokens of up to 3 letters (a space joins the next), one per digit
    or other sign: "reddish" is "red" "dis" "h", "not sure" is "not" " su" "re"."""

    @staticmethod
    def text_length(text: str) -> int:
        return 1 + len(re.findall(r"\s?[A-Za-z]{1,3}|\s?\d|\s?[^\w\s]", text))


@pytest.mark.parametrize("answer, continuation, by_words, by_tokens", [
    ("not sure", "no", False, False), ("reddish", "red", False, True), ("12", "1", False, True),
    ("no", "no", True, True), ("no, it is not", "no", True, True), ("yes.", "yes", True, True),
    ("No", "no", False, False), ("a red car", "a re", False, False), ("cats", "cat", False, True),
])
def test_is_greedy_needs_the_continuation_to_end_where_a_token_does(answer, continuation, by_words, by_tokens):
    """lmms-eval's models: ``(greedy_tokens == cont_toks).all()``; a text prefix alone said "no" was the greedy
    "not sure"."""
    stub = ScoringStub({continuation: -1.0}, answer=answer)
    assert _choices(_plugin(stub), [continuation])[0][1] is by_words
    stub.backend = _Chunks()
    assert _choices(_plugin(stub), [continuation])[0][1] is by_tokens
    assert lmms_model.greedy_begins_with(answer, continuation) is by_words


# ------------------------------------------------------------------------------------------------ generate_until
def test_sampled_repeats_are_separate_draws():
    """lmms-eval's ``repeats`` (and ``--repeats``) hand the same Instance k times; with a fixed seed every copy was
    the same draw."""
    stub = StubEngine()
    sampled = _gen("q", 0, {"do_sample": True, "temperature": 0.7, "max_new_tokens": 4})
    greedy = _gen("g", 1, GREEDY)
    _plugin(stub).generate_until([sampled, sampled, greedy, sampled, greedy])
    seeds = {text: [s.seed for t, s, _ in stub.calls if t == text] for text in ("q", "g")}
    assert seeds == {"q": [0, 1, 2], "g": [0, 0]}
    other = _gen("q", 0, {"do_sample": True, "temperature": 0.7, "max_new_tokens": 4})  # another Instance
    _plugin(stub := StubEngine()).generate_until([sampled, other])
    assert [s.seed for _, s, _ in stub.calls] == [0, 0]


def test_sampled_repeats_answer_differently_on_the_tiny_model(chat_model):
    engine = ChatEngine.from_model_dir(chat_model[0], device="cpu")
    request = _gen(QUESTIONS[0], 0, {"do_sample": True, "temperature": 5.0, "top_p": 1.0, "max_new_tokens": 6})
    answers = _plugin(engine).generate_until([request] * 4)
    assert answers[0] == engine.chat(request_messages(QUESTIONS[0], [DOCS[0]["image"]]),
                                     GenerationSettings(temperature=5.0, top_p=1.0, max_new_tokens=6))
    assert len(set(answers)) > 1


# ------------------------------------------------------------------------------------------------ garbage
def test_the_plugin_says_so_when_every_answer_is_the_same(capsys):
    requests = [_gen(f"q{i}", i % 3) for i in range(10)]
    _plugin(ScoringStub({}, answer="red red red")).generate_until(requests)
    assert "WARNING: tinygpt generate_until" in capsys.readouterr().err
    _plugin(StubEngine()).generate_until(requests)  # numbered answers: all different
    _plugin(ScoringStub({}, answer="red red red")).generate_until(requests[:9])  # too few to say
    assert "WARNING" not in capsys.readouterr().err
    _choices(_plugin(ScoringStub({"yes": math.nan, "no": -1.0})), ["yes", "no"])
    assert "1 of 2 log-likelihoods are NaN" in capsys.readouterr().err


def test_the_speed_bench_says_when_the_answers_are_garbage(chat_model, shapes_split, capsys):  # noqa: F811
    """A broken model is fast too: the bench's table of a garbage model (the random tiny one) says so."""
    from tinygpt.evaluation import bench
    from tinygpt.evaluation.benchmarks import get_benchmark

    argv = ["--model", str(chat_model[0]), "--root", str(shapes_split), "--limit", "1", "--repeat", "1",
            "--batch-size", "2"]
    assert bench.main(argv) == 0
    printed = capsys.readouterr()
    assert "WARNING: torch:cpu: these answers look like garbage" in printed.out
    assert "under 5%" in printed.err
    shapes = get_benchmark("shapes")
    samples = shapes.load(shapes_split, "held-out", {"limit": 2})
    right = [Prediction(s.id, text=s.meta["box_text"] if s.box else s.answers[0]) for s in samples]
    warnings: list[str] = []
    bench.garbage_check(shapes, warnings)("oracle", samples, right)
    assert warnings == []


def test_the_report_flags_garbage_in_a_summary_written_without_a_warning(tmp_path, capsys):
    """A summary.json of an older run (warning null: the one-class rule fired only under 50% then) printed as an
    ordinary result; the report applies today's rules to its saved figures."""
    from tinygpt.evaluation.report import format_run, format_table, main

    pope = _summary("pope", ("f1", 0.667), ("f1", 0.667))
    pope["scores"]["official"].update({"yes_ratio": 1.0, "n": 20, "unparsed": 0.0})
    zero = _summary("gqa", ("exact_match", 0.01), ("substring_accuracy", 0.3))
    good = _summary("vqav2", ("vqa_accuracy", 0.6), ("vqa_accuracy", 0.6))
    assert "WARNING: every answer is yes" in format_run(pope)
    assert "WARNING: exact_match 1.0% is under 5%" in format_run(zero)
    assert "WARNING" not in format_run(good)
    flagged = [line.endswith("WARNING") for line in format_table([pope, zero, good]).splitlines()[1:4]]
    assert flagged == [True, True, False]
    paths = [_write(tmp_path / name / "summary.json", s) for name, s in (("a", pope), ("b", good))]
    assert main([str(p) for p in paths]) == 0
    assert capsys.readouterr().out.count("WARNING") == 1
    saved = {**zero, "warning": "all 12 generated answers are 'red'"}  # the run's own warning wins
    assert format_run(saved).count("WARNING") == 1 and "'red'" in format_run(saved)


# ------------------------------------------------------------------------------------------------ evaluate.py
def test_a_bad_out_dir_stops_evaluate_before_it_writes_anything(chat_model, tmp_path, monkeypatch, capsys):
    """run.out_dir a file: one error line, exit 2, and the default synthetic files are not written first."""
    from tinygpt.cli.evaluate import main

    monkeypatch.setenv("TINYGPT_TINY_DATA", str(tmp_path / "data"))
    taken = tmp_path / "taken"
    taken.write_text("mine\n")
    code = main(["--cfg-path", str(ROOT / "eval_configs" / "pope.yaml"), "--quiet", "--options",
                 f"model.path={chat_model[0]}", f"run.out_dir={taken}"])
    captured = capsys.readouterr()
    assert code == 2 and captured.out == ""
    assert captured.err.splitlines() == [f"error: --options run.out_dir: {taken} exists and is a file, not a "
                                         "directory; refusing to replace it with the evaluation results (choose "
                                         "another path)"]
    assert not (tmp_path / "data").exists() and taken.read_text() == "mine\n"


def test_temperature_zero_and_top_k_one_are_greedy():
    """The documented rule (temperature 0 is greedy, as lmms-eval's own models read it: ``do_sample = temperature >
    0``); {do_sample: true, temperature: 0} sampled at temperature 1."""
    from tinygpt.evaluation.lmms_model import generation_settings

    assert generation_settings({"do_sample": True, "temperature": 0.0}, GenerationSettings()).greedy
    assert generation_settings({"do_sample": True}, GenerationSettings()).temperature == 1.0
    # lsdbench's {temperature: 0.7, top_p: 0.001, top_k: 1}: top_k 1 is greedy, as transformers reads it
    assert generation_settings({"temperature": 0.7, "top_p": 0.001, "top_k": 1}, GenerationSettings()).greedy
    assert generation_settings({"temperature": 0.7, "top_k": 40}, GenerationSettings()).temperature == 0.7


@pytest.mark.parametrize("config", ["stage1.yaml", "tiny/stage4.yaml"])
def test_a_training_config_is_named_as_one(config, capsys):
    """train_configs/stage1.yaml as --cfg-path said "not valid YAML (Interpolation key 'vars.model_root' not
    found)"."""
    from tinygpt.cli.evaluate import main

    path = ROOT / "train_configs" / config
    assert main(["--cfg-path", str(path)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {path}: a training config for train.py")
    assert "eval_configs/<benchmark>.yaml" in err[0]


def test_a_numeric_device_is_a_user_error(chat_model, tmp_path):
    """lmms-eval turns ``device=0`` into the int 0 (``handle_arg_string``): with a model directory it became
    ``auto`` (``device or "auto"``), with a launch config a TypeError from re."""
    from tinygpt.errors import UserError

    config = tmp_path / "mine.yaml"
    config.write_text(f"model:\n  backend: torch\n  path: {chat_model[0]}\n")
    for pretrained in (chat_model[0], config):
        with pytest.raises(UserError, match="device: expected auto, cpu, cuda or cuda:N, got 0"):
            lmms_model.TinyGPTLmms(pretrained=str(pretrained), device=0)


def test_a_bad_bench_device_is_one_error_line(chat_model, shapes_split, capsys):  # noqa: F811
    """``--device gpu`` was a RuntimeError traceback from torch."""
    from tinygpt.evaluation import bench

    assert bench.main(["--model", str(chat_model[0]), "--root", str(shapes_split), "--device", "gpu"]) == 2
    assert capsys.readouterr().err == "error: --device: expected auto, cpu, cuda or cuda:N, got 'gpu'\n"
