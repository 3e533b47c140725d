"""The run's training curve as a plain file: ``<checkpoint_dir>/metrics.jsonl``, one JSON object per log point.

    log = MetricsLog(Path(cfg.checkpoint_dir), start_step, replacing)  # main process only (train.progress.Progress)
    log.add({"step": 100, "loss": 1.93, "lr": 1e-4, ...})     # at every run.log_every steps and at the last one
    log.commit()                                               # after the checkpoint that replaced the old run's
    log.close()                                                # then train.loss_chart draws loss.png beside it
    rows = read_metrics(path)                                  # what a chart or a notebook reads

Contract:
* a row: ``step`` (steps done), ``loss`` (the mean of the finite losses since the row before; null when there were
  none: every step since was skipped), ``lr``, ``samples_per_s``, ``peak_mem_gb``, ``skipped`` (steps skipped since
  the row before) and, for an MoE stage, its load shares; every row is flushed when written, so the file follows a
  run that is still going;
* it covers the whole run, resumes included: a run that resumes from step S keeps the rows up to S and drops the
  later ones (those steps are trained again and logged again); a run that starts at step 0 starts a new curve;
* it follows the checkpoints: while a run still keeps checkpoints it will replace (``replacing``: a fresh start over
  an earlier run's, or a resume from an older checkpoint; train.checkpoint.replaced_by), its rows go to
  ``metrics.jsonl.pending`` and metrics.jsonl stays the curve of the checkpoints that a stop would resume from;
  ``commit`` (after this run's first checkpoint) moves the pending rows into place; a pending file a stopped run
  left is removed by the next run;
* a line cut short by a kill is skipped when read (and dropped when a resumed run rewrites the file); a file is
  rewritten in one rename, so a kill leaves the old one or the new one, never half; a killed writer's temporaries
  are swept when the next run opens the log; a write that fails is a UserError naming the file, and closing after it
  raises nothing more.
Needs no package beyond the standard library, so no run needs TensorBoard or W&B to see its curve.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path

from ..io_utils import atomic_write_text, remove_stale_temporaries, writing

METRICS_FILE = "metrics.jsonl"
PENDING_FILE = METRICS_FILE + ".pending"
CHART_FILE = "loss.png"  # drawn by train.loss_chart


def read_metrics(path: str | Path) -> list[dict]:
    """The rows of a metrics.jsonl, in file order; lines that do not parse as a JSON object with an integer step
    (a line cut short by a kill) are skipped. A missing file is no rows."""
    rows = []
    try:
        lines = Path(path).read_text(encoding="utf-8", errors="replace").splitlines()
    except FileNotFoundError:
        return []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and not isinstance(row["step"], bool):
            rows.append(row)
    return rows


def _finite_or_none(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None  # strict JSON: no NaN / Infinity in the file
    return value


class MetricsLog:
    def __init__(self, directory: str | Path, start_step: int, replacing: bool = False):
        directory = Path(directory)
        self.final = directory / METRICS_FILE
        self.pending = replacing
        self.path = directory / PENDING_FILE if replacing else self.final
        kept = [row for row in read_metrics(self.final) if row["step"] <= start_step] if start_step else []
        with writing(self.path, "the training metrics log"):
            directory.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(directory, [METRICS_FILE, PENDING_FILE, CHART_FILE])  # a killed writer's
            (directory / PENDING_FILE).unlink(missing_ok=True)  # a stopped run's, never committed
            atomic_write_text(self.path, "".join(json.dumps(row) + "\n" for row in kept))
            self._file = open(self.path, "a", encoding="utf-8")

    def add(self, row: dict) -> None:
        line = json.dumps({key: _finite_or_none(value) for key, value in row.items()}, allow_nan=False)
        with writing(self.path, "the training metrics log"):
            self._file.write(line + "\n")
            self._file.flush()

    def commit(self) -> None:
        """The run's rows become metrics.jsonl (its first checkpoint replaced the old run's); a no-op after that."""
        if not self.pending:
            return
        with writing(self.final, "the training metrics log"):
            self._file.close()
            os.replace(self.path, self.final)
            self.path, self.pending = self.final, False
            self._file = open(self.path, "a", encoding="utf-8")

    def close(self) -> None:
        with contextlib.suppress(OSError):  # a failed write already raised its UserError; its data is not retried
            self._file.close()
