"""The printed tables of evaluation runs: this run's figures beside the published ones.

* :func:`format_run` (what ``evaluate.py`` prints): one run's headline under the official metric and under the
  original TinyGPT-V scorers (tinygpt-v-compat; both come from the same predictions), the gap between them, then the
  published figures of TinyGPT-V (paper v1) and its peers (``Benchmark.paper``), then the run's other scalar figures;
* :func:`format_table`: several runs, one row each
  (``python -m tinygpt.evaluation.report outputs/eval/*/summary.json``), named by their summary file's folder (the
  run's out_dir); the metric column names the official scoring's metric, and a note under the table the compat
  scoring's where it differs (``* vsr: the compat column is substring_accuracy``).

``--chart PNG`` draws the same runs as grouped bars (tinygpt.evaluation.report_chart).

A summary.json that does not parse, or parses into another shape, is one ``error: FILE: ...`` line (exit 2).
Garbage says so in both: the summary's ``warning``, or for a summary without one (written before a rule was added)
the runner's rules applied again to its saved figures (`garbage`): ``WARNING: ...`` under the run, `` WARNING``
after its backend in the table.

Figures are percentages with one decimal. The published figures were each scored by their own paper's scorer: the
TinyGPT-V ones by the lenient scorers that tinygpt-v-compat reproduces, so compare them with the compat column.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any, Optional, Sequence

from ..errors import UserError, report_errors

OFFICIAL, COMPAT = "official", "tinygpt-v-compat"
RUN_WIDTH = 18  # the run column's widest name; the table stays within 120 columns


def percent(value: Any) -> str:
    """A fraction as a percentage ("33.6"); "-" when missing or not a number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        return "-"
    return f"{100 * value:.1f}"


def _value(summary: dict, scoring: str) -> Optional[float]:
    return (summary.get("scores", {}).get(scoring) or {}).get("value")


def _gap(summary: dict) -> str:
    official, compat = _value(summary, OFFICIAL), _value(summary, COMPAT)
    if not isinstance(official, (int, float)) or not isinstance(compat, (int, float)):
        return "-"
    return f"{100 * (compat - official):+.1f}"


def paper_figure(paper: dict, model: str = "TinyGPT-V") -> Optional[float]:
    """The published figure of the first entry whose name starts with ``model`` (percent), or None."""
    return next((value for name, value in paper.items() if name.startswith(model)), None)


def text_table(rows: Sequence[Sequence[str]], right_from: int = 1, right_to: Optional[int] = None) -> list[str]:
    """Rows of cells as aligned lines: the columns from `right_from` up to `right_to` (excluded; default: all)
    right-aligned, the others left-aligned."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    end = len(widths) if right_to is None else right_to
    return ["  ".join(cell.rjust(w) if right_from <= i < end else cell.ljust(w) for i, (cell, w) in
                      enumerate(zip(row, widths))).rstrip() for row in rows]


def _metric(summary: dict, scoring: str) -> Optional[str]:
    """The metric of `scoring`'s figure (the summary's own ``metric`` is the headline scoring's)."""
    metric = (summary.get("scores", {}).get(scoring) or {}).get("metric")
    if metric is None and summary.get("scoring", OFFICIAL) == scoring:
        metric = summary.get("metric")
    return None if metric is None else str(metric)


def _compat_differs(summary: dict) -> Optional[str]:
    """The compat scoring's metric where it is not the official one, else None."""
    official, compat = _metric(summary, OFFICIAL), _metric(summary, COMPAT)
    return compat if compat and official and compat != official else None


def run_name(summary: dict, source: Optional[str | Path] = None) -> str:
    """What tells a run apart: its summary file's folder name (the run's out_dir), else its model path's last two
    parts; long names keep their end."""
    if source is not None:
        name = Path(source).parent.name or str(Path(source).parent)
    else:
        name = "/".join(Path(str(summary.get("model") or "-")).parts[-2:])
    return _shorten(name)


def _shorten(name: str) -> str:
    return name if len(name) <= RUN_WIDTH else "..." + name[-(RUN_WIDTH - 3):]


def run_names(summaries: Sequence[dict], sources: Sequence[str | Path]) -> list[str]:
    """A name per run: the summary files' folder names, with as many parent folders as it takes to tell them
    apart (``a/vqav2``, ``b/vqav2``)."""
    parents = [Path(p).resolve().parent for p in sources]
    for depth in range(1, max(len(p.parts) for p in parents) + 1):
        names = ["/".join(p.parts[-depth:]) for p in parents]
        if len(set(names)) == len(names):
            break
    return [_shorten(name) for name in names]


