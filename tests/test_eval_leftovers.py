"""Leftovers of `python evaluate.py` and the lmms-eval plugin: a run that fails before it writes any prediction
leaves no directory it made (and never touches one that was there); lmms-eval's ``--model_args pretrained=123``
(its parser turns "123" into an int) opens the directory ``123``, while a name it turns into a float or a bool is
refused with a hint; an out_dir that cannot be written (under a regular file, a regular file itself, or holding a
directory where a run's file goes: root can write anywhere, so no chmod) is one ``error:`` line naming run.out_dir
and the file, exit 2, before any model loads, with nothing written."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import save_decisive_tiny_model
from test_eval_runner_guards import _config, _Engine, _model
from tinygpt.errors import UserError
from tinygpt.evaluation import lmms_model, runner
from tinygpt.evaluation.config import load_eval_config
from tinygpt.evaluation.resume import LOCK, PREDICTIONS, SUMMARY
from tinygpt.evaluation.runner import run_evaluation

ROOT = Path(__file__).resolve().parents[1]


def _main(*options: str) -> int:
    from tinygpt.cli.evaluate import main

    return main(["--quiet", *options])


def _tree(path: Path) -> dict[str, bytes | None]:
    """Every file and folder under ``path`` (a folder: None), relative names."""
    return {str(p.relative_to(path)): (None if p.is_dir() else p.read_bytes()) for p in sorted(path.rglob("*"))}


class _Failing(_Engine):
    """A stand-in engine whose ``fail_at``-th batch raises (the first: no prediction written)."""

    def __init__(self, fail_at: int = 1):
        super().__init__()
        self.batches, self.fail_at = 0, fail_at

    def chat_batch(self, conversations, settings=None):
        self.batches += 1
        if self.batches >= self.fail_at:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return super().chat_batch(conversations, settings)


# ------------------------------------------------------------------------------------------------ 1. no leftovers
def test_a_model_that_fails_to_load_leaves_no_out_dir(tmp_path, capsys):
    """The weights are not a safetensors file: the run stops when the engine loads, after run.lock was taken; the
    folders it made for run.out_dir (two levels here) are gone again, only what was there before is left."""
    cfg = _config(tmp_path, _model(tmp_path / "m"))
    out = tmp_path / "made" / "by" / "run"
    before = _tree(tmp_path)
    code = _main("--cfg-path", str(cfg), "--options", f"run.out_dir={out}")
    err = capsys.readouterr().err.splitlines()
    assert code in (2, 3) and len(err) == 1 and err[0].startswith("error: ")
    assert not (tmp_path / "made").exists() and _tree(tmp_path) == before


def test_a_failed_run_leaves_an_existing_out_dir_as_it_was(tmp_path, capsys):
    """A folder that was there keeps everything it held (run.lock may stay beside it, as training leaves it)."""
    cfg = _config(tmp_path, _model(tmp_path / "m"))
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me\n")
    assert _main("--cfg-path", str(cfg), "--options", f"run.out_dir={out}") in (2, 3)
    assert {k: v for k, v in _tree(out).items() if k != LOCK} == {"notes.txt": b"keep me\n"}


@pytest.mark.parametrize("existing", [False, True])
def test_a_failure_in_the_first_batch_leaves_nothing_behind(tmp_path, existing):
    """The engine fails on its first batch: no prediction was written, so the predictions file (its header only)
    goes, and so does an out_dir the run made; a folder that was there stays."""
    cfg = load_eval_config(_config(tmp_path, _model(tmp_path / "m")), check_model=False)
    out = Path(cfg.run.out_dir)
    if existing:
        out.mkdir()
    with pytest.raises(RuntimeError, match="illegal memory access"):
        run_evaluation(cfg, engine=_Failing(), quiet=True)
    assert out.is_dir() == existing
    if existing:
        assert set(_tree(out)) <= {LOCK}


def test_a_failure_after_some_predictions_keeps_them_for_the_rerun(tmp_path, capsys):
    """The second batch fails: the first batch's predictions stay, and a rerun continues from them."""
    cfg = load_eval_config(_config(tmp_path, _model(tmp_path / "m")), check_model=False)
    out = Path(cfg.run.out_dir)
    with pytest.raises(RuntimeError):
        run_evaluation(cfg, engine=_Failing(fail_at=2), quiet=True)
    assert len((out / PREDICTIONS).read_text().splitlines()) == 1 + 2  # the header and batch 1 (batch_size 2)
    engine = _Engine()
    assert run_evaluation(cfg, engine=engine, quiet=True)["n"] == 6 and engine.asked == 4
    assert "resuming: 2 of 6 predictions" in capsys.readouterr().err


@pytest.mark.parametrize("broken", ["missing", "empty"])
def test_bad_benchmark_files_leave_no_out_dir(tmp_path, capsys, broken):
    """Missing or empty benchmark files are found before run.out_dir is made (this worked already)."""
    cfg = _config(tmp_path, _model(tmp_path / "m"))
    (tmp_path / "pope" / "coco_pope_random.json").write_text("") if broken == "empty" else shutil.rmtree(
        tmp_path / "pope")
    out = tmp_path / "new" / "out"
    assert _main("--cfg-path", str(cfg), "--options", f"run.out_dir={out}") == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and not (tmp_path / "new").exists()


# ------------------------------------------------------------------------------------------------ 2. pretrained=123
def handle_arg_string(arg: str):
    """lmms-eval's own parse of one ``--model_args`` value (lmms_eval/utils.py, handle_arg_string), copied: "true" /
    "false" in any case a bool, ``str.isnumeric()`` an int, else a float when ``float()`` takes it, else the text."""
    if arg.lower() == "true":
        return True
    if arg.lower() == "false":
        return False
    if arg.isnumeric():
        return int(arg)
    try:
        return float(arg)
    except ValueError:
        return arg


