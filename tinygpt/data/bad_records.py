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
"""

from __future__ import annotations

import logging
import math
import multiprocessing
from dataclasses import dataclass
from multiprocessing.context import get_spawning_popen

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
        self._counts = _shared_counts((0, 0))
        self.first_bad: str | None = None  # the first bad record this process saw

    def _add(self, bad: int) -> tuple[int, int]:
        """One more record (``bad``: 0 or 1); returns (seen, bad) after it."""
        with self._counts.get_lock():
            raw = self._counts.get_obj()
            raw[0] += 1
            raw[1] += bad
            return raw[0], raw[1]

    def counts(self) -> tuple[int, int]:
        """(seen, bad) over every process that shares this counter."""
        with self._counts.get_lock():
            raw = self._counts.get_obj()
            return raw[0], raw[1]

    @property
    def seen(self) -> int:
        return self.counts()[0]

    @property
    def bad(self) -> int:
        return self.counts()[1]

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        if get_spawning_popen() is None:  # pickle or deepcopy, not a worker start: the copy gets its own numbers
            state["_counts"] = self.counts()
        return state

    def __setstate__(self, state: dict) -> None:
        if isinstance(state["_counts"], tuple):
            state["_counts"] = _shared_counts(state["_counts"])
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
        raise UserError(
            f"{self.source}: {bad} of {seen} {self.what} are bad ({bad / seen:.1%} > limit "
            f"{self.policy.max_bad_fraction:.1%}){first}"
        )

    def check_final(self) -> None:
        """Verdict over a whole file (map-style datasets, after construction): over the limit, or all bad."""
        seen, bad = self.counts()
        if seen and bad == seen:
            self._raise(seen, bad)
        if seen >= self.policy.min_records and bad / seen > self.policy.max_bad_fraction:
            self._raise(seen, bad)

    def check_running(self) -> None:
        """Verdict while streaming or decoding lazily, when the total is not known yet.

        Everything bad after ``min_records`` stops at once (a wrong root or a broken pattern). Otherwise the fraction
        is judged only after enough records that one sporadic bad image early on cannot stop a run:
        ``max(min_records, 10 / max_bad_fraction)`` (1,000 at the default 1%). The counts are those of all workers.
        """
        seen, bad = self.counts()
        if seen >= self.policy.min_records and bad == seen:
            self._raise(seen, bad)
        limit = self.policy.max_bad_fraction
        judge_after = max(self.policy.min_records, math.ceil(10 / limit) if limit > 0 else 0)
        if seen >= judge_after and bad / seen > limit:
            self._raise(seen, bad)

    def summary(self) -> str:
        seen, bad = self.counts()
        return f"{self.source}: {bad} bad of {seen} {self.what} ({bad / seen if seen else 0.0:.2%})"


def _shared_counts(values: tuple[int, int]):
    """[seen, bad] as int64 in shared memory with a lock, of the default start method (the one a DataLoader's workers
    use unless told otherwise)."""
    return multiprocessing.Array("q", list(values))


def bad_record_totals(datasets: dict[str, object]) -> dict[str, list[dict]]:
    """Per dataset name, its counters' ``{"source", "what", "bad", "seen"}`` (all workers together), for the
    end-of-run summary; a dataset without counters (cached features) is left out."""
    totals: dict[str, list[dict]] = {}
    for name, dataset in datasets.items():
        counters = [v for v in getattr(dataset, "__dict__", {}).values() if isinstance(v, BadRecordCounter)]
        for counter in counters:
            seen, bad = counter.counts()
            totals.setdefault(name, []).append({"source": counter.source, "what": counter.what, "bad": bad,
                                                "seen": seen})
    return totals
