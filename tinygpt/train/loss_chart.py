"""The training curve as a picture: ``loss.png`` beside ``metrics.jsonl`` (train.metrics_log).

    python -m tinygpt.train.loss_chart outputs/stage1-checkpoints        # or the output dir, or the .jsonl file
    draw_loss_chart(rows, path, title)                                    # what a run calls when it ends

Contract:
* two panels over the steps: the loss (each row's mean since the one before; from 20 rows on faint, with a moving
  average over it; a red tick at the bottom where steps were skipped for a non-finite loss) and the learning rate;
* drawn with matplotlib's object API on the Agg canvas (pyplot's global backend is never touched, so a notebook that
  trains keeps its own), written in one rename;
* a run draws it when it ends (done, stopped or killed by Ctrl-C/SIGTERM); the command draws it at any time from the
  file a running job is writing (its metrics.jsonl.pending first, where there is one); a directory without rows is
  one ``error:`` line (exit 2).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import UserError
from ..io_utils import atomic_path, writing
from .metrics_log import CHART_FILE, METRICS_FILE, PENDING_FILE, read_metrics


SMOOTH_FROM = 20  # log points from which a smoothed line is drawn over the raw ones


def _smoothed(values: list[float]) -> list[float]:
    """A centred moving average (no lag behind a falling loss) over a window of about a twentieth of the points (at
    least five); the window shrinks at the ends."""
    half = max(2, len(values) // 40)
    return [sum(values[max(0, i - half): i + half + 1]) / len(values[max(0, i - half): i + half + 1])
            for i in range(len(values))]


def draw_loss_chart(rows: list[dict], path: str | Path, title: str = "") -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # lazy: only when a chart is drawn
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7.5, 4.6))
    FigureCanvasAgg(figure)
    top, bottom = figure.subplots(2, 1, sharex=True, height_ratios=(3, 1))
    losses = [(row["step"], row["loss"]) for row in rows if isinstance(row.get("loss"), (int, float))]
    if len(losses) >= SMOOTH_FROM:  # the rows as they are, faint, and their moving average over them
        top.plot(*zip(*losses), color="C0", linewidth=0.8, alpha=0.35, label="each log point")
        top.plot([step for step, _ in losses], _smoothed([loss for _, loss in losses]), color="C0", linewidth=1.6,
                 label="smoothed")
        top.legend(loc="upper right", fontsize=8, frameon=False)
    elif losses:
        top.plot(*zip(*losses), color="C0", linewidth=1.2, marker=".")
    skipped = [row["step"] for row in rows if row.get("skipped")]
    if skipped:
        top.plot(skipped, [0] * len(skipped), "|", color="C3", markersize=10, transform=top.get_xaxis_transform(),
                 label="steps skipped (non-finite loss)")
        top.legend(loc="upper right", fontsize=8, frameon=False)
    top.set_ylabel("training loss")
    top.set_title(title or "training loss", fontsize=10)
    top.grid(alpha=0.3)
    rates = [(row["step"], row["lr"]) for row in rows if isinstance(row.get("lr"), (int, float))]
    if rates:
        bottom.plot(*zip(*rates), color="C1", linewidth=1.0)
    bottom.set_ylabel("lr")
    bottom.set_xlabel("step")
    bottom.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    bottom.grid(alpha=0.3)
    figure.tight_layout()
    with writing(path, "the loss chart"), atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=100)


def metrics_file(where: str | Path) -> Path:
    """The metrics file that `where` names: the file, a checkpoint directory, or a stage's output directory (its
    ``<output_dir>-checkpoints`` holds the log by default). In a directory, a running job's metrics.jsonl.pending
    (a run that has not yet replaced an earlier run's checkpoints, train.metrics_log) comes before metrics.jsonl."""
    where = Path(where)
    if where.is_file():
        return where
    for folder in (where, Path(f"{str(where).rstrip('/')}-checkpoints")):
        for name in (PENDING_FILE, METRICS_FILE):
            if (folder / name).is_file():
                return folder / name
    raise UserError(f"{where}: no {METRICS_FILE} here nor in {where}-checkpoints/ (a run writes it into its "
                    "run.checkpoint_dir at every run.log_every steps)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tinygpt.train.loss_chart",
                                description="draw a run's loss and learning rate from its metrics.jsonl")
    p.add_argument("where", help="the run's checkpoint directory, its output directory, or the metrics.jsonl")
    p.add_argument("--out", default=None, help=f"the PNG to write (default: {CHART_FILE} beside the metrics file)")
    args = p.parse_args(argv)
    try:
        source = metrics_file(args.where)
        rows = read_metrics(source)
        if not rows:
            raise UserError(f"{source}: no rows yet (the first comes after run.log_every steps)")
        out = Path(args.out) if args.out else source.parent / CHART_FILE
        name = source.parent.name.removesuffix("-checkpoints")
        draw_loss_chart(rows, out, title=f"{name}: steps 1..{rows[-1]['step']}")
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    pending = " (a running job's pending rows: it has not yet replaced the earlier run's checkpoints)" \
        if source.name == PENDING_FILE else ""
    print(f"{out}: {len(rows)} points, steps {rows[0]['step']}..{rows[-1]['step']}{pending}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
