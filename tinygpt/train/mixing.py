"""Mixing datasets as the original does: one DataLoader per dataset; each micro-batch draws ONE dataset with
probability ``sample_ratio / sum`` and takes one whole batch from it (batches never mix datasets).

Exact resume: what every micro-batch reads is a pure function of (seed, step, slot) for map-style datasets, and of
(seed, restart step, batches read since) for streaming ones.

* Slots: an optimizer step has ``world_size * grad_accum_steps`` micro-batch slots; process ``rank`` fills slots
  ``rank * accum + micro``. The dataset drawn for every (step, slot) comes from one seeded table, so one process
  with accumulation 2 reads exactly what two processes with accumulation 1 read.
* Map-style datasets: the k-th draw of a dataset (counted over all slots in order) is batch k of a seeded
  permutation per epoch (drop_last); each item is read as ``(epoch, index)`` so per-epoch randomness in the dataset
  (prompt choice, answer sampling) is reproducible, also in worker processes.
* Streaming (iterable) datasets: each process reads its own stream. An endless one (``resampled``, the default) is
  restarted with a new seed (``set_epoch(restart_step * world_size + rank)``) right after every checkpoint; the
  checkpoint stores the restart step and how many batches were read since (skipped on resume), so resume is exact.
  A finite one (``resampled: false``, one pass over its shards at a time, each process reading its own shards) is
  not restarted at checkpoints, which would begin a new shuffled pass each time and read the shards early in each
  order again while others were never read: it runs its pass to the end, and the checkpoint stores the pass's seed
  and the batches read in it (a resume reads them again, at most one pass).
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from ..errors import UserError

log = logging.getLogger(__name__)


def _seed_of(*parts: Any) -> int:
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@dataclass
class MixEntry:
    name: str
    dataset: Any
    batch_size: int
    ratio: float

    @property
    def streaming(self) -> bool:
        return isinstance(self.dataset, IterableDataset)

    @property
    def finite_stream(self) -> bool:
        """A stream read in whole passes (``resampled: false``), not restarted at checkpoints."""
        return self.streaming and getattr(self.dataset, "resampled", True) is False


def draw_table(ratios: list[float], seed: int, total_steps: int, slots: int) -> np.ndarray:
    """[total_steps, slots] dataset index per micro-batch slot (seeded; the same for any process count)."""
    probs = np.asarray(ratios, dtype=np.float64)
    probs = probs / probs.sum()
    rng = np.random.default_rng(_seed_of(seed, "mix"))
    return rng.choice(len(probs), size=(total_steps, slots), p=probs).astype(np.int32)


class _EpochIndexed(Dataset):
    """Reads items addressed as ``(epoch, index)``: sets the dataset's epoch first (per-epoch random draws)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int]):
        epoch, index = item
        if hasattr(self.dataset, "set_epoch") and getattr(self.dataset, "epoch", None) != epoch:
            self.dataset.set_epoch(epoch)
        return self.dataset[index]


class _DrawBatches:
    """Batch sampler of one map-style dataset for one process: its draws from ``start_step`` on, in order."""

    def __init__(self, entry: MixEntry, index: int, table: np.ndarray, start_step: int, my_slots: list[int],
                 seed: int):
        self.entry, self.seed = entry, seed
        flat = table.reshape(-1)
        slots = table.shape[1]
        mine = (flat == index)
        ordinals = np.cumsum(mine) - 1          # the global ordinal of every draw of this dataset
        positions = np.nonzero(mine)[0]
        keep = positions >= start_step * slots
        keep &= np.isin(positions % slots, my_slots)
        self.ordinals = ordinals[positions[keep]]
        self.per_epoch = len(entry.dataset) // entry.batch_size
        if self.per_epoch < 1:
            raise UserError(f"data.datasets.{entry.name}: {len(entry.dataset)} samples are fewer than "
                            f"batch_size {entry.batch_size}")
        self._perm_epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._perm_epoch:
            generator = torch.Generator().manual_seed(_seed_of(self.seed, self.entry.name, epoch))
            self._perm, self._perm_epoch = torch.randperm(len(self.entry.dataset), generator=generator), epoch
        return self._perm

    def __len__(self) -> int:
        return len(self.ordinals)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        size = self.entry.batch_size
        for ordinal in self.ordinals:
            epoch, within = divmod(int(ordinal), self.per_epoch)
            window = self._permutation(epoch)[within * size:(within + 1) * size]
            yield [(epoch, int(i)) for i in window]