def format_run(summary: dict) -> str:
    """One run: its headline (official and compat, with the gap), the published figures, its other figures."""
    chosen = summary.get("scoring", OFFICIAL)
    head = (f"{summary.get('title', summary.get('benchmark'))}, split {summary.get('split')}: {summary.get('n')} "
            f"samples, {summary.get('backend')}, {summary.get('model')}")
    rows = [["", "%", "metric"]]
    for scoring in (OFFICIAL, COMPAT):
        scores = summary.get("scores", {}).get(scoring) or {}
        note = " (same as official)" if scoring == COMPAT and scores.get("compat") == "same as official" else ""
        mark = " *" if scoring == chosen else ""
        rows.append([f"this run, {scoring}{mark}", percent(scores.get("value")),
                     (_metric(summary, scoring) or "-") + note])
    rows.append(["gap, compat - official", _gap(summary), ""])
    for model, value in (summary.get("paper") or {}).items():
        rows.append([f"paper: {model}", _figure(value), "its paper's scorer"])
    lines = [head, *("  " + line for line in text_table(rows, right_to=2))]
    extras = [(k, v) for k, v in (summary.get("extras") or {}).items()
              if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "n"]
    if extras:
        lines.append("  also (" + chosen + "): " + ", ".join(
            f"{k} {percent(v) if 0 <= v <= 1 and not isinstance(v, int) else v}" for k, v in extras))
    if summary.get("paper"):
        lines.append("  (* the headline; published figures used each paper's own scorer: TinyGPT-V's is the "
                     "compat one)")
    if summary.get("synthetic") and summary.get("paper"):
        lines.append("  (synthetic files for the tiny model: the published figures are for the real benchmark)")
    warning = garbage(summary)
    if warning:
        lines.append(f"  WARNING: {warning}")
    return "\n".join(lines)


def garbage(summary: dict) -> Optional[str]:
    """The summary's garbage warning; for one without (written before a rule was added), the runner's rules
    (`runner.run_garbage`) applied again to its saved figures (the answers' own checks need predictions.jsonl)."""
    if summary.get("warning"):
        return str(summary["warning"])
    scores, headline = summary.get("scores") or {}, summary.get("scoring", OFFICIAL)
    if not isinstance(scores.get(OFFICIAL), dict) or not isinstance(scores.get(headline), dict):
        return None
    from .runner import run_garbage  # torch comes with it: only for a summary that has no warning

    return "; ".join(run_garbage(scores, headline, [], [])) or None


def _figure(value: Any) -> str:
    return f"{value:.1f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "-"


def format_table(summaries: Sequence[dict], runs: Optional[Sequence[str]] = None) -> str:
    """Several runs, one row each: the run (`runs`, default: the model path's end), benchmark, split, the official
    metric (``*``: the compat column has another, named under the table), n, official, compat, gap, TinyGPT-V's
    published figure, backend."""
    runs = list(runs) if runs is not None else [run_name(s) for s in summaries]
    rows = [["run", "benchmark", "split", "official metric", "n", "official", "compat", "gap", "paper", "backend"]]
    notes = []
    for run, s in zip(runs, summaries):
        other = _compat_differs(s)
        if other:
            notes.append(f"* {run}: the compat column is {other}")
        rows.append([run, str(s.get("benchmark")), str(s.get("split")),
                     (_metric(s, OFFICIAL) or "-") + (" *" if other else ""), str(s.get("n")),
                     percent(_value(s, OFFICIAL)), percent(_value(s, COMPAT)), _gap(s),
                     _figure(paper_figure(s.get("paper") or {})),
                     str(s.get("backend")) + (" WARNING" if garbage(s) else "")])
    table = text_table(rows, right_from=4, right_to=9)
    return "\n".join(table + notes + ["(paper: TinyGPT-V's published figure, scored like the compat column)"])


def read_summary(path: str | Path) -> dict:
    """A summary.json, its shape checked (what the tables read); anything else is a UserError naming the file."""
    path = Path(path)
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: no such summary (run `python evaluate.py --cfg-path ...` first)") from None
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: not a summary.json ({exc})") from None
    if not isinstance(summary, dict) or "scores" not in summary:
        raise UserError(f"{path}: not a summary.json written by tinygpt evaluate (no scores)")
    problem = _shape_problem(summary)
    if problem:
        raise UserError(f"{path}: not a summary.json written by tinygpt evaluate ({problem})")
    return summary


def _kind(value: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "a string"}.get(type(value), type(value).__name__)


def _shape_problem(summary: dict) -> Optional[str]:
    """What in `summary` is not the shape runner.py writes (the parts the tables read), or None."""
    if not isinstance(summary["scores"], dict):
        return f"scores: expected a mapping of scorings, got {_kind(summary['scores'])}"
    for scoring, scores in summary["scores"].items():
        if scores is not None and not isinstance(scores, dict):
            return f"scores.{scoring}: expected a mapping with metric and value, got {_kind(scores)}"
        value = (scores or {}).get("value")
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            return f"scores.{scoring}.value: expected a number, got {_kind(value)}"
    for key in ("paper", "extras"):
        if summary.get(key) is not None and not isinstance(summary[key], dict):
            return f"{key}: expected a mapping, got {_kind(summary[key])}"
    return None


def main(argv: list[str] | None = None, prog: str = "python -m tinygpt.evaluation.report") -> int:
    parser = argparse.ArgumentParser(prog=prog, description="Print evaluation runs (their summary.json) as a table.")
    parser.add_argument("summaries", nargs="+", help="summary.json files (e.g. outputs/eval/*/summary.json)")
    parser.add_argument("--chart", metavar="PNG", default=None,
                        help="also draw the runs as grouped bars (official, compat, paper) into this PNG")
    args = parser.parse_args(argv)

    def run() -> int:
        summaries = [read_summary(p) for p in args.summaries]
        runs = run_names(summaries, args.summaries)
        print(format_run(summaries[0]) if len(summaries) == 1 else format_table(summaries, runs))
        if args.chart:
            from .report_chart import draw_report_chart  # matplotlib only when asked for

            draw_report_chart(summaries, runs, args.chart)
            print(f"chart: {args.chart}")
        return 0

    return report_errors(run)


if __name__ == "__main__":
    raise SystemExit(main())
