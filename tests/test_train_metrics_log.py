"""A run's curve without TensorBoard or W&B: ``<checkpoint_dir>/metrics.jsonl`` (a row per log point, resumes
included, rows past the resumed checkpoint dropped) and ``loss.png`` drawn when the run ends, stopped runs included;
``python -m tinygpt.train.loss_chart`` draws it from a running job's file."""

from __future__ import annotations

import json
import math

import pytest
from PIL import Image

from test_resume_summary import interrupted_in_step
from test_train_messages import fresh_accelerate_state, run_stage1, stage_options, write_jsonl  # noqa: F401
from tinygpt.train.loss_chart import main as chart_main
from tinygpt.train.metrics_log import METRICS_FILE, PENDING_FILE, MetricsLog, read_metrics


def test_a_fresh_run_starts_a_new_file_and_a_resumed_one_keeps_the_rows_up_to_its_checkpoint(tmp_path):
    (tmp_path / METRICS_FILE).write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in (1, 2, 3))
                                         + '{"step": 4, "lo')  # the last line cut short by a kill
    log = MetricsLog(tmp_path, start_step=2)
    log.add({"step": 3, "loss": float("nan"), "lr": 1e-3})
    log.close()
    rows = read_metrics(tmp_path / METRICS_FILE)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[2] == {"step": 3, "loss": None, "lr": 1e-3}  # strict JSON: a NaN is written as null
    assert "NaN" not in (tmp_path / METRICS_FILE).read_text()
    MetricsLog(tmp_path, start_step=0).close()
    assert read_metrics(tmp_path / METRICS_FILE) == []


def test_lines_that_are_not_rows_are_skipped(tmp_path):
    path = tmp_path / METRICS_FILE
    path.write_text('[1, 2]\n{"step": "3"}\n{"step": true}\nnot json\n{"step": 5, "loss": 0.5}\n')
    assert read_metrics(path) == [{"step": 5, "loss": 0.5}]
    assert read_metrics(tmp_path / "missing.jsonl") == []


def test_the_chart_command_names_what_is_missing(tmp_path, capsys):
    assert chart_main([str(tmp_path / "run")]) == 2
    assert f"error: {tmp_path / 'run'}: no metrics.jsonl here nor in {tmp_path / 'run'}-checkpoints/" in \
        capsys.readouterr().err
    (tmp_path / "run-checkpoints").mkdir()
    (tmp_path / "run-checkpoints" / METRICS_FILE).write_text("")
    assert chart_main([str(tmp_path / "run")]) == 2
    assert "no rows yet" in capsys.readouterr().err
    (tmp_path / "run-checkpoints" / METRICS_FILE).write_text('{"step": 1, "loss": 2.0, "lr": 0.001}\n'
                                                            '{"step": 2, "loss": null, "lr": 0.002, "skipped": 1}\n')
    assert chart_main([str(tmp_path / "run"), "--out", str(tmp_path / "curve.png")]) == 0
    assert "curve.png: 2 points, steps 1..2" in capsys.readouterr().out
    with Image.open(tmp_path / "curve.png") as image:
        assert image.format == "PNG" and image.width > 400


def _run_opts(tmp_path, base_model, data, name: str, *extra: str) -> list[str]:
    return stage_options(tmp_path / name, base_model, data, steps=4, run__log_every=1, run__save_every=2,
                         data__num_workers=0) + list(extra)


def test_a_run_logs_every_step_and_draws_its_curve_and_a_resumed_run_continues_it(tmp_path, base_model, monkeypatch):
    """4 steps logged at every step: straight, and stopped by Ctrl-C in step 4 (after the checkpoint of step 2, with
    step 3 logged) then resumed: the resumed file holds steps 1..4 once each, with the straight run's losses."""
    data = write_jsonl(tmp_path / "data", 24)
    run_stage1(_run_opts(tmp_path, base_model, data, "straight"))
    checkpoints = tmp_path / "straight" / "out" / "stage1-checkpoints"
    straight = read_metrics(checkpoints / METRICS_FILE)
    assert [r["step"] for r in straight] == [1, 2, 3, 4]
    assert all(math.isfinite(r["loss"]) and r["lr"] > 0 and r["skipped"] == 0 for r in straight)
    summary = json.loads((tmp_path / "straight" / "out" / "stage1" / "train_summary.json").read_text())["summary"]
    assert straight[-1]["loss"] == pytest.approx(summary["last_loss"])
    with Image.open(checkpoints / "loss.png") as image:
        assert image.format == "PNG"

    interrupted_in_step(_run_opts(tmp_path, base_model, data, "resumed"), monkeypatch, step=4)
    checkpoints = tmp_path / "resumed" / "out" / "stage1-checkpoints"
    assert [r["step"] for r in read_metrics(checkpoints / METRICS_FILE)] == [1, 2, 3]
    assert (checkpoints / "loss.png").is_file()  # drawn by the stopped run too

    run_stage1(_run_opts(tmp_path, base_model, data, "resumed", "run.resume=auto"))
    resumed = read_metrics(checkpoints / METRICS_FILE)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]  # step 3 of the stopped segment dropped, logged again
    assert [r["loss"] for r in resumed] == pytest.approx([r["loss"] for r in straight], abs=1e-6)


