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
from tinygpt.train.metrics_log import METRICS_FILE, MetricsLog, read_metrics


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
