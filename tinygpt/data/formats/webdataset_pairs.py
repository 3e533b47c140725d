"""Image-caption pairs in webdataset tar shards, as img2dataset writes them (LAION, CC+SBU; stages 1-2).

A shard is a tar whose members are grouped by key: ``00000001.jpg`` + ``00000001.json`` (``{"caption": ...}``)
(+ ``.txt``, ignored). Shards are named by a brace pattern, e.g. ``/data/laion/{00000..05244}.tar``.
Sample: user ``"<ImageHere>"``, assistant ``blip_caption(caption)`` (the model applies the template ``"{}"``).

``resampled=True`` (the original): an endless stream; each shard is drawn at random (seeded) with replacement.
``resampled=False``: one pass over the shards per epoch, in a seeded shuffled order. Either way a seeded
shuffle buffer (1000) mixes samples across shards. With DataLoader workers, worker k reads its own share; with
several training processes (``set_process``), a finite pass is split by shard too: process r reads shards r, r + n,
... of n processes, so one pass over all processes reads each sample once (webdataset's ``split_by_node``); with
fewer shards than processes each process reads them all (one warning).
Missing shards are skipped with one warning (partial LAION downloads are common); a truncated tar or a bad sample
is counted as a bad record naming shard and key.

The library does the generic parts: ``braceexpand`` expands the pattern, webdataset's ``tar_file_iterator`` reads a
shard as a stream and ``group_by_keys`` groups its members into samples. Ours are the rest: the seeded shard order and
its split by process and worker, the seeded shuffle buffer, the member naming rule (``split_member_name``), bad
records and the UserErrors.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import tarfile
from pathlib import Path
from typing import Iterator, Optional

from braceexpand import UnbalancedBracesError, braceexpand
from torch.utils.data import IterableDataset, get_worker_info
from webdataset.tariterators import group_by_keys, tar_file_iterator

from tinygpt.data.bad_records import BadRecord, BadRecordCounter, BadRecordPolicy
from tinygpt.data.formats.base import check_placeholders
from tinygpt.data.image import ImageTransform, decode_image_bytes
from tinygpt.data.text import blip_caption
from tinygpt.errors import UserError
from tinygpt.tasks import IMAGE_PLACEHOLDER

logger = logging.getLogger("tinygpt.data")

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
_BRACE = re.compile(r"\{[^{}]*\}")


def expand_braces(pattern: str) -> list[str]:
    """``"a{00..02}b{x,y}"`` -> a00bx, a00by, a01bx, ... (``braceexpand``, bash's rules: a numeric range keeps the
    zero padding of its bounds); a brace group it leaves as it is (``{abc}``) or unbalanced braces are a UserError."""
    hint = "use {000..123} or {a,b}"
    try:
        names = list(braceexpand(pattern, escape=False))  # escape=False: a backslash in a path stays as it is
    except UnbalancedBracesError:
        raise UserError(f"shard pattern {pattern!r}: unbalanced braces; {hint}") from None
    for name in names:
        left = _BRACE.search(name)  # braceexpand keeps a group it cannot expand as it is
        if left:
            raise UserError(f"shard pattern {pattern!r}: cannot expand {left.group(0)}; {hint}")
    return names


def split_member_name(name: str) -> tuple[Optional[str], Optional[str]]:
    """``"dir/0001.jpg"`` -> ("dir/0001", "jpg"): the key keeps the folders, the extension is all after the file
    name's first dot; (None, None) (skipped) for a file name without a dot or starting with one."""
    folder, slash, file_name = name.rpartition("/")
    if "." not in file_name or file_name.startswith("."):
        return None, None
    stem, extension = file_name.split(".", 1)
    return folder + slash + stem, extension


