"""A damaged newest checkpoint: run.resume auto and true go back to the newest intact one with one warning naming each
damaged one and what is wrong with it (``--check`` says the same), and fail naming every checkpoint when none is
intact; a checkpoint run.resume names stays an error (test_resume_fixes). The damaged ones, and the newer ones a
resume by path from an older checkpoint leaves, are of the run this one replaces: kept until the resumed run writes
its first checkpoint, then removed with it (the checkpoint of the same step replaces one), so a later auto takes the
resumed run's own. The interrupt line names what a rerun takes: auto's choice is the newest intact checkpoint."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from test_resume_fixes_runs import check_main, steps_in, summary_of
from test_run_guard import _cfg, _checkpoint
from test_write_safety import copy_run, stage_options, synthetic, train_main, trained  # noqa: F401  (fixtures)
from tinygpt.errors import UserError
from tinygpt.train.run_guard import check_resume

SHA = "its size or sha256 differs from state.json's record"


def damage(checkpoint: Path) -> Path:
    """Truncate the checkpoint's optimizer.pt (its manifest still records the whole file)."""
    file = checkpoint / "optimizer.pt"
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    return checkpoint


@pytest.mark.parametrize("resume", ["auto", "true"])
def test_auto_and_true_go_back_to_the_newest_intact_checkpoint(resume, tmp_path, caplog):
    intact = _checkpoint(tmp_path, 2)
    damaged = damage(_checkpoint(tmp_path, 4))
    with caplog.at_level(logging.WARNING, logger="tinygpt.train"):
        assert check_resume(_cfg(tmp_path, f"run.resume={resume}")) == intact
    assert caplog.messages == [f"{damaged} is damaged (optimizer.pt: {SHA}); resuming from {intact} instead; it is "
                               "kept until this run writes its first checkpoint, then removed"]
    assert sorted(p.name for p in damaged.iterdir()) == ["optimizer.pt", "rng_0.pt", "state.json",
                                                          "trainable.safetensors"]  # left as it was


def test_a_file_that_cannot_be_read_is_damage_and_auto_goes_back(tmp_path, monkeypatch, caplog):
    """A read error (a bad disk block, a file without read permission) while checking a checkpoint's files was a
    traceback; it is damage like a wrong sha256, so auto takes the checkpoint before it."""
    import errno

    from tinygpt.train import checkpoint

    intact = _checkpoint(tmp_path, 2)
    unreadable = _checkpoint(tmp_path, 4)
    real = checkpoint._digest

    def failing(path):
        if path == unreadable / "optimizer.pt":
            raise OSError(errno.EIO, "Input/output error", str(path))
        return real(path)

    monkeypatch.setattr(checkpoint, "_digest", failing)
    with caplog.at_level(logging.WARNING, logger="tinygpt.train"):
        assert check_resume(_cfg(tmp_path, "run.resume=auto")) == intact
    assert caplog.messages[0].startswith(f"{unreadable} is damaged (optimizer.pt: unreadable (Input/output error)); "
                                         f"resuming from {intact} instead")


def test_a_process_the_checkpoint_has_no_random_state_for_keeps_its_seed(trained, caplog):  # noqa: F811
    """A run of one process with grad_accum_steps 2 resumed by two processes with 1 (the same data, by design): the
    checkpoint has rng_0.pt only, and process 1 used to call it damaged (advising a fresh start) and stop, taking
    process 0 down with it. rng_0.pt stays required; a process it was not written for keeps run.seed's state."""
    from tinygpt.train.checkpoint import read_checkpoint

    last = trained / "stage1-checkpoints" / "checkpoints" / "step_00000003"
    assert read_checkpoint(last, 0, False)["rng"] is not None
    with caplog.at_level(logging.WARNING, logger="tinygpt.train"):
        loaded = read_checkpoint(last, 1, False)
    assert loaded["rng"] is None and loaded["weights"] and loaded["optimizer"]
    assert caplog.messages == [f"{last} holds no random state for process 1 (written by 1 process): that process "
                               "keeps the one run.seed gave it, and its dropout draws differ from an uninterrupted "
                               "run's"]


def test_with_no_intact_checkpoint_the_error_names_each(tmp_path):
    older = _checkpoint(tmp_path, 2)
    (older / "rng_0.pt").unlink()
    newer = damage(_checkpoint(tmp_path, 4))
    with pytest.raises(UserError) as info:
        check_resume(_cfg(tmp_path, "run.resume=auto"))
    assert str(info.value) == (
        f"--options: run.resume: no checkpoint in {older.parent} is intact: {newer} is damaged (optimizer.pt: {SHA}); "
        f"{older} is damaged (rng_0.pt: missing); start afresh with --options run.resume=false")


