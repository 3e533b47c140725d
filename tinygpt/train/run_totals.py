"""What ``train_summary.json`` counts over the whole run, resumes included: the training seconds (``seconds``; the
last segment's alone: ``seconds_this_segment``) and the bad records per dataset file (``bad_records``).

Each resume checkpoint keeps them in its state.json (``seconds``: up to that checkpoint; ``bad_records``: the counts
of the counters that count as they read, ``bad_records.read_totals``), and a resumed run goes on from them, as the
MoE load counts do (``moe_log.py``). A checkpoint written before they were kept still resumes: the totals it lacks
then count from its step, which the log says and the summary records (``seconds_from_step``,
``bad_records_from_step``).
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..data.bad_records import bad_record_totals, read_totals

log = logging.getLogger("tinygpt.train")
KEPT = ("seconds", "bad_records")  # state.json keys


class RunTotals:
    def __init__(self) -> None:
        self.seconds = 0.0  # the training seconds before this segment
        self.bad_records: dict = {}  # the counts read before this segment (read_totals)
        self.from_step: dict[str, int] = {}  # "<key>_from_step": the step a total counts from, when not 0

    def resume(self, state: dict, checkpoint: Path, step: int, main: bool) -> None:
        """Go on from the totals ``state`` (the state.json of ``checkpoint``, of ``step``) kept; those it lacks (an
        older tinygpt wrote it) count from ``step``, as the main process's log says."""
        self.seconds = float(state.get("seconds", 0.0))
        self.bad_records = state.get("bad_records", {})
        missing = [key for key in KEPT if key not in state]
        self.from_step = {f"{key}_from_step": step for key in missing}
        if missing and main:
            log.warning("%s holds no %s (written by an older tinygpt): the summary's count only the steps after "
                        "step %d", checkpoint, " or ".join(missing), step)

    def state(self, seconds: float, datasets: dict) -> dict:
        """For a checkpoint's state.json; ``seconds``: this segment's so far."""
        return {"seconds": self.seconds + seconds, "bad_records": read_totals(datasets, self.bad_records)}

    def summary(self, seconds: float, datasets: dict) -> dict:
        """The summary's totals; ``seconds``: this segment's."""
        return {"seconds": self.seconds + seconds, "seconds_this_segment": seconds,
                "bad_records": bad_record_totals(datasets, self.bad_records), **self.from_step}
