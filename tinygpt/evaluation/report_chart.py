"""The evaluation table as a picture: ``python -m tinygpt.evaluation.report outputs/eval/*/summary.json --chart
runs.png``.

    draw_report_chart(summaries, runs, "runs.png")     # runs: the names report.run_names gives them

Contract:
* one group of bars per run (labelled with the run, and its benchmark where the run's name lacks it): the official
  scoring, the original TinyGPT-V's lenient scoring (tinygpt-v-compat) of the same predictions, and TinyGPT-V's
  published figure where the benchmark has one (scored like the compat bar); each bar carries its percentage, a
  missing figure has no bar;
* a run whose figures look like garbage (report.garbage) is labelled in red with "WARNING" and its own bars are
  hatched, so a chart of near-zero scores never reads as an ordinary result;
* drawn with matplotlib's object API on the Agg canvas (pyplot's global backend is never touched), written in one
  rename; a write failure is one error naming the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from ..io_utils import atomic_path, writing
from .report import COMPAT, OFFICIAL, _value, garbage, paper_figure

BARS = (("official", "C0"), ("tinygpt-v-compat (lenient)", "C1"), ("TinyGPT-V, paper", "C7"))


def _figures(summary: dict) -> list[float | None]:
    """Percentages of the three bars (None: no figure)."""
    values = [_value(summary, OFFICIAL), _value(summary, COMPAT)]
    shown = [100 * v if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v else None for v in values]
    paper = paper_figure(summary.get("paper") or {})
    return shown + [float(paper) if isinstance(paper, (int, float)) and not isinstance(paper, bool) else None]


def draw_report_chart(summaries: Sequence[dict], runs: Sequence[str], path: str | Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # lazy: only when a chart is asked for
    from matplotlib.figure import Figure

    figure = Figure(figsize=(max(6.0, 1.3 * len(summaries) + 2), 4.4))
    FigureCanvasAgg(figure)
    axis = figure.subplots()
    width = 0.8 / len(BARS)
    warned = [bool(garbage(s)) for s in summaries]
    figures = [_figures(s) for s in summaries]
    for i, (label, colour) in enumerate(BARS):
        for n, value in enumerate(row[i] for row in figures):
            if value is None:
                continue
            x = n + (i - (len(BARS) - 1) / 2) * width
            first = all(row[i] is None for row in figures[:n])  # the legend names each kind of bar once
            bad = warned[n] and i < 2  # this run's own bars; the paper's figure is not in doubt
            axis.bar(x, value, width, color=colour, label=label if first else None,
                     hatch="//" if bad else None, edgecolor="C3" if bad else colour)
            axis.text(x, value + 1, f"{value:.1f}", ha="center", va="bottom", fontsize=7)
    names = [run if str(s.get("benchmark")) in run else f"{run}\n{s.get('benchmark')}"
             for run, s in zip(runs, summaries)]
    axis.set_xticks(range(len(summaries)), [name + ("\nWARNING" if bad else "") for name, bad in zip(names, warned)],
                    fontsize=8)
    for tick, bad in zip(axis.get_xticklabels(), warned):
        if bad:
            tick.set_color("C3")
    axis.set_ylim(0, 110)
    axis.set_ylabel("%")
    axis.set_title("official scoring vs the original's lenient scoring of the same answers", fontsize=10)
    axis.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), fontsize=8, ncols=len(BARS), frameon=False)
    if any(warned):
        axis.text(0.01, 0.97, "WARNING (red, hatched): figures that look like garbage; see the table", color="C3",
                  fontsize=8, transform=axis.transAxes, va="top")
    figure.tight_layout()
    with writing(path, "the evaluation chart"), atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=100)
