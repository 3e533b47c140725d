"""tinygpt.train.run_guard: a second run into the same checkpoint directory is refused while the first lives; a
checkpoint past the schedule, or one that does not exist, is refused before any model loads (also by --check);
a resume with other settings is named."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tinygpt.config import load_config
from tinygpt.errors import UserError
from tinygpt.train.run_guard import changed_settings, check_resume, run_fingerprint, run_lock

REPO = Path(__file__).resolve().parents[1]
STAGE1 = REPO / "train_configs" / "tiny" / "stage1.yaml"


def _cfg(tmp_path, *extra):
    return load_config(STAGE1, [f"run.output_dir={tmp_path / 'out'}", *extra])


def _checkpoint(tmp_path, at: int, **state) -> Path:
    """The checkpoint of step ``at``, which passes check_resume's file check: its files are stand-ins, recorded in
    state.json's manifest (check_resume checks sizes and sha256, loading no tensor); ``state``: more of state.json."""
    path = tmp_path / "out-checkpoints" / "checkpoints" / f"step_{at:08d}"
    path.mkdir(parents=True)
    files = {}
    for name in ("trainable.safetensors", "optimizer.pt", "rng_0.pt"):
        (path / name).write_bytes(name.encode())
        files[name] = {"bytes": len(name), "sha256": hashlib.sha256(name.encode()).hexdigest()}
    (path / "state.json").write_text(json.dumps({"step": at, "files": files, **state}))
    return path


def test_a_checkpoint_past_the_schedule_is_refused(tmp_path):
    found = _checkpoint(tmp_path, 80)
    assert check_resume(_cfg(tmp_path, "run.resume=auto")) == found
    with pytest.raises(UserError, match=r"run.resume: .*step_00000080 is at step 80, past schedule.total_steps 3"):
        check_resume(_cfg(tmp_path, "run.resume=auto", "schedule.total_steps=3", "schedule.warmup_steps=1"))
    assert check_resume(_cfg(tmp_path, "run.resume=false")) is None


def test_total_steps_lowered_to_a_stopped_runs_checkpoint_resumes_it(tmp_path):
    """A 10-step run killed at step 4, given total_steps 4 to end there: its checkpoint is no finished run's end
    (that refusal was for re-saving a finished run under other settings), so it resumes and writes its output."""
    options = ("run.resume=auto", "schedule.total_steps=4", "schedule.warmup_steps=1")
    fingerprint = run_fingerprint(_cfg(tmp_path, *options))
    stopped = _checkpoint(tmp_path, 4, fingerprint={**fingerprint, "schedule.total_steps": 10})
    assert check_resume(_cfg(tmp_path, *options)) == stopped
    other = tmp_path / "other"
    _checkpoint(other, 4, fingerprint={**fingerprint, "schedule.init_lr": 0.5})  # its own end, other settings
    with pytest.raises(UserError, match=r"is the end of a finished run \(step 4 of 4\), made with other settings"):
        check_resume(_cfg(other, *options))


def test_check_refuses_a_resume_path_that_is_no_checkpoint(tmp_path, monkeypatch, capsys):
    import tinygpt.config
    from tinygpt.cli.train import main

    monkeypatch.setattr(tinygpt.config, "check_paths", lambda cfg: None)  # the data folders: not this test's
    monkeypatch.setattr("tinygpt.train.stage.check_dataset_specs", lambda cfg: None)
    assert main(["--cfg-path", str(STAGE1), "--check", "--options", f"run.output_dir={tmp_path / 'out'}",
                 f"run.resume={tmp_path / 'none'}"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: --options: run.resume: {tmp_path / 'none'} does not exist"]
    (tmp_path / "empty").mkdir()
    assert main(["--cfg-path", str(STAGE1), "--check", "--options", f"run.output_dir={tmp_path / 'out'}",
                 f"run.resume={tmp_path / 'empty'}"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: --options: run.resume: {tmp_path / 'empty'} is not a checkpoint (no state.json)"]


def test_a_second_run_into_the_same_directory_is_refused_while_the_first_lives(tmp_path):
    cfg = _cfg(tmp_path)
    with run_lock(cfg):
        with pytest.raises(UserError, match=r"another run \(process \d+\) is training into .*out now"):
            with run_lock(cfg):
                pass
        with run_lock(cfg, is_main=False):  # the other processes of the same run take no lock
            pass
    with run_lock(cfg):  # released when the run ends
        pass
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom tinygpt.config import load_config\n"
                               "from tinygpt.train.run_guard import run_lock\n"
                               f"cfg = load_config({str(STAGE1)!r}, ['run.output_dir={tmp_path / 'out'}'])\n"
                               "with run_lock(cfg):\n    print('held', flush=True)\n    time.sleep(60)\n"],
                              cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UserError, match=rf"another run \(process {holder.pid}\)"):
            with run_lock(cfg):
                pass
    finally:
        holder.kill()
        holder.wait()
    with run_lock(cfg):  # a killed run leaves no stale lock
        pass


def test_the_settings_a_resume_changes_are_named(tmp_path):
    before = run_fingerprint(_cfg(tmp_path))
    after = run_fingerprint(_cfg(tmp_path, "schedule.init_lr=0.005", "data.datasets.laion.batch_size=4"))
    assert changed_settings(before, after) == ["schedule.init_lr: 0.001 -> 0.005",
                                               "data.datasets.laion.batch_size: 16 -> 4"]
    assert changed_settings(before, run_fingerprint(_cfg(tmp_path, f"vars.data_root={tmp_path}"))) == []
    assert changed_settings(None, after) == []  # a checkpoint written before fingerprints