def test_a_path_to_an_older_checkpoint_names_the_newer_ones_as_replaced(tmp_path, caplog):
    older = _checkpoint(tmp_path, 2)
    _checkpoint(tmp_path, 4)
    damage(_checkpoint(tmp_path, 6))  # named too: it is not resumed from, only replaced
    with caplog.at_level(logging.WARNING, logger="tinygpt.train"):
        assert check_resume(_cfg(tmp_path, f"run.resume={older}")) == older
    assert caplog.messages == [
        f"resuming from step 2: the 2 newer checkpoints in {older.parent} (step_00000004, step_00000006) are of the "
        "run this one replaces: kept until this run writes its first checkpoint, then removed"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tinygpt.train"):
        assert check_resume(_cfg(tmp_path, f"run.resume={older.parent / 'step_00000004'}")).name == "step_00000004"
    assert caplog.messages == [
        f"resuming from step 4: the newer checkpoint in {older.parent} (step_00000006) is of the run this one "
        "replaces: kept until this run writes its first checkpoint, then removed"]


def test_the_interrupt_line_names_the_checkpoint_a_rerun_takes(tmp_path):
    """run.resume false or a path: auto's choice, the newest intact checkpoint (not a damaged newer one); a path before
    the run wrote a checkpoint: the same command resumes from that path again."""
    from tinygpt.train.interrupt import interrupt_message

    intact = _checkpoint(tmp_path, 2)
    damaged = damage(_checkpoint(tmp_path, 4))
    assert interrupt_message(_cfg(tmp_path, "run.resume=false"), 3) == (
        "interrupted at step 3; run.resume is false: a rerun of the same command starts at step 0 "
        f"(run.resume=auto resumes from {intact} (step 2))")
    path = _cfg(tmp_path, f"run.resume={intact}")
    assert interrupt_message(path, 5, damaged, wrote=True) == (  # this run's step 4, damaged since it was written
        f"interrupted at step 5; rerun with run.resume=auto to resume from {intact} (step 2)")
    assert interrupt_message(path, 3, intact) == (
        f"interrupted at step 3; rerun the same command to resume from {intact} (step 2)")


def ctrl_c_at_call(n: int, monkeypatch):
    """Ctrl-C in the n-th call of the loss (one per step here) of the next run."""
    from tinygpt.train import loop

    real, calls = loop.compute_loss, []

    def ctrl_c(model, batch, model_cfg):
        calls.append(1)
        if len(calls) == n:
            raise KeyboardInterrupt
        return real(model, batch, model_cfg)

    monkeypatch.setattr(loop, "compute_loss", ctrl_c)
    return real


def test_a_resume_by_path_from_an_older_checkpoint_replaces_the_newer_ones(trained, synthetic,  # noqa: F811
                                                                          base_model, tmp_path, monkeypatch, capsys,
                                                                          caplog):
    """The finished 3-step run (steps 2 and 3) with a step 5 ahead, resumed by path from step 2 to 4 steps: --check and
    the run name steps 3 and 5 as the replaced run's; stopped before its first checkpoint the run has removed nothing
    and a rerun resumes from step 2 again; stopped after it, its step 3 has replaced the old one and step 5 is gone,
    so the rerun with auto resumes from this run's step 3."""
    from tinygpt.train import loop

    root = copy_run(trained, tmp_path / "run")
    folder = root / "stage1-checkpoints" / "checkpoints"
    step2, step3, step5 = folder / "step_00000002", folder / "step_00000003", folder / "step_00000005"
    shutil.copytree(step3, step5)
    (step5 / "state.json").write_text(json.dumps({**json.loads((step3 / "state.json").read_text()), "step": 5}))
    line = (f"resuming from step 2: the 2 newer checkpoints in {folder} (step_00000003, step_00000005) are of the run "
            "this one replaces: kept until this run writes its first checkpoint, then removed")
    opts = stage_options(synthetic, root, base_model, 4, run__save_every=1, run__keep_last=2, run__resume=step2)
    capsys.readouterr()
    caplog.set_level(logging.WARNING, logger="tinygpt.train")
    assert check_main(opts) == 0
    assert capsys.readouterr().out.splitlines()[0] == f"will resume from {step2} (step 2)"
    assert caplog.messages == [line]

    real = ctrl_c_at_call(1, monkeypatch)  # in step 3: no checkpoint written yet
    caplog.clear()
    assert train_main(opts) == 130
    assert [m for m in caplog.messages if "newer checkpoint" in m] == [line]
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"interrupted at step 2; rerun the same command to resume from {step2} (step 2)")
    assert steps_in(root) == ["step_00000002", "step_00000003", "step_00000005"]

    monkeypatch.setattr(loop, "compute_loss", real)
    ctrl_c_at_call(2, monkeypatch)  # in step 4: step 3 written
    caplog.clear()
    assert train_main(opts) == 130
    assert [m for m in caplog.messages if "newer checkpoint" in m] == [line]
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"interrupted at step 3; rerun with run.resume=auto to resume from {step3} (step 3)")
    assert steps_in(root) == ["step_00000002", "step_00000003"]
    assert json.loads((step3 / "state.json").read_text())["fingerprint"]["schedule.total_steps"] == 4  # this run's

    monkeypatch.setattr(loop, "compute_loss", real)
    caplog.clear()
    assert train_main(opts[:-1] + ["run.resume=auto"]) == 0
    assert [m for m in caplog.messages if "newer checkpoint" in m or " is damaged " in m] == []
    assert (summary_of(root)["start_step"], summary_of(root)["end_step"]) == (3, 4)
    assert steps_in(root) == ["step_00000003", "step_00000004"]


