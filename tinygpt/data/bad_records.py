"""What a loader does with a bad record: skip it, count it, warn once (capped), and stop when there are too many.

A *bad record* is one a dataset file contains that cannot become a sample: a missing or corrupt image, a line that
is not JSON, a box outside its image, an image path that leaves the dataset root, a missing field. Loaders raise
:class:`BadRecord` internally; a :class:`BadRecordCounter` per dataset file turns that into one ``logging`` warning
naming the file and the line or record index, and raises :class:`~tinygpt.errors.UserError` once the bad fraction
(after ``min_records`` records) exceeds ``BadRecordPolicy.max_bad_fraction``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

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
    """Counts good and bad records of one dataset file (``source``) for one kind of check (``what``)."""

    def __init__(self, source: str, policy: BadRecordPolicy | None = None, what: str = "records") -> None:
        self.source = source
        self.policy = policy or BadRecordPolicy()
        self.what = what
        self.seen = 0
        self.bad = 0
        self.first_bad: str | None = None

    @property
    def fraction(self) -> float:
        return self.bad / self.seen if self.seen else 0.0

    def ok(self) -> None:
        self.seen += 1

    def skip(self, where: str, reason: str) -> None:
        """Count one bad record at ``where`` (e.g. ``"data.jsonl:12"``) and warn (capped); no verdict yet."""
        self.seen += 1
        self.bad += 1
        message = f"{where}: skipped bad record: {reason}"
        if self.first_bad is None:
            self.first_bad = message
        if self.bad <= self.policy.max_warnings:
            logger.warning(message)
            if self.bad == self.policy.max_warnings:
                logger.warning("%s: further bad %s are counted but not shown", self.source, self.what)

    def _raise(self) -> None:
        raise UserError(
            f"{self.source}: {self.bad} of {self.seen} {self.what} are bad ({self.fraction:.1%} > limit "
            f"{self.policy.max_bad_fraction:.1%}); first: {self.first_bad}"
        )

    def check_final(self) -> None:
        """Verdict over a whole file (map-style datasets, after construction): over the limit, or all bad."""
        if self.seen and self.bad == self.seen:
            self._raise()
        if self.seen >= self.policy.min_records and self.fraction > self.policy.max_bad_fraction:
            self._raise()

    def check_running(self) -> None:
        """Verdict while streaming or decoding lazily, when the total is not known yet.

        Everything bad after ``min_records`` stops at once (a wrong root or a broken pattern). Otherwise the fraction
        is judged only after enough records that one sporadic bad image early on cannot stop a run:
        ``max(min_records, 10 / max_bad_fraction)`` (1,000 at the default 1%).
        """
        if self.seen >= self.policy.min_records and self.bad == self.seen:
            self._raise()
        limit = self.policy.max_bad_fraction
        judge_after = max(self.policy.min_records, math.ceil(10 / limit) if limit > 0 else 0)
        if self.seen >= judge_after and self.fraction > limit:
            self._raise()

    def summary(self) -> str:
        return f"{self.source}: {self.bad} bad of {self.seen} {self.what} ({self.fraction:.2%})"
