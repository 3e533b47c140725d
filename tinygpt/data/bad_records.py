"""What a loader does with a bad record: skip it, count it, warn once (capped), and stop when there are too many.

A *bad record* is one a dataset file contains that cannot become a sample: a missing or corrupt image, a line that
is not JSON, a box outside its image, an image path that leaves the dataset root, a missing field. Loaders raise
:class:`BadRecord` internally; a :class:`BadRecordCounter` per dataset file turns that into one ``logging`` warning
naming the file and the line or record index, and raises :class:`~tinygpt.errors.UserError` once the bad fraction
(after ``min_records`` records) exceeds ``BadRecordPolicy.max_bad_fraction``.

A counter's two numbers (seen, bad) live in shared memory made when the dataset is built, in the main process, before
any DataLoader worker starts: every worker (forked, or spawned: the dataset is then pickled while the worker starts)
adds to the same numbers, so the verdict judges all workers together and :func:`bad_record_totals` gives the main
process the whole run's counts for the end-of-run summary. ``num_workers: 0`` counts in the main process alone.

Several training processes (``accelerate launch``, torchrun) each build their own datasets. A counter that judged a
whole file at construction (``check_final``: the records of a map-style dataset) holds the same counts in every
process. The others (images decoded, stream samples) count each process's own share: between steps the training
loop hands every process the other processes' sums (:func:`share_counts`, collective), so the running verdict and
:func:`bad_record_totals` judge and report all processes together. A resume checkpoint keeps the counts read so far
(:func:`read_totals`), and the resumed run's totals go on from them (the 1% verdict judges each run's own reads).
"""

from __future__ import annotations

import logging
import math
import multiprocessing
from dataclasses import dataclass
from multiprocessing.context import get_spawning_popen
from typing import Callable

from tinygpt.errors import UserError

logger = logging.getLogger("tinygpt.data")


class BadRecord(Exception):
    """Raised inside a loader for one unusable record; the message says why (never escapes a loader)."""


@dataclass(frozen=True)
class BadRecordPolicy:
    """How many bad records a dataset may contain before loading stops.

    max_bad_fraction: stop (UserError) when bad / seen exceeds this, once ``min_records`` records were seen.
    min_records: records to see before the fraction is judged (a few bad ones at the start are no verdict).
    max_warnings: warning lines per dataset file; later bad records are still counted, and one line says so.
    """

    max_bad_fraction: float = 0.01
    min_records: int = 20
    max_warnings: int = 20

    def __post_init__(self) -> None:
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise UserError(f"bad_records.max_bad_fraction must be in [0, 1], got {self.max_bad_fraction}")
        if self.min_records < 1:
            raise UserError(f"bad_records.min_records must be >= 1, got {self.min_records}")
        if self.max_warnings < 0:
            raise UserError(f"bad_records.max_warnings must be >= 0, got {self.max_warnings}")


class BadRecordCounter:
    """Counts good and bad records of one dataset file (``source``) for one kind of check (``what``), over every
    DataLoader worker (see the module docstring)."""

    def __init__(self, source: str, policy: BadRecordPolicy | None = None, what: str = "records") -> None:
        self.source = source
        self.policy = policy or BadRecordPolicy()
        self.what = what
        self._counts = _shared_counts((0, 0, 0, 0))  # seen, bad; then the other training processes' seen, bad
        self.first_bad: str | None = None  # the first bad record this process saw
        self.whole_file = False  # judged a whole file (check_final): the same counts in every training process

    def _add(self, bad: int) -> tuple[int, int]:
        """One more record (``bad``: 0 or 1); returns (seen, bad) after it."""
        with self._counts.get_lock():
            raw = self._counts.get_obj()
            raw[0] += 1
            raw[1] += bad
            return raw[0], raw[1]

    def counts(self) -> tuple[int, int]:
        """(seen, bad) over every process that shares this counter (this training process's workers)."""
        with self._counts.get_lock():
            raw = self._counts.get_obj()
            return raw[0], raw[1]

    def combined(self) -> tuple[int, int]:
        """(seen, bad) of this training process and the others, as of the last :func:`share_counts`."""
        with self._counts.get_lock():
            raw = self._counts.get_obj()
            return raw[0] + raw[2], raw[1] + raw[3]

    def set_others(self, seen: int, bad: int) -> None:
        """The other training processes' (seen, bad), which every worker of this one then judges with."""
        with self._counts.get_lock():
            raw = self._counts.get_obj()
            raw[2], raw[3] = seen, bad

    @property
    def seen(self) -> int:
        return self.counts()[0]

    @property
    def bad(self) -> int:
        return self.counts()[1]

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        if get_spawning_popen() is None:  # pickle or deepcopy, not a worker start: the copy gets its own numbers
            with self._counts.get_lock():
                state["_counts"] = tuple(self._counts.get_obj())
        return state

    def __setstate__(self, state: dict) -> None:
        if isinstance(state["_counts"], tuple):
            state["_counts"] = _shared_counts((tuple(state["_counts"]) + (0, 0))[:4])
        state.setdefault("whole_file", False)
        self.__dict__.update(state)

    @property
    def fraction(self) -> float:
        seen, bad = self.counts()
        return bad / seen if seen else 0.0

    def ok(self) -> None:
        self._add(0)

    def skip(self, where: str, reason: str) -> None:
        """Count one bad record at ``where`` (e.g. ``"data.jsonl:12"``) and warn (capped over all workers); no
        verdict yet."""
        _, bad = self._add(1)
        message = f"{where}: skipped bad record: {reason}"
        if self.first_bad is None:
            self.first_bad = message
        if bad <= self.policy.max_warnings:
            logger.warning(message)
            if bad == self.policy.max_warnings:
                logger.warning("%s: further bad %s are counted but not shown", self.source, self.what)

    def _raise(self, seen: int, bad: int) -> None:
        first = f"; first: {self.first_bad}" if self.first_bad else ""
        everyone = " (all training processes)" if seen > self.counts()[0] else ""
        raise UserError(
            f"{self.source}: {bad} of {seen} {self.what}{everyone} are bad ({bad / seen:.1%} > limit "
            f"{self.policy.max_bad_fraction:.1%}){first}"
        )

    def check_final(self) -> None:
        """Verdict over a whole file (map-style datasets, after construction): over the limit, or all bad."""
        self.whole_file = True
        seen, bad = self.counts()
        if seen and bad == seen:
            self._raise(seen, bad)
        if seen >= self.policy.min_records and bad / seen > self.policy.max_bad_fraction:
            self._raise(seen, bad)

    def check_running(self) -> None:
        """Verdict while streaming or decoding lazily, when the total is not known yet.

        Everything bad after ``min_records`` stops at once (a wrong root or a broken pattern). Otherwise the fraction
        is judged only after enough records that one sporadic bad image early on cannot stop a run:
        ``max(min_records, 10 / max_bad_fraction)`` (1,000 at the default 1%). The counts are those of all workers
        and, as of the last :func:`share_counts`, of all training processes.
        """
        seen, bad = self.combined()
        if seen >= self.policy.min_records and bad == seen:
            self._raise(seen, bad)
        limit = self.policy.max_bad_fraction
        judge_after = max(self.policy.min_records, math.ceil(10 / limit) if limit > 0 else 0)
        if seen >= judge_after and bad / seen > limit:
            self._raise(seen, bad)

    def summary(self) -> str:
        seen, bad = self.counts()
        return f"{self.source}: {bad} bad of {seen} {self.what} ({bad / seen if seen else 0.0:.2%})"