def test_a_killed_writers_temporaries_are_swept_when_the_next_run_opens_the_log(tmp_path):
    dead = 2**22 + 12345  # above the default pid_max: no live process
    left = [tmp_path / f".metrics.jsonl.{dead}.abc.tmp", tmp_path / f".loss.png.{dead}.def.tmp"]
    for path in left:
        path.write_text("half")
    other = tmp_path / f".train_summary.json.{dead}.ghi.tmp"
    other.write_text("not ours")
    MetricsLog(tmp_path, start_step=0).close()
    assert not any(p.exists() for p in left) and other.exists()


def test_the_smoothed_line_follows_the_loss_without_lag():
    from tinygpt.train.loss_chart import _smoothed

    falling = [100.0 - i for i in range(80)]  # a centred window: the interior of a straight line is unchanged
    assert _smoothed(falling)[2:-2] == pytest.approx(falling[2:-2])
    noisy = [1.0 + (0.5 if i % 2 else -0.5) for i in range(80)]
    assert max(abs(v - 1.0) for v in _smoothed(noisy)[2:-2]) == pytest.approx(0.1)  # ±0.5 over a window of 5


def test_a_run_that_replaces_checkpoints_keeps_the_old_curve_until_its_first_checkpoint(tmp_path):
    old = "".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (1, 2, 3))
    (tmp_path / METRICS_FILE).write_text(old)
    log = MetricsLog(tmp_path, start_step=0, replacing=True)  # a fresh start over the old run's checkpoints
    log.add({"step": 1, "loss": 9.0})
    assert (tmp_path / METRICS_FILE).read_text() == old  # a stop now resumes the old run: its curve stays
    log.close()
    MetricsLog(tmp_path, start_step=2).close()  # ... as the next run, resuming the old run's step 2, finds it
    assert [r["loss"] for r in read_metrics(tmp_path / METRICS_FILE)] == [1.0, 1.0]
    assert not (tmp_path / PENDING_FILE).exists()  # the stopped run's pending rows are gone
    log = MetricsLog(tmp_path, start_step=0, replacing=True)
    log.add({"step": 1, "loss": 9.0})
    log.commit()  # its first checkpoint replaced the old run's
    log.add({"step": 2, "loss": 8.0})
    log.close()
    assert [r["loss"] for r in read_metrics(tmp_path / METRICS_FILE)] == [9.0, 8.0]
    assert not (tmp_path / PENDING_FILE).exists()


def test_closing_after_a_failed_write_raises_nothing_more(tmp_path):
    import errno

    from tinygpt.errors import UserError

    class FullDisk:
        closed = False

        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")

        def close(self):  # a buffered file flushes again when closed: the same error
            raise OSError(errno.ENOSPC, "No space left on device")

    log = MetricsLog(tmp_path, start_step=0)
    log._file.close()
    log._file = FullDisk()
    with pytest.raises(UserError, match=r"metrics.jsonl: could not write the training metrics log \(No space left"):
        log.add({"step": 1, "loss": 1.0})
    log.close()


def test_a_row_s_loss_is_the_mean_since_the_row_before(tmp_path):
    import torch

    from tinygpt.train.progress import Progress

    progress = Progress(total_steps=6, start_step=0, enabled=True, show_bar=False, device=torch.device("cpu"),
                        log_every=2, log_dir=tmp_path)
    for step, loss in enumerate([1.0, 1.0, None, 3.0, 5.0, 5.0]):  # None: a skipped step
        progress.step(step, loss, 1e-3, 2, {})
    progress.close()
    rows = read_metrics(tmp_path / METRICS_FILE)
    assert [(r["step"], r["loss"], r["skipped"]) for r in rows] == [(2, 1.0, 0), (4, 3.0, 1), (6, 5.0, 0)]
    assert (tmp_path / "loss.png").is_file()


