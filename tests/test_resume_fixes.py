"""Resume and interrupt fixes, checked without training: state.json's values and a checkpoint of another stage are
refused before any model loads, a dropped dataset is named, ``run.resume`` may name a ``checkpoints/`` folder,
``--check`` says where the run starts, and a kill while a checkpoint or an output folder is replaced or deleted
leaves nothing that resume picks or the sweep cannot repair. (The runs themselves: test_resume_fixes_runs.py.)"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from test_run_guard import REPO, STAGE1, _cfg, _checkpoint
from tinygpt.config import load_config
from tinygpt.errors import UserError
from tinygpt.train.run_guard import changed_settings, check_resume, run_fingerprint

STAGE2 = STAGE1.with_name("stage2.yaml")


# ------------------------------------------------------------------ 5: state.json's values
@pytest.mark.parametrize("state, problem", [
    ({"step": 9}, "step is 9, but the directory is step_00000008"),
    ({"skipped_steps": None}, "skipped_steps is None, not an integer >= 0"),
    ({"data": {"0": {"restart_step": "x"}}}, "data.0.restart_step is 'x', not an integer >= 0"),
    ({"data": []}, "data is [], not an object of data positions by process ('0', ...)"),
    ({"fingerprint": 5}, "fingerprint is 5, not an object of settings or null"),
    ({"seconds": -1}, "seconds is -1, not a number >= 0"),
    ({"bad_records": {"x": [{"source": "a", "what": "images", "bad": 1}]}},
     "bad_records is {'x': [{'source': 'a', 'what': 'images', 'bad': 1}]}, not an object of per-dataset lists of "
     "{source, what, bad, seen} counts"),
])
def test_state_json_values_are_checked_before_the_model_loads(state, problem, tmp_path):
    previous = _checkpoint(tmp_path, 4)
    damaged = _checkpoint(tmp_path, 8, **state)
    with pytest.raises(UserError) as info:  # named: an error (auto / true would go back to step 4, test_resume_damaged)
        check_resume(_cfg(tmp_path, f"run.resume={damaged}"))
    assert str(info.value) == (f"{damaged / 'state.json'}: damaged checkpoint file ({problem}); resume from the "
                               f"previous checkpoint with --options run.resume={previous}")


def test_a_manifest_without_the_checkpoint_files_is_refused(tmp_path):
    path = _checkpoint(tmp_path, 2)
    state = json.loads((path / "state.json").read_text())
    del state["files"]["optimizer.pt"]
    (path / "state.json").write_text(json.dumps(state))
    with pytest.raises(UserError, match=r"state\.json: damaged checkpoint file \(its files list has no optimizer.pt"):
        check_resume(_cfg(tmp_path, f"run.resume={path}"))


# ------------------------------------------------------------------ 6: result-changing resumes
def test_a_dataset_dropped_from_the_config_is_named(tmp_path):
    before = run_fingerprint(_cfg(tmp_path))
    after = run_fingerprint(_cfg(tmp_path, "data.datasets.cc_sbu=null"))
    assert changed_settings(before, after) == ["data.datasets.cc_sbu.batch_size: 16 -> None",
                                               "data.datasets.cc_sbu.sample_ratio: 14.0 -> None"]


def test_a_checkpoint_of_another_stage_is_refused_before_the_model_loads(tmp_path):
    stage1 = {"config": str(STAGE1), "output_dir": str(tmp_path / "stage1"), "trainable": "stage1",
              "datasets": ["cc_sbu", "laion"]}
    found = _checkpoint(tmp_path, 2, stage=stage1)
    cfg = load_config(STAGE2, [f"run.output_dir={tmp_path / 'stage2'}", f"run.resume={found}"])
    with pytest.raises(UserError) as info:
        check_resume(cfg)
    assert str(info.value).startswith(
        f"--options: run.resume: {found} is a checkpoint of another stage: {STAGE1} wrote it into "
        f"{tmp_path / 'stage1'} (model.trainable stage1), this run is {STAGE2} into {tmp_path / 'stage2'} "
        "(model.trainable lora); ")
    # the same config into another output (a moved tree, a deliberate copy) and a checkpoint without the record pass
    assert check_resume(_cfg(tmp_path, f"run.resume={found}", f"run.output_dir={tmp_path / 'moved'}")) == found
    state = json.loads((found / "state.json").read_text())
    del state["stage"]
    (found / "state.json").write_text(json.dumps(state))
    assert check_resume(cfg) == found


# ------------------------------------------------------------------ 8, 7: naming what to resume, --check
def test_resume_may_name_the_folder_holding_the_step_dirs(tmp_path):
    _checkpoint(tmp_path, 2)
    newest = _checkpoint(tmp_path, 4)
    assert check_resume(_cfg(tmp_path, f"run.resume={newest.parent}")) == newest
    assert check_resume(_cfg(tmp_path, f"run.resume={newest.parent.parent}")) == newest


def test_check_says_where_the_run_starts(tmp_path, monkeypatch, capsys):
    import tinygpt.config
    from tinygpt.cli.train import main

    monkeypatch.setattr(tinygpt.config, "check_paths", lambda cfg: None)  # the data folders: not this test's
    monkeypatch.setattr("tinygpt.train.stage.check_dataset_specs", lambda cfg: None)
    check = ["--cfg-path", str(STAGE1), "--check", "--options", f"run.output_dir={tmp_path / 'out'}",
             "run.resume=auto"]
    assert main(check) == 0
    root = tmp_path / "out-checkpoints" / "checkpoints"
    assert capsys.readouterr().out.splitlines() == [f"no checkpoint in {root}: starting at step 0", f"{STAGE1}: ok"]
    found = _checkpoint(tmp_path, 4)
    assert main(check) == 0
    assert capsys.readouterr().out.splitlines() == [f"will resume from {found} (step 4)", f"{STAGE1}: ok"]


def test_the_interrupt_message_says_what_a_rerun_does(tmp_path):
    from tinygpt.train.interrupt import interrupt_message

    assert interrupt_message(_cfg(tmp_path, "run.resume=auto"), 2) == (
        "interrupted at step 2; no checkpoint yet: a rerun starts at step 0")
    found = _checkpoint(tmp_path, 2)
    assert interrupt_message(_cfg(tmp_path, "run.resume=auto"), 3) == (
        f"interrupted at step 3; rerun the same command to resume from {found} (step 2)")
    assert interrupt_message(_cfg(tmp_path, "run.resume=false"), 3) == (
        "interrupted at step 3; run.resume is false: a rerun of the same command starts at step 0 "
        f"(run.resume=auto resumes from {found} (step 2))")


# ------------------------------------------------------------------ 3: replacing and pruning checkpoints
@pytest.mark.parametrize("case", ["replace", "prune"])
def test_a_kill_while_a_checkpoint_is_deleted_leaves_none_half_deleted(case, tmp_path, monkeypatch):
    """The deletion of a replaced (same step) or pruned (past keep_last) checkpoint is cut short after its first
    file; every checkpoint resume can pick still reads, and the leftover is a ``step_*.tmp`` the next run sweeps."""
    from tinygpt.train import checkpoint as ckpt
    from tinygpt.train.loop import make_accelerator

    cfg = _cfg(tmp_path)
    accelerator = make_accelerator(cfg.run)
    model = torch.nn.Linear(4, 4)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 4)).sum().backward()
    optimizer.step()
    for step in (1, 2):
        ckpt.save_checkpoint(accelerator, model, optimizer, step, cfg.checkpoint_dir, {}, keep_last=5)
    real, cut = shutil.rmtree, []

    def cut_short(path, *args, **kwargs):  # a kill after the first file of a checkpoint that goes
        path = Path(path)
        if not cut and path.name.startswith("step_") and not path.name.endswith("0.tmp") and path.is_dir():
            cut.append(path)
            (path / "trainable.safetensors").unlink()
            raise KeyboardInterrupt
        return real(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", cut_short)
    step, keep = (2, 5) if case == "replace" else (3, 2)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(accelerator, model, optimizer, step, cfg.checkpoint_dir, {}, keep_last=keep)
    monkeypatch.setattr(shutil, "rmtree", real)
    assert cut
    for path in ckpt.list_checkpoints(cfg.checkpoint_dir):
        ckpt.read_checkpoint(path, 0, with_scaler=False)
    assert ckpt.list_checkpoints(cfg.checkpoint_dir)[-1].name == f"step_{step:08d}"
    ckpt.remove_temporaries(cfg.checkpoint_dir)
    assert not list(ckpt.checkpoints_root(cfg.checkpoint_dir).glob("*.tmp"))


# ------------------------------------------------------------------ 2: replacing an output folder
KILLED_REPLACE = textwrap.dedent("""
    import os, signal, sys
    from tinygpt import io_utils
    real = os.replace
    def replace(src, dst):
        if str(src).endswith('.tmp') and not str(src).endswith('.old.tmp'):  # the new folder, about to take its place
            os.kill(os.getpid(), signal.SIGKILL)
        return real(src, dst)
    io_utils.os.replace = replace
    with io_utils.atomic_dir(sys.argv[1]) as tmp:
        (tmp / 'weights').write_text('new')
