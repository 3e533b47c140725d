"""The printed tables of evaluation runs: this run's figures beside the published ones.

* :func:`format_run` (what ``evaluate.py`` prints): one run's headline under the official metric and under the
  original TinyGPT-V scorers (tinygpt-v-compat; both come from the same predictions), the gap between them, then the
  published figures of TinyGPT-V (paper v1) and its peers (``Benchmark.paper``), then the run's other scalar figures;
* :func:`format_table`: several runs, one row each
  (``python -m tinygpt.evaluation.report outputs/eval/*/summary.json``).

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


def text_table(rows: Sequence[Sequence[str]], right_from: int = 1) -> list[str]:
    """Rows of cells as aligned lines: the first `right_from` columns left-aligned, the others right-aligned."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.rjust(w) if i >= right_from else cell.ljust(w) for i, (cell, w) in
                      enumerate(zip(row, widths))).rstrip() for row in rows]


def format_run(summary: dict) -> str:
    """One run: its headline (official and compat, with the gap), the published figures, its other figures."""
    chosen = summary.get("scoring", OFFICIAL)
    metric = summary.get("metric", "value")
    head = (f"{summary.get('title', summary.get('benchmark'))}, split {summary.get('split')}: {summary.get('n')} "
            f"samples, {summary.get('backend')}, {summary.get('model')}")
    rows = [["", metric]]
    for scoring in (OFFICIAL, COMPAT):
        scores = summary.get("scores", {}).get(scoring) or {}
        note = " (same as official)" if scoring == COMPAT and scores.get("compat") == "same as official" else ""
        mark = " *" if scoring == chosen else ""
        rows.append([f"this run, {scoring}{mark}", percent(scores.get("value")) + note])
    rows.append(["gap, compat - official", _gap(summary)])
    for model, value in (summary.get("paper") or {}).items():
        rows.append([f"paper: {model}", f"{value:.1f}" if isinstance(value, (int, float)) else "-"])
    lines = [head, *("  " + line for line in text_table(rows))]
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
    if summary.get("warning"):
        lines.append(f"  WARNING: {summary['warning']}")
    return "\n".join(lines)


def format_table(summaries: Sequence[dict]) -> str:
    """Several runs, one row each: n, metric, official, compat, gap, TinyGPT-V's published figure."""
    rows = [["benchmark", "split", "n", "metric", "official", "compat", "gap", "TinyGPT-V paper", "backend"]]
    for s in summaries:
        paper = paper_figure(s.get("paper") or {})
        rows.append([str(s.get("benchmark")), str(s.get("split")), str(s.get("n")), str(s.get("metric")),
                     percent(_value(s, OFFICIAL)), percent(_value(s, COMPAT)), _gap(s),
                     "-" if paper is None else f"{paper:.1f}",
                     str(s.get("backend")) + (" WARNING" if s.get("warning") else "")])
    return "\n".join(text_table(rows, right_from=2))


def read_summary(path: str | Path) -> dict:
    path = Path(path)
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: no such summary (run `python evaluate.py --cfg-path ...` first)") from None
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: not a summary.json ({exc})") from None
    if not isinstance(summary, dict) or "scores" not in summary:
        raise UserError(f"{path}: not a summary.json written by tinygpt evaluate (no scores)")
    return summary


def main(argv: list[str] | None = None, prog: str = "python -m tinygpt.evaluation.report") -> int:
    parser = argparse.ArgumentParser(prog=prog, description="Print evaluation runs (their summary.json) as a table.")
    parser.add_argument("summaries", nargs="+", help="summary.json files (e.g. outputs/eval/*/summary.json)")
    args = parser.parse_args(argv)

    def run() -> int:
        summaries = [read_summary(p) for p in args.summaries]
        print(format_run(summaries[0]) if len(summaries) == 1 else format_table(summaries))
        return 0

    return report_errors(run)


if __name__ == "__main__":
    raise SystemExit(main())