def _model_args(text: str) -> dict:
    """``--model_args`` as lmms-eval's simple_parse_args_string hands them to the model class (no quotes here)."""
    return {k: handle_arg_string(v) for k, v in (arg.split("=", 1) for arg in text.split(","))}


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory) -> Path:
    return save_decisive_tiny_model(tmp_path_factory.mktemp("lmms") / "model")


@pytest.mark.parametrize("name", ["123", "2024"])
def test_a_directory_named_like_a_number_opens(saved_model, tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(saved_model, tmp_path / name)
    args = _model_args(f"pretrained={name},device=cpu")
    assert args["pretrained"] == int(name)  # what lmms-eval hands over
    plugin = lmms_model.TinyGPTLmms(**args)
    assert plugin.engine.chat([{"role": "user", "content": "hi"}]) is not None


def test_a_launch_config_named_like_a_number_opens(saved_model, tmp_path, monkeypatch):
    """``7.yaml`` is no number to lmms-eval (this worked already)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "7.yaml").write_text(f"model:\n  backend: torch\n  path: {saved_model}\n  device: cpu\n")
    args = _model_args("pretrained=7.yaml")
    assert args["pretrained"] == "7.yaml" and lmms_model.TinyGPTLmms(**args).engine is not None


@pytest.mark.parametrize("typed", ["1e3", "1.50", "true", "False", "0123", "-5"])
def test_a_name_lmms_eval_cannot_give_back_is_refused_with_a_hint(saved_model, tmp_path, monkeypatch, typed):
    """A float or a bool has lost the spelling typed (1e3 is 1000.0, true is True), and so has an int with leading
    zeros (0123 is 123): refused, saying to write ``pretrained=./<name>``, even when the folder is there."""
    monkeypatch.chdir(tmp_path)
    shutil.copytree(saved_model, tmp_path / typed)
    args = _model_args(f"pretrained={typed}")
    assert not isinstance(args["pretrained"], str)
    with pytest.raises(UserError) as raised:
        lmms_model.TinyGPTLmms(**args)
    message = str(raised.value)
    assert message.startswith("--model_args pretrained: lmms-eval's --model_args parser read the ")
    assert f"pretrained=./{typed}" in message and "required" not in message
    assert lmms_model.TinyGPTLmms(**_model_args(f"pretrained=./{typed},device=cpu")).engine is not None


# ------------------------------------------------------------------------------------------------ 3. unwritable
@pytest.fixture
def no_model_load(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(runner, "open_engine", refuse)


@pytest.mark.parametrize("where", ["under_a_file", "a_file"])
def test_an_out_dir_that_cannot_be_a_directory_is_one_error_line(tmp_path, capsys, no_model_load, where):
    """Root writes through any permission bits, so the unwritable out_dir here is a regular file or lies under one
    (this worked already)."""
    cfg = _config(tmp_path, _model(tmp_path / "m"))
    taken = tmp_path / "taken"
    taken.write_text("mine\n")
    out = taken / "out" if where == "under_a_file" else taken
    before = _tree(tmp_path)
    assert _main("--cfg-path", str(cfg), "--options", f"run.out_dir={out}") == 2
    captured = capsys.readouterr()
    err = captured.err.splitlines()
    assert captured.out == "" and len(err) == 1 and err[0].startswith("error: --options run.out_dir: ")
    assert f"{taken} " in err[0] and "is a file" in err[0] and _tree(tmp_path) == before


def test_evaluate_py_under_a_regular_file_exits_2_without_a_traceback(tmp_path):
    cfg = _config(tmp_path, _model(tmp_path / "m"))
    taken = tmp_path / "taken"
    taken.write_text("mine\n")
    result = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), "--cfg-path", str(cfg), "--quiet",
                             "--options", f"run.out_dir={taken / 'out'}"], capture_output=True, text=True,
                            cwd=tmp_path, timeout=300)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == (f"error: --options run.out_dir: {taken} is a file, so {taken / 'out'} cannot be made as "
                             "a directory for the evaluation results\n")


@pytest.mark.parametrize("name", [LOCK, PREDICTIONS, SUMMARY])
def test_a_directory_where_a_run_file_goes_is_one_error_line_before_the_model_loads(tmp_path, capsys, no_model_load,
                                                                                    name):
    """``<out_dir>/run.lock`` a directory was an IsADirectoryError traceback; predictions.jsonl one was found only
    after the model loaded, summary.json one only after every prediction was made."""
    cfg = _config(tmp_path, _model(tmp_path / "m"))
    out = tmp_path / "out"
    (out / name).mkdir(parents=True)
    before = _tree(tmp_path)
    assert _main("--cfg-path", str(cfg), "--options", f"run.out_dir={out}") == 2
    captured = capsys.readouterr()
    err = captured.err.splitlines()
    assert captured.out == "" and err == [f"error: --options run.out_dir: {out / name} is a directory, not a file; "
                                          "move it away or choose another run.out_dir"]
    assert _tree(tmp_path) == before


def test_pope_stand_in_still_runs(tmp_path):
    """The fixtures above run through when nothing is wrong (a control for the failures)."""
    cfg = load_eval_config(_config(tmp_path, _model(tmp_path / "m")), check_model=False)
    assert run_evaluation(cfg, engine=_Engine(), quiet=True)["n"] == 6
    assert sorted(_tree(Path(cfg.run.out_dir))) == [PREDICTIONS, LOCK, SUMMARY]