""")


def test_a_kill_between_the_two_renames_of_an_output_puts_the_old_one_back(tmp_path):
    from tinygpt.io_utils import remove_stale_temporaries

    out = tmp_path / "stage1"
    out.mkdir()
    (out / "weights").write_text("old")
    proc = subprocess.run([sys.executable, "-c", KILLED_REPLACE, str(out)], cwd=REPO, timeout=120)
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()  # killed with the old folder moved aside and the new one not in its place
    asides = [p.name for p in tmp_path.iterdir() if p.name.endswith(".old.tmp")]
    assert len(asides) == 1 and re.fullmatch(r"\.stage1\.\d+\.old\.tmp", asides[0])  # a name the sweep knows
    remove_stale_temporaries(tmp_path, ["stage1"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stage1"] and (out / "weights").read_text() == "old"


def test_an_older_version_s_aside_folder_is_put_back_or_removed(tmp_path):
    from tinygpt.io_utils import remove_stale_temporaries

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    (tmp_path / f".stage1.old-{dead}").mkdir()  # what a kill between the renames left before this fix
    (tmp_path / f".stage1.old-{dead}" / "weights").write_text("old")
    (tmp_path / f".stage1.{dead}.abcdefgh.tmp").mkdir()
    remove_stale_temporaries(tmp_path, ["stage1"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stage1"]
    (tmp_path / f".stage1.{dead}.old.tmp").mkdir()  # the output is there: a leftover aside folder just goes
    assert remove_stale_temporaries(tmp_path, ["stage1"]) == [tmp_path / f".stage1.{dead}.old.tmp"]
    assert (tmp_path / "stage1" / "weights").read_text() == "old" and os.listdir(tmp_path) == ["stage1"]