def test_a_fresh_run_stopped_before_its_first_checkpoint_leaves_the_old_curve_to_resume(tmp_path, base_model,
                                                                                          monkeypatch):
    """The old run: stopped in step 4 after the checkpoint of step 2 (rows 1..3). A fresh run (run.resume=false) over
    it, stopped in its first step, then run.resume=auto: the old run resumes from step 2 with its rows 1..2."""
    data = write_jsonl(tmp_path / "data", 24)
    interrupted_in_step(_run_opts(tmp_path, base_model, data, "run"), monkeypatch, step=4)
    checkpoints = tmp_path / "run" / "out" / "stage1-checkpoints"
    old = read_metrics(checkpoints / METRICS_FILE)
    assert [r["step"] for r in old] == [1, 2, 3]
    interrupted_in_step(_run_opts(tmp_path, base_model, data, "run"), monkeypatch, step=1)
    assert read_metrics(checkpoints / METRICS_FILE) == old
    run_stage1(_run_opts(tmp_path, base_model, data, "run", "run.resume=auto"))
    resumed = read_metrics(checkpoints / METRICS_FILE)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4] and resumed[:2] == old[:2]
    assert not (checkpoints / PENDING_FILE).exists()


def test_a_stop_while_the_replaced_checkpoints_are_deleted_keeps_the_new_run_s_curve(tmp_path, base_model,
                                                                                    monkeypatch):
    """The curve was committed only after save_checkpoint returned: a stop while it deleted the replaced run's
    checkpoints (an rmtree of seconds at full size) left the new step_N to resume from with the old run's curve. Now
    it is committed as soon as step_N is in place."""
    from tinygpt.train import checkpoint as ckpt
    from tinygpt.train.interrupt import TrainingInterrupted

    data = write_jsonl(tmp_path / "data", 24)
    interrupted_in_step(_run_opts(tmp_path, base_model, data, "run", "run.save_every=1"), monkeypatch, step=4)
    checkpoints = tmp_path / "run" / "out" / "stage1-checkpoints"

    def stopped_while_deleting(path):
        ckpt._move_aside(path)
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt, "discard", stopped_while_deleting)
    with pytest.raises(TrainingInterrupted):  # a fresh run: its step_2 is in place, the old run's step_3 going
        run_stage1(_run_opts(tmp_path, base_model, data, "run"))
    monkeypatch.undo()
    new = read_metrics(checkpoints / METRICS_FILE)
    assert [r["step"] for r in new] == [1, 2] and not (checkpoints / PENDING_FILE).exists()
    run_stage1(_run_opts(tmp_path, base_model, data, "run", "run.resume=auto"))  # resumes the new run's step_2
    assert read_metrics(checkpoints / METRICS_FILE)[:2] == new


def test_the_chart_command_draws_a_running_job_s_pending_rows(tmp_path, capsys):
    (tmp_path / METRICS_FILE).write_text('{"step": 1, "loss": 1.0}\n')  # the earlier run's
    log = MetricsLog(tmp_path, start_step=0, replacing=True)
    for step in range(1, 4):
        log.add({"step": step, "loss": 2.0, "lr": 1e-3})
    assert chart_main([str(tmp_path)]) == 0
    assert "3 points, steps 1..3 (a running job's pending rows" in capsys.readouterr().out
    log.close()


def test_a_progress_that_fails_to_open_its_curve_closes_what_it_opened(tmp_path):
    import torch

    from tinygpt.errors import UserError
    from tinygpt.train.progress import Progress

    (tmp_path / METRICS_FILE).mkdir()  # the log cannot be written
    opened = []

    class Bar:
        def __init__(self, *args, **kwargs):
            opened.append(self)
            self.closed = False

        def close(self):
            self.closed = True

    import tinygpt.train.progress as progress_module

    real = progress_module.tqdm
    progress_module.tqdm = Bar
    try:
        with pytest.raises(UserError, match="could not write the training metrics log"):
            Progress(total_steps=4, start_step=0, enabled=True, show_bar=True, device=torch.device("cpu"),
                     log_every=1, log_dir=tmp_path)
    finally:
        progress_module.tqdm = real
    assert len(opened) == 1 and opened[0].closed