def test_a_resumed_run_replaces_the_damaged_checkpoints_and_keeps_its_own(trained, synthetic,  # noqa: F811
                                                                         base_model, tmp_path, monkeypatch, capsys,
                                                                         caplog):
    """The finished 3-step run with step 3 damaged and a damaged step 5 ahead of it, resumed (auto) to 5 steps with
    keep_last 1: --check and the run go back to step 2; the damaged ones stay until the run writes its first
    checkpoint (its step 3 replaces the damaged one, step 5 goes with it); the run, interrupted in step 5, has kept
    step 4 and names it; the rerun resumes from it, warning about nothing."""
    from tinygpt.train import checkpoint as ckpt
    from tinygpt.train import loop

    root = copy_run(trained, tmp_path / "run")
    folder = root / "stage1-checkpoints" / "checkpoints"
    step3, step5 = damage(folder / "step_00000003"), folder / "step_00000005"
    shutil.copytree(step3, step5)
    (step5 / "state.json").write_text(json.dumps({**json.loads((step3 / "state.json").read_text()), "step": 5}))
    warning = (f"{step5} is damaged (optimizer.pt: {SHA}); {step3} is damaged (optimizer.pt: {SHA}); "
               f"resuming from {folder / 'step_00000002'} instead; they are kept until this run writes its first "
               "checkpoint, then removed")
    opts = stage_options(synthetic, root, base_model, 5, run__save_every=1, run__keep_last=1, run__resume="auto")
    capsys.readouterr()
    caplog.set_level(logging.WARNING, logger="tinygpt.train")
    assert check_main(opts) == 0
    assert capsys.readouterr().out.splitlines()[0] == f"will resume from {folder / 'step_00000002'} (step 2)"
    assert caplog.messages == [warning]

    seen, save = [], ckpt.save_checkpoint

    def spy(*args, **kwargs):
        seen.append(sorted(p.name for p in folder.iterdir()))
        return save(*args, **kwargs)

    monkeypatch.setattr(ckpt, "save_checkpoint", spy)
    real = ctrl_c_at_call(3, monkeypatch)  # in step 5
    caplog.clear()
    assert train_main(opts) == 130
    assert [m for m in caplog.messages if " is damaged " in m] == [warning]
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"interrupted at step 4; rerun the same command to resume from {folder / 'step_00000004'} (step 4)")
    assert seen[0] == ["step_00000002", "step_00000003", "step_00000005"]  # still there as step 3 is written
    assert steps_in(root) == ["step_00000004"]  # step 3 replaced, step 5 gone with it, then past keep_last

    monkeypatch.setattr(loop, "compute_loss", real)
    caplog.clear()
    assert train_main(opts) == 0
    assert [m for m in caplog.messages if " is damaged " in m] == []
    assert (summary_of(root)["start_step"], summary_of(root)["end_step"]) == (4, 5)
    assert steps_in(root) == ["step_00000005"]
    assert ckpt.verify_checkpoint(step5)["step"] == 5  # this run's own step 5
