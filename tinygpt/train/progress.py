"""Progress of a run: a tqdm bar (step, loss, lr, samples/s, ETA, peak memory), log lines, the end summary, the
curve in ``<checkpoint_dir>/metrics.jsonl`` with its picture ``loss.png`` drawn when the run ends (train.metrics_log,
train.loss_chart), and optional TensorBoard / Weights & Biases logging (never a network call unless
``run.wandb_project`` is set).
Only the main process shows and logs anything. While steps are skipped (non-finite loss) the bar and the log line say
``loss skipped: non-finite (N in a row)`` instead of the mean of the last finite losses.
"""

from __future__ import annotations

import logging
import resource
import sys
import time
from collections import deque
from pathlib import Path
from typing import Optional

import torch
from tqdm.auto import tqdm

from ..errors import UserError
from .loss_chart import draw_loss_chart
from .metrics_log import CHART_FILE, MetricsLog, read_metrics

log = logging.getLogger("tinygpt.train")


def peak_memory_gb(device: torch.device) -> float:
    """Peak accelerator memory (GiB) on a GPU, else the process's peak resident memory."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class Progress:
    def __init__(self, *, total_steps: int, start_step: int, enabled: bool, show_bar: bool, device: torch.device,
                 log_every: int, log_dir: Optional[Path] = None, tensorboard: bool = False,
                 wandb_project: Optional[str] = None, run_name: str = "", config: Optional[dict] = None,
                 replacing: bool = False):
        """``replacing``: the run still keeps checkpoints it will replace (train.metrics_log: its curve stays pending
        until `checkpointed`)."""
        self.enabled, self.device, self.log_every = enabled, device, log_every
        self.total, self.start_step = total_steps, start_step
        self.started = time.monotonic()
        self.samples = 0
        self.recent: deque = deque(maxlen=50)        # (time, samples) for the samples/s figure
        self.losses: deque = deque(maxlen=log_every)  # the last finite losses (a skipped step adds none)
        self.skipped_in_a_row = 0                     # steps skipped since the last finite loss
        self.skipped_since_log = 0                    # steps skipped since the last log line
        self.losses_since_log: list = []              # the finite losses since the last log point (its row's mean)
        self.bar = None
        self.tb = None
        self.wandb = None
        self.curve = None
        self.run_name = run_name
        if not enabled:
            return
        try:
            self._open(show_bar, log_dir, tensorboard, wandb_project, config, replacing)
        except BaseException:  # what opened before the failure is closed again (threads, event files, a W&B run)
            self.close()
            raise

    def _open(self, show_bar: bool, log_dir: Optional[Path], tensorboard: bool, wandb_project: Optional[str],
              config: Optional[dict], replacing: bool) -> None:
        run_name = self.run_name
        if show_bar:
            self.bar = tqdm(total=self.total, initial=self.start_step, desc=run_name or "train", unit="step",
                            dynamic_ncols=True, file=sys.stderr)
        if tensorboard:
            try:  # lazy: only runs that ask for it need tensorboard
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise UserError("run.tensorboard: needs the tensorboard package (pip install tensorboard)") from None
            self.tb = SummaryWriter(log_dir=str(log_dir / "tensorboard"))
        if wandb_project:
            try:  # lazy: wandb is optional (not in the requirements)
                import wandb
            except ImportError:
                raise UserError("run.wandb_project: needs the wandb package (pip install wandb)") from None
            self.wandb = wandb.init(project=wandb_project, name=run_name or None, config=config or {})
        if log_dir is not None:  # last: a failure above leaves the curve as it was
            self.curve = MetricsLog(log_dir, self.start_step, replacing)

    def step(self, step: int, loss: Optional[float], lr: float, samples: int, counts: dict,
             extra: Optional[dict] = None) -> None:
        """``extra``: more metrics for TensorBoard / W&B at this log point (the MoE load shares)."""
        if not self.enabled:
            return
        now = time.monotonic()
        self.samples += samples
        self.recent.append((now, self.samples))
        if loss is None:
            self.skipped_in_a_row += 1
            self.skipped_since_log += 1
        else:
            self.skipped_in_a_row = 0
            self.losses.append(loss)
            self.losses_since_log.append(loss)
        rate = self.rate()
        memory = peak_memory_gb(self.device)
        mean_loss = sum(self.losses) / len(self.losses) if self.losses else float("nan")
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(f"{self.loss_text()} lr {lr:.2e} {rate:.1f} samples/s mem {memory:.1f}G",
                                     refresh=False)
        done = step + 1
        if done % self.log_every == 0 or done == self.total:
            if self.bar is None:
                eta = (self.total - done) * (now - self.started) / max(1, done - self.start_step)
                log.info("step %d/%d %s lr %.3e %.1f samples/s peak mem %.2f GiB eta %.0f s",
                         done, self.total, self.loss_text(since_log=True), lr, rate, memory, eta)
            metrics = {"train/lr": lr, "train/samples_per_s": rate, "train/peak_mem_gb": memory,
                       "train/skipped_steps": self.skipped_since_log, **(extra or {})}
            if not self.skipped_in_a_row:  # no stale loss while skipping
                metrics["train/loss"] = mean_loss
            since = self.losses_since_log
            if self.curve is not None:
                self.curve.add({"step": done, "loss": sum(since) / len(since) if since else None, "lr": lr,
                                "samples_per_s": rate, "peak_mem_gb": memory, "skipped": self.skipped_since_log,
                                **(extra or {})})
            self.skipped_since_log = 0
            self.losses_since_log = []
            if self.tb is not None:
                for key, value in metrics.items():
                    self.tb.add_scalar(key, value, done)
                for name, count in counts.items():
                    self.tb.add_scalar(f"data/{name}", count, done)
            if self.wandb is not None:
                self.wandb.log({**metrics, **{f"data/{k}": v for k, v in counts.items()}}, step=done)

    def loss_text(self, since_log: bool = False) -> str:
        """``loss 1.2345`` (the mean of the last finite losses), or ``loss skipped: non-finite (3 in a row)`` while
        steps are skipped; ``since_log`` adds the steps skipped since the last log line to a finite mean."""
        if self.skipped_in_a_row:
            return f"loss skipped: non-finite ({self.skipped_in_a_row} in a row)"
        mean = sum(self.losses) / len(self.losses) if self.losses else float("nan")
        skipped = self.skipped_since_log if since_log else 0
        return f"loss {mean:.4f}" + (f" ({skipped} skipped since the last line)" if skipped else "")

    def rate(self) -> float:
        if len(self.recent) < 2:
            return 0.0
        (t0, s0), (t1, s1) = self.recent[0], self.recent[-1]
        return (s1 - s0) / (t1 - t0) if t1 > t0 else 0.0

    def checkpointed(self) -> None:
        """A checkpoint is in place (the first replaces the old run's): the run's curve is the one to keep. A failure
        here is a warning: the checkpoint is written, only its curve stays in metrics.jsonl.pending."""
        if self.curve is not None:
            try:
                self.curve.commit()
            except UserError as exc:
                log.warning("%s", exc)

    def close(self) -> None:
        """Also on a failure or Ctrl-C (the loop's finally): each part closed even when another fails, and the chart
        of the committed curve drawn (a warning if it fails; none while the curve is pending: the old run's stays)."""
        try:
            if self.bar is not None:
                self.bar.close()
            if self.curve is not None:
                self.curve.close()
                if not self.curve.pending:
                    self._draw_chart()
        finally:
            try:
                if self.tb is not None:
                    self.tb.close()
            finally:
                if self.wandb is not None:
                    self.wandb.finish()

    def _draw_chart(self) -> None:
        rows = read_metrics(self.curve.path)
        if not rows:
            return
        chart = self.curve.path.parent / CHART_FILE
        try:
            draw_loss_chart(rows, chart, title=f"{self.run_name or 'train'}: steps 1..{rows[-1]['step']}")
        except Exception as exc:  # never hides the run's own outcome
            log.warning("%s: the loss chart was not drawn (%s)", chart, exc)


def format_summary(summary: dict) -> str:
    segment = summary.get("seconds_this_segment", summary["seconds"])
    lines = [
        f"trained steps {summary['start_step']}..{summary['end_step']} of {summary['total_steps']} "
        f"in {segment:.1f} s ({summary['samples_per_s']:.2f} samples/s, "
        f"{summary['steps_per_s']:.2f} steps/s){whole_run_text(summary)}",
        f"trainable parameters {summary['trainable_params']:,}; skipped non-finite steps {summary['skipped_steps']}; "
        f"peak memory {summary['peak_mem_gb']:.2f} GiB; last loss {summary['last_loss']}{precision_text(summary)}",
        "batches per dataset (this process): " + ", ".join(f"{k} {v}" for k, v in sorted(summary["counts"].items())),
    ]
    bad = summary.get("bad_records") or {}
    if bad:
        processes = summary.get("processes", 1)
        whose = (f"all {processes} processes and their data workers" if processes > 1
                 else "all data workers of this process")
        if summary.get("bad_records_from_step"):
            whose += f", since step {summary['bad_records_from_step']}"
        lines.append(f"bad records per dataset file ({whose}; bad of seen):")
        lines += [f"  {name}: {bad_record_line(counters)}" for name, counters in sorted(bad.items())]
    return "\n".join(lines)


def whole_run_text(summary: dict) -> str:
    """``; the whole run 12.3 s`` after a resume (``since step N`` when its checkpoint kept no seconds)."""
    if not summary["start_step"]:
        return ""
    since = summary.get("seconds_from_step")
    return f"; the whole run {summary['seconds']:.1f} s" + (f" since step {since}" if since else "")


def precision_text(summary: dict) -> str:
    """``; precision bf16`` (and what run.precision asked for when that could not run)."""
    if "precision" not in summary:
        return ""
    asked = summary.get("precision_requested")
    return f"; precision {summary['precision']}" + (f" (run.precision {asked} cannot run here)" if asked else "")


def bad_record_line(counters: list[dict]) -> str:
    """``/data/x.jsonl: records 0 of 120, images 3 of 95 (3.2%)`` for one dataset's counters."""
    parts: dict[str, list[str]] = {}
    for c in counters:
        share = f" ({c['bad'] / c['seen']:.1%})" if c["bad"] else ""
        parts.setdefault(c["source"], []).append(f"{c['what']} {c['bad']} of {c['seen']}{share}")
    return "; ".join(f"{source}: {', '.join(items)}" for source, items in parts.items())
