"""``python -m tinygpt.evaluation.report ... --chart PNG``: the runs as grouped bars (official, compat, paper), a run
whose figures look like garbage marked as such, a write failure one error line."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from tinygpt.evaluation import report, report_chart


def _summary(benchmark: str, official: float, compat: float, warning=None) -> dict:
    return {"benchmark": benchmark, "title": benchmark.upper(), "split": "val", "n": 10, "metric": "accuracy",
            "scoring": "official", "scores": {"official": {"metric": "accuracy", "value": official},
                                              "tinygpt-v-compat": {"metric": "accuracy", "value": compat}},
            "paper": {"TinyGPT-V (paper v1)": 33.6}, "backend": "torch:cpu", "model": "/x/outputs/stage4",
            "warning": warning}


def _write(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def test_the_chart_draws_every_run_and_marks_garbage(tmp_path, capsys, monkeypatch):
    files = [_write(tmp_path / "gqa" / "summary.json", _summary("gqa", 0.42, 0.51)),
             _write(tmp_path / "vsr" / "summary.json",
                    _summary("vsr", 0.003, 0.004, warning="near-zero scores: the model or its config is broken"))]
    drawn = {}
    real = report_chart.draw_report_chart

    def spy(summaries, runs, path):
        drawn.update(runs=list(runs), garbage=[bool(report.garbage(s)) for s in summaries],
                     bars=[report_chart._figures(s) for s in summaries])
        real(summaries, runs, path)

    monkeypatch.setattr(report_chart, "draw_report_chart", spy)
    out = tmp_path / "charts" / "runs.png"
    assert report.main([str(f) for f in files] + ["--chart", str(out)]) == 0
    assert f"chart: {out}" in capsys.readouterr().out
    assert drawn["runs"] == ["gqa", "vsr"] and drawn["garbage"] == [False, True]
    assert [[round(v, 6) for v in bars] for bars in drawn["bars"]] == [[42.0, 51.0, 33.6], [0.3, 0.4, 33.6]]
    with Image.open(out) as image:
        assert image.format == "PNG" and image.width >= 600
    assert [p.name for p in out.parent.iterdir()] == ["runs.png"]  # no temporary left


def test_a_missing_figure_has_no_bar():
    summary = _summary("pope", 0.8, None)
    summary["paper"] = {}
    assert report_chart._figures(summary) == [80.0, None, None]


def test_a_chart_that_cannot_be_written_is_one_error_line(tmp_path, capsys):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the chart's folder should be")
    summary = _write(tmp_path / "gqa" / "summary.json", _summary("gqa", 0.42, 0.51))
    assert report.main([str(summary), "--chart", str(blocker / "runs.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {blocker / 'runs.png'}: could not write the evaluation chart (") and \
        err.count("\n") == 1