class DataMixer:
    """Serves ``next_batch(step, micro)`` for one process; ``state()`` / ``start(...)`` for checkpoints."""

    def __init__(self, entries: list[MixEntry], *, seed: int, total_steps: int, world_size: int, rank: int,
                 grad_accum_steps: int, num_workers: int, collate: Callable):
        if not entries:
            raise UserError("data.datasets: no dataset to train on")
        self.entries, self.seed, self.rank, self.world = entries, seed, rank, world_size
        self.accum, self.num_workers, self.collate = grad_accum_steps, num_workers, collate
        self.slots = world_size * grad_accum_steps
        self.my_slots = [rank * grad_accum_steps + m for m in range(grad_accum_steps)]
        self.table = draw_table([e.ratio for e in entries], seed, total_steps, self.slots)
        self.iterators: dict[int, Iterator] = {}
        self.restart_step = 0
        self.read_since_restart: Counter = Counter()  # a finite stream's: batches read in its current pass
        self.pass_seeds: dict[str, int] = {}           # a finite stream's current pass
        self.counts: Counter = Counter()        # batches this process took per dataset (for the log)

    # ---- loaders --------------------------------------------------------------------------------------------
    def _loader(self, index: int, start_step: int) -> DataLoader:
        entry = self.entries[index]
        generator = torch.Generator().manual_seed(_seed_of(self.seed, entry.name, "workers", start_step, self.rank))
        common = dict(collate_fn=self.collate, num_workers=self.num_workers, generator=generator)
        if entry.finite_stream:
            pass_seed = self.pass_seeds.setdefault(entry.name, start_step * self.world + self.rank)
            entry.dataset.set_epoch(pass_seed)
            if hasattr(entry.dataset, "set_process"):  # a pass is split over the processes by shard
                entry.dataset.set_process(self.rank, self.world)
            common["generator"] = torch.Generator().manual_seed(_seed_of(self.seed, entry.name, "pass", pass_seed))
            return DataLoader(entry.dataset, batch_size=entry.batch_size, **common)
        if entry.streaming:
            if hasattr(entry.dataset, "set_epoch"):
                entry.dataset.set_epoch(start_step * self.world + self.rank)
            return DataLoader(entry.dataset, batch_size=entry.batch_size, **common)
        sampler = _DrawBatches(entry, index, self.table, start_step, self.my_slots, self.seed)
        return DataLoader(_EpochIndexed(entry.dataset), batch_sampler=sampler, **common)

    def start(self, step: int, state: Optional[dict] = None) -> None:
        """(Re)create every loader to serve from optimizer step ``step`` (skipping the batches a checkpoint says were
        read)."""
        state = state or {}
        self.restart_step = int(state.get("restart_step", step))
        skip = Counter({k: int(v) for k, v in state.get("read_since_restart", {}).items()})
        self.counts = Counter({k: int(v) for k, v in state.get("counts", {}).items()})
        self.pass_seeds = {k: int(v) for k, v in state.get("pass_seeds", {}).items()}  # none: a pass from restart_step
        self.iterators = {}
        for index, entry in enumerate(self.entries):
            from_step = self.restart_step if entry.streaming else step
            self.iterators[index] = iter(self._loader(index, from_step))
        self.read_since_restart = Counter()
        for index, entry in enumerate(self.entries):
            for _ in range(skip.get(entry.name, 0)):  # replay what the stream gave since its restart
                self._next(index, self.restart_step)
                self.read_since_restart[entry.name] += 1

    def restart_streams(self, step: int) -> None:
        """New streams for the endless iterable datasets from ``step`` on (called right after each checkpoint); a
        finite stream goes on with its pass."""
        self.restart_step = step
        for index, entry in enumerate(self.entries):
            if entry.streaming and not entry.finite_stream:
                self.read_since_restart[entry.name] = 0
                self.iterators[index] = iter(self._loader(index, step))

    def dataset_at(self, step: int, micro: int) -> int:
        return int(self.table[step, self.my_slots[micro]])

    def next_batch(self, step: int, micro: int) -> tuple[str, dict]:
        index = self.dataset_at(step, micro)
        entry = self.entries[index]
        batch = self._next(index, step)
        if entry.streaming:
            self.read_since_restart[entry.name] += 1
        self.counts[entry.name] += 1
        return entry.name, batch

    def _next(self, index: int, step: int):
        try:
            return next(self.iterators[index])
        except StopIteration:
            if not self.entries[index].streaming:
                raise  # a map-style sampler never ends before total_steps: a bug
            log.info("dataset %s: stream ended, starting its next pass", self.entries[index].name)
            self._next_pass(index)
            try:
                return next(self.iterators[index])
            except StopIteration:  # a whole pass without one readable sample (every shard damaged or foreign)
                raise UserError(f"dataset {self.entries[index].name}: a whole pass over its shards gave no readable "
                                "sample (the log lists each shard's problem)") from None

    def _next_pass(self, index: int) -> None:
        """A finite stream (resampled: false) ended: its next pass, seeded by the one before. (Another stream that
        ends, one without ``resampled``, is read again from its restart.)"""
        entry = self.entries[index]
        if entry.finite_stream:
            previous = self.pass_seeds[entry.name]
            self.pass_seeds[entry.name] = _seed_of(self.seed, entry.name, self.rank, previous) % (1 << 31)
            self.read_since_restart[entry.name] = 0
        self.iterators[index] = iter(self._loader(index, self.restart_step))

    def state(self) -> dict:
        return {"restart_step": self.restart_step, "read_since_restart": dict(self.read_since_restart),
                "counts": dict(self.counts), "pass_seeds": dict(self.pass_seeds)}