def iter_tar_samples(shard: Path, counter: BadRecordCounter) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) per sample of one tar shard, read as a stream (webdataset's ``tar_file_iterator``,
    mode ``r|*``) and grouped by key (``group_by_keys``, extensions lower-cased). A broken tar ends the shard: one bad
    record naming it; the samples read before the damage are kept, the group it broke is dropped."""
    reading, failure = "", None  # the member tar_file_iterator reads now; why it stopped early

    def select(name: str) -> bool:  # asked before a member's data is read
        nonlocal reading
        reading = name
        return split_member_name(name)[0] is not None

    def stop(exn: Exception) -> bool:  # a member's data could not be read: the shard ends here
        nonlocal failure
        failure = exn
        return False

    def duplicate(exn: Exception) -> bool:  # group_by_keys: a second member with one key and extension
        counter.skip(f"{shard}", f"member skipped, the first is kept ({exn.args[0]})")
        counter.check_running()
        return True

    last_key: Optional[str] = None
    try:
        with open(shard, "rb") as stream:
            files = tar_file_iterator(stream, skip_meta=None, handler=stop, select_files=select)
            named = ({**member, "__url__": str(shard)} for member in files)  # group_by_keys wants the shard's name
            for sample in group_by_keys(named, keys=split_member_name, handler=duplicate):
                if failure is not None and sample["__key__"] == split_member_name(reading)[0]:
                    break  # the last group lost a member: dropped
                last_key = sample["__key__"]
                yield last_key, {ext: data for ext, data in sample.items() if ext not in ("__key__", "__url__")}
    except (tarfile.TarError, OSError, EOFError) as exc:  # the archive or a header: the open group is dropped too
        failure = exc
    if failure is not None:
        counter.skip(f"{shard}", f"unreadable tar after key {last_key!r} ({type(failure).__name__}: {failure})")
        counter.check_running()


class WebDatasetPairs(IterableDataset):
    """Caption pairs from webdataset shards; yields samples ``{"images": [1,3,S,S], "turns", "dataset"}``."""

    def __init__(self, shards: str | list[str], *, image_size: int, seed: int,
                 bad_records: Optional[BadRecordPolicy] = None, name: str = "webdataset_pairs",
                 resampled: bool = True, shuffle_buffer: int = 1000, caption_key: str = "caption",
                 process_text: bool = True) -> None:
        super().__init__()
        patterns = [shards] if isinstance(shards, (str, os.PathLike)) else list(shards)
        patterns = [os.fspath(p) if isinstance(p, os.PathLike) else p for p in patterns]
        if not patterns or not all(isinstance(p, str) and p for p in patterns):
            raise UserError(f"dataset {name!r}: shards must be a path pattern or a list of them, got {shards!r}")
        expanded = [Path(path) for pattern in patterns for path in expand_braces(pattern)]
        self.shards = [path for path in expanded if path.is_file()]
        self.source = ", ".join(patterns)
        if not self.shards:
            raise UserError(f"{self.source}: no shard file exists (dataset {name!r}, {len(expanded)} names tried)")
        missing = len(expanded) - len(self.shards)
        if missing:
            logger.warning("%s: %d of %d shards are missing and skipped (first: %s)", self.source, missing,
                           len(expanded), next(p for p in expanded if not p.is_file()))
        if shuffle_buffer < 0:
            raise UserError(f"dataset {name!r}: shuffle_buffer must be >= 0, got {shuffle_buffer}")
        self.name = name
        self.seed = int(seed)
        self.epoch = 0
        self.rank, self.world = 0, 1  # the training process, of how many (set_process)
        self.resampled = resampled
        self.shuffle_buffer = shuffle_buffer
        self.caption_key = caption_key
        self.process_text = process_text
        self.transform = ImageTransform(image_size)
        self.counter = BadRecordCounter(self.source, bad_records or BadRecordPolicy(), "samples")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def set_process(self, rank: int, world: int) -> None:
        """This is training process ``rank`` of ``world``: a finite pass reads only this process's shards."""
        self.rank, self.world = int(rank), int(world)
        if not self.resampled and 1 < self.world and len(self.shards) < self.world and self.rank == 0:
            logger.warning("%s: %d shards for %d training processes: each process reads every shard, so a pass "
                           "reads each sample %d times (give at least one shard per process)", self.source,
                           len(self.shards), self.world, self.world)

    def _shard_order(self, rng: random.Random, worker: int, workers: int) -> Iterator[Path]:
        if self.resampled:
            while True:
                yield rng.choice(self.shards)
        mine = self.shards[self.rank::self.world] if len(self.shards) >= self.world else list(self.shards)
        order = mine[worker::workers]  # a worker past the shard count reads nothing
        rng.shuffle(order)
        yield from order

    def _to_sample(self, key: str, parts: dict[str, bytes]) -> dict:
        image_ext = next((ext for ext in IMAGE_EXTENSIONS if ext in parts), None)
        if image_ext is None:
            raise BadRecord(f"no image member ({'/'.join(IMAGE_EXTENSIONS)}) for this key")
        if "json" not in parts:
            raise BadRecord("no .json member for this key")
        try:
            meta = json.loads(parts["json"].decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BadRecord(f"the .json member is not valid JSON ({exc})") from None
        caption = meta.get(self.caption_key) if isinstance(meta, dict) else None
        if not isinstance(caption, str) or not caption.strip():
            raise BadRecord(f"the .json member has no text field {self.caption_key!r}")
        answer = blip_caption(caption) if self.process_text else caption.strip()
        turns = [{"user": IMAGE_PLACEHOLDER, "assistant": answer}]
        check_placeholders(turns, 1)
        image = decode_image_bytes(parts[image_ext], f"{key}.{image_ext}")
        return {"images": self.transform(image).unsqueeze(0), "turns": turns, "dataset": self.name}

    def _raw_items(self, rng: random.Random, worker: int, workers: int) -> Iterator[tuple[Path, str, dict]]:
        empty_in_a_row, limit = 0, max(10, 2 * len(self.shards))
        for shard in self._shard_order(rng, worker, workers):
            found = False
            for key, parts in iter_tar_samples(shard, self.counter):
                found = True
                yield shard, key, parts
            empty_in_a_row = 0 if found else empty_in_a_row + 1
            if empty_in_a_row >= limit:
                raise UserError(f"{self.source}: {limit} shards in a row held no sample (last: {shard})")

    def _shuffled(self, items: Iterator, rng: random.Random) -> Iterator:
        """Seeded shuffle buffer over raw (undecoded) items, as webdataset's ``shuffle(1000)`` before decoding."""
        buffer: list = []
        for item in items:
            if self.shuffle_buffer <= 1:
                yield item
                continue
            buffer.append(item)
            if len(buffer) >= self.shuffle_buffer:
                index = rng.randrange(len(buffer))
                buffer[index], buffer[-1] = buffer[-1], buffer[index]
                yield buffer.pop()
        rng.shuffle(buffer)
        yield from buffer

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        rng = random.Random(f"{self.seed}/{self.epoch}/{worker}")
        for shard, key, parts in self._shuffled(self._raw_items(rng, worker, workers), rng):
            try:
                sample = self._to_sample(key, parts)
            except BadRecord as exc:
                self.counter.skip(f"{shard}:{key}", str(exc))
                self.counter.check_running()
                continue
            self.counter.ok()
            yield sample

    def report(self) -> list[str]:
        return [self.counter.summary()]

