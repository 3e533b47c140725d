"""A damaged newest checkpoint: run.resume auto and true go back to the newest intact one with one warning naming each
damaged one and what is wrong with it (``--check`` says the same), and fail naming every checkpoint when none is
intact; a checkpoint run.resume names stays an error (test_resume_fixes). The damaged one is left as it is: keep_last
never removes the resumed run's own checkpoints to keep it, and the checkpoint of its step replaces it."""

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
    assert caplog.messages == [f"{damaged} is damaged (optimizer.pt: {SHA}); resuming from {intact} instead"]
    assert sorted(p.name for p in damaged.iterdir()) == ["optimizer.pt", "rng_0.pt", "state.json",
                                                          "trainable.safetensors"]  # left as it was


def test_with_no_intact_checkpoint_the_error_names_each(tmp_path):
    older = _checkpoint(tmp_path, 2)
    (older / "rng_0.pt").unlink()
    newer = damage(_checkpoint(tmp_path, 4))
    with pytest.raises(UserError) as info:
        check_resume(_cfg(tmp_path, "run.resume=auto"))
    assert str(info.value) == (
        f"--options: run.resume: no checkpoint in {older.parent} is intact: {newer} is damaged (optimizer.pt: {SHA}); "
        f"{older} is damaged (rng_0.pt: missing); start afresh with --options run.resume=false")


def test_a_resumed_run_replaces_the_damaged_checkpoints_and_keeps_its_own(trained, synthetic,  # noqa: F811
                                                                         base_model, tmp_path, monkeypatch, capsys,
                                                                         caplog):
    """The finished 3-step run with step 3 damaged and a damaged step 5 ahead of it, resumed (auto) to 5 steps with
    keep_last 1: --check and the run go back to step 2; the run, interrupted in step 5, has kept step 4 (not step 5,
    which is still the damaged one) and names it; the rerun resumes from it and replaces step 5."""
    from tinygpt.train import checkpoint as ckpt
    from tinygpt.train import loop

    root = copy_run(trained, tmp_path / "run")
    folder = root / "stage1-checkpoints" / "checkpoints"
    step3, step5 = damage(folder / "step_00000003"), folder / "step_00000005"
    shutil.copytree(step3, step5)
    (step5 / "state.json").write_text(json.dumps({**json.loads((step3 / "state.json").read_text()), "step": 5}))
    warning = (f"{step5} is damaged (optimizer.pt: {SHA}); {step3} is damaged (optimizer.pt: {SHA}); "
               f"resuming from {folder / 'step_00000002'} instead")
    opts = stage_options(synthetic, root, base_model, 5, run__save_every=1, run__keep_last=1, run__resume="auto")
    capsys.readouterr()
    caplog.set_level(logging.WARNING, logger="tinygpt.train")
    assert check_main(opts) == 0
    assert capsys.readouterr().out.splitlines()[0] == f"will resume from {folder / 'step_00000002'} (step 2)"
    assert caplog.messages == [warning]

    real, calls = loop.compute_loss, []

    def ctrl_c_in_step_5(model, batch, model_cfg):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(model, batch, model_cfg)

    monkeypatch.setattr(loop, "compute_loss", ctrl_c_in_step_5)
    caplog.clear()
    assert train_main(opts) == 130
    assert [m for m in caplog.messages if " is damaged " in m] == [warning]
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"interrupted at step 4; rerun the same command to resume from {folder / 'step_00000004'} (step 4)")
    assert steps_in(root) == ["step_00000004", "step_00000005"]  # step 3 replaced, then past keep_last
    with pytest.raises(UserError, match="damaged checkpoint file"):
        ckpt.verify_checkpoint(step5)

    monkeypatch.setattr(loop, "compute_loss", real)
    caplog.clear()
    assert train_main(opts) == 0
    assert [m for m in caplog.messages if " is damaged " in m] == [
        f"{step5} is damaged (optimizer.pt: {SHA}); resuming from {folder / 'step_00000004'} instead"]
    assert (summary_of(root)["start_step"], summary_of(root)["end_step"]) == (4, 5)
    assert steps_in(root) == ["step_00000005"]
    assert ckpt.verify_checkpoint(step5)["step"] == 5  # this run's own step 5 took the damaged one's place
