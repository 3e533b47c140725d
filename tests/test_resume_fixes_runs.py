"""Resume and interrupt fixes, on tiny stage-1 runs (test_write_safety's finished 3-step run, copied): the last step
is checkpointed, so a finished run is not trained again, an extended or interrupted one goes on from its end, and a
kill during the final save costs no step; Ctrl-C and SIGTERM say where a rerun resumes; ``--check`` and the run
refuse a damaged checkpoint before the model loads."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from test_write_safety import STAGE1, copy_run, one_error, snapshot, stage_options, synthetic, train_main, trained  # noqa: F401,E501  (fixtures and helpers)


def no_model(*args, **kwargs):
    raise AssertionError("the model must not load")


def check_main(opts: list[str]) -> int:
    import train

    return train.main(["--quiet", "--cfg-path", str(STAGE1), "--check", "--options", *opts])


def summary_of(root: Path) -> dict:
    return json.loads((root / "stage1" / "train_summary.json").read_text())["summary"]


def steps_in(root: Path) -> list[str]:
    return sorted(p.name for p in (root / "stage1-checkpoints" / "checkpoints").iterdir())


# ------------------------------------------------------------------ 1: the end of a run is checkpointed
def test_a_finished_run_is_not_trained_again(trained, synthetic, base_model, tmp_path, monkeypatch,  # noqa: F811
                                             capsys):
    from tinygpt.train import stage

    root = copy_run(trained, tmp_path / "run")
    before = snapshot(root)
    monkeypatch.setattr(stage, "build_model", no_model)
    monkeypatch.setattr(stage, "make_accelerator", no_model)
    opts = stage_options(synthetic, root, base_model, 3, run__save_every=1, run__keep_last=2, run__resume="auto")
    capsys.readouterr()
    assert train_main(opts) == 0
    done = f"already complete: {root / 'stage1'} (step 3 of 3); run.resume=false retrains it"
    assert capsys.readouterr().out.splitlines() == [done]
    assert snapshot(root) == before
    assert check_main(opts) == 0
    assert capsys.readouterr().out.splitlines() == [done, f"{STAGE1}: ok"]
    # other settings: nothing is left to train, and re-saving the end under them would mislabel it: refused
    last = root / "stage1-checkpoints" / "checkpoints" / "step_00000003"
    assert check_main(opts + ["schedule.init_lr=0.002"]) == 2
    err = capsys.readouterr().err
    assert f"run.resume: {last} is the end of a finished run (step 3 of 3), made with other settings (" in err
    assert "retrain with run.resume=false, or raise schedule.total_steps" in err
    assert check_main(opts + ["schedule.total_steps=4"]) == 0  # going on from the end is fine
    assert capsys.readouterr().out.splitlines()[0] == f"will resume from {last} (step 3)"
    state = json.loads((last / "state.json").read_text())  # what tells this stage's checkpoints from another's
    assert state["stage"] == {"config": str(STAGE1), "output_dir": str(trained / "stage1"), "trainable": "stage1",
                              "datasets": ["cc_sbu", "laion"]}  # written before the copy: the same config passes


def test_a_finished_builtin_tiny_run_is_complete_for_check_too(trained, synthetic, base_model, tmp_path,  # noqa: F811
                                                                monkeypatch, capsys):
    """The checkpoint records the resolved backbones' directory: --check compared it with 'builtin:tiny' and refused
    a finished run as 'made with other settings'; the run itself missed its early finished-run check."""
    import tinygpt.tiny.backbones as backbones
    from tinygpt.train import stage

    root = copy_run(trained, tmp_path / "run")
    # built already, where the session's run started; nothing may be built
    monkeypatch.setattr(backbones, "ensure_tiny_backbones", lambda build=True: no_model() if build else base_model)
    monkeypatch.setattr(stage, "build_model", no_model)
    opts = stage_options(synthetic, root, "builtin:tiny", 3, run__save_every=1, run__keep_last=2, run__resume="auto")
    done = f"already complete: {root / 'stage1'} (step 3 of 3); run.resume=false retrains it"
    capsys.readouterr()
    assert check_main(opts) == 0
    assert capsys.readouterr().out.splitlines() == [done, f"{STAGE1}: ok"]
    assert train_main(opts) == 0
    assert capsys.readouterr().out.splitlines() == [done]


def test_a_finished_run_whose_output_was_damaged_writes_it_again(trained, synthetic, base_model,  # noqa: F811
                                                                 tmp_path, caplog):
    """A finished run whose output weights were cut short or deleted afterwards is not 'already complete': it resumes
    from its final checkpoint, trains no step and writes the same weights again (a later stage would otherwise
    fail to load them)."""
    root = copy_run(trained, tmp_path / "run")
    weights = root / "stage1" / "model.safetensors"
    before = weights.read_bytes()
    opts = stage_options(synthetic, root, base_model, 3, run__save_every=1, run__keep_last=2, run__resume="auto")
    for damage, said in ((lambda: weights.write_bytes(before[: len(before) // 2]), "unreadable (SafetensorError)"),
                         (weights.unlink, "missing")):
        damage()
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="tinygpt.train"):
            assert train_main(opts) == 0
        last = root / "stage1-checkpoints" / "checkpoints" / "step_00000003"
        line = f"{root / 'stage1'}: model.safetensors is {said}; writing the output again from {last}"
        assert line in caplog.messages
        assert weights.read_bytes() == before
        assert (summary_of(root)["start_step"], summary_of(root)["end_step"]) == (3, 3)  # no step trained


def test_an_output_an_earlier_run_wrote_is_not_this_runs(trained, synthetic, base_model, tmp_path,  # noqa: F811
                                                         caplog):
    """A retrain (run.resume=false, the same settings) stopped after its final checkpoint, before its output replaced
    the earlier run's: auto used to call it 'already complete' and keep the earlier model. train_summary.json names
    the final checkpoint's files (sizes, sha256), so the rerun writes this run's output from its checkpoint."""
    from safetensors.torch import load_file, save_file

    root = copy_run(trained, tmp_path / "run")
    summary_path = root / "stage1" / "train_summary.json"
    last = root / "stage1-checkpoints" / "checkpoints" / "step_00000003"
    record = json.loads(summary_path.read_text())
    assert record["checkpoint_files"] == json.loads((last / "state.json").read_text())["files"]
    weights = root / "stage1" / "model.safetensors"
    ours = weights.read_bytes()  # the earlier run's model differs: every tensor + 1
    earlier = dict(record, checkpoint_files={**record["checkpoint_files"], "optimizer.pt": {"bytes": 1,
                                                                                           "sha256": "0" * 64}})
    summary_path.write_text(json.dumps(earlier))
    tensors = load_file(str(weights))
    save_file({name: tensor + 1 for name, tensor in tensors.items()}, str(weights), metadata={"format": "pt"})
    opts = stage_options(synthetic, root, base_model, 3, run__save_every=1, run__keep_last=2, run__resume="auto")
    with caplog.at_level(logging.INFO, logger="tinygpt.train"):
        assert train_main(opts) == 0
    assert (f"{root / 'stage1'}: it is not the output of the run that wrote this checkpoint (a run stopped while "
            f"writing its output); writing the output again from {last}") in caplog.messages
    assert json.loads(summary_path.read_text())["checkpoint_files"] == record["checkpoint_files"]
    assert weights.read_bytes() == ours and summary_of(root)["start_step"] == 3


def test_an_extended_run_goes_on_from_its_end(trained, synthetic, base_model, tmp_path):  # noqa: F811
    root = copy_run(trained, tmp_path / "run")
    assert train_main(stage_options(synthetic, root, base_model, 4, run__save_every=3, run__resume="auto")) == 0
    assert (summary_of(root)["start_step"], summary_of(root)["end_step"]) == (3, 4)
    assert steps_in(root) == ["step_00000003", "step_00000004"]  # step 4 is no multiple of save_every: the end


def test_save_every_0_checkpoints_the_end(synthetic, base_model, tmp_path, caplog):  # noqa: F811
    opts = stage_options(synthetic, tmp_path, base_model, 2, run__save_every=0, run__resume="auto")
    with caplog.at_level(logging.INFO, logger="tinygpt.train"):
        assert train_main(opts) == 0
    assert steps_in(tmp_path) == ["step_00000002"]
    root = tmp_path / "stage1-checkpoints" / "checkpoints"
    assert f"no checkpoint in {root}: starting at step 0" in caplog.messages


# ------------------------------------------------------------------ 1, 2, 7: interrupted runs
class Terminated(Exception):
    """What SIGTERM raises here while no run handles it (its default would end pytest)."""


def test_sigterm_during_the_final_save_keeps_the_output_and_costs_no_step(trained, synthetic,  # noqa: F811
                                                                          base_model, tmp_path, monkeypatch, capsys):
    """SIGTERM while the new output is written: its temporary goes, the old output stays, the line says where a
    rerun resumes (the checkpoint of the last step), and the rerun trains nothing, sweeping a killed run's
    leftovers (an output temporary, a half-deleted checkpoint)."""
    from tinygpt.model import checkpoint_io

    root = copy_run(trained, tmp_path / "run")
    ckpts = root / "stage1-checkpoints" / "checkpoints"
    output_before = snapshot(root / "stage1")
    real = checkpoint_io.save_file

    def terminated(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    def raise_terminated(signum, frame):
        raise Terminated

    opts = stage_options(synthetic, root, base_model, 4, run__save_every=1, run__keep_last=2, run__resume="auto")
    monkeypatch.setattr(checkpoint_io, "save_file", terminated)
    previous = signal.signal(signal.SIGTERM, raise_terminated)
    try:
        capsys.readouterr()
        assert train_main(opts) == 143
    finally:
        signal.signal(signal.SIGTERM, previous)
    monkeypatch.setattr(checkpoint_io, "save_file", real)
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"interrupted at step 4; rerun the same command to resume from {ckpts / 'step_00000004'} (step 4)")
    assert snapshot(root / "stage1") == output_before
    assert sorted(p.name for p in root.iterdir()) == ["stage1", "stage1-checkpoints"]

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    (root / f".stage1.{dead}.abcdefgh.tmp").mkdir()  # a killed run's output temporary
    (ckpts / "step_00000002.old.tmp").mkdir()  # a killed run's half-deleted checkpoint
    assert train_main(opts) == 0
    assert (summary_of(root)["start_step"], summary_of(root)["end_step"]) == (4, 4)
    assert sorted(p.name for p in root.iterdir()) == ["stage1", "stage1-checkpoints"]
    assert steps_in(root) == ["step_00000003", "step_00000004"]


def test_ctrl_c_says_where_a_rerun_resumes(trained, synthetic, base_model, tmp_path, monkeypatch,  # noqa: F811
                                          capsys):
    from tinygpt.train import loop

    root = copy_run(trained, tmp_path / "run")
    real, calls = loop.compute_loss, []

    def ctrl_c_in_the_second_step(model, batch, model_cfg):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(model, batch, model_cfg)

    monkeypatch.setattr(loop, "compute_loss", ctrl_c_in_the_second_step)
    capsys.readouterr()
    assert train_main(stage_options(synthetic, root, base_model, 5, run__save_every=1, run__resume="auto")) == 130
    last = root / "stage1-checkpoints" / "checkpoints" / "step_00000004"
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"interrupted at step 4; rerun the same command to resume from {last} (step 4)")


# ------------------------------------------------------------------ 4: damaged checkpoints, before the model loads
@pytest.mark.parametrize("manifest", [True, False])
def test_a_damaged_checkpoint_is_refused_before_the_model_loads(manifest, trained, synthetic,  # noqa: F811
                                                                base_model, tmp_path, monkeypatch, capsys):
    """A truncated optimizer.pt in the checkpoint run.resume names: caught by its sha256 record, or (a checkpoint from
    before the record) by reading it; by --check and by the run, before any model loads. (auto and true go back to
    the newest intact checkpoint instead: test_resume_damaged.py.)"""
    from tinygpt.train import stage

    root = copy_run(trained, tmp_path / "run")
    ckpts = root / "stage1-checkpoints" / "checkpoints"
    damaged = ckpts / "step_00000003" / "optimizer.pt"
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])
    if not manifest:
        state = json.loads((damaged.parent / "state.json").read_text())
        del state["files"]
        (damaged.parent / "state.json").write_text(json.dumps(state))
    monkeypatch.setattr(stage, "build_model", no_model)
    opts = stage_options(synthetic, root, base_model, 4, run__save_every=1, run__resume=damaged.parent)
    for command in (check_main, train_main):
        capsys.readouterr()
        assert command(opts) == 2
        line = one_error(capsys.readouterr().err)
        assert line.startswith(f"error: {damaged}: damaged checkpoint file")
        assert f"run.resume={ckpts / 'step_00000002'}" in line