def _shared_counts(values: tuple[int, ...]):
    """[seen, bad, others' seen, others' bad] as int64 in shared memory with a lock, of the default start method (the
    one a DataLoader's workers use unless told otherwise)."""
    return multiprocessing.Array("q", list(values))


def counters_of(datasets: dict[str, object]) -> list[tuple[str, BadRecordCounter]]:
    """(dataset name, counter) of every counter, in the same order in every training process."""
    return [(name, v) for name, dataset in datasets.items()
            for v in getattr(dataset, "__dict__", {}).values() if isinstance(v, BadRecordCounter)]


def share_counts(datasets: dict[str, object], sum_over_processes: Callable[[list[int]], list[int]]) -> None:
    """Hand every counter that counts this process's own share the other training processes' (seen, bad).
    ``sum_over_processes``: the element-wise sum of a list of ints over all processes (an all-reduce), so this is
    collective: every process calls it at the same point."""
    own_share = [counter for _, counter in counters_of(datasets) if not counter.whole_file]
    mine = [n for counter in own_share for n in counter.counts()]
    if not mine:
        return
    total = sum_over_processes(mine)
    for i, counter in enumerate(own_share):
        counter.set_others(total[2 * i] - mine[2 * i], total[2 * i + 1] - mine[2 * i + 1])


def bad_record_totals(datasets: dict[str, object], earlier: dict | None = None) -> dict[str, list[dict]]:
    """Per dataset name, its counters' ``{"source", "what", "bad", "seen"}`` (all workers together, and all training
    processes as of the last :func:`share_counts`), for the end-of-run summary; a dataset without counters (cached
    features) is left out. ``earlier``: :func:`read_totals` as a resumed run's checkpoint kept it (the run before the
    resume), added to the counters that count as they read; a whole file is counted again by every start."""
    return _totals(datasets, earlier or {}, whole_files=True)


def read_totals(datasets: dict[str, object], earlier: dict | None = None) -> dict[str, list[dict]]:
    """:func:`bad_record_totals` of the counters that count as they read (images, stream samples) alone: what a resume
    checkpoint keeps, so the summary of a resumed run covers the whole run."""
    return _totals(datasets, earlier or {}, whole_files=False)


def _totals(datasets: dict[str, object], earlier: dict, whole_files: bool) -> dict[str, list[dict]]:
    carried = {(name, c["source"], c["what"]): c for name, counters in earlier.items() for c in counters}
    totals: dict[str, list[dict]] = {}
    for name, counter in counters_of(datasets):
        if counter.whole_file and not whole_files:
            continue
        seen, bad = counter.counts() if counter.whole_file else counter.combined()
        before = {} if counter.whole_file else carried.pop((name, counter.source, counter.what), {})
        totals.setdefault(name, []).append({"source": counter.source, "what": counter.what,
                                            "bad": bad + before.get("bad", 0), "seen": seen + before.get("seen", 0)})
    for (name, source, what), c in carried.items():  # read before the resume, not since (a dataset dropped or moved)
        totals.setdefault(name, []).append({"source": source, "what": what, "bad": c["bad"], "seen": c["seen"]})
    return totals
