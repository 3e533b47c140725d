"""The shared machinery of map-style loaders: index and validate at construction, decode images lazily.

A loader subclasses :class:`RecordDataset`, reads its annotation file(s) in ``__init__`` and calls :meth:`add`
for every raw entry with a function that turns it into a :class:`Record` (or raises BadRecord, or returns None
to drop it on purpose, e.g. another split). It implements :meth:`make_turns`. Randomness (prompt choice, answer
sampling) comes from :meth:`rng`, a function of (seed, epoch, index), so a resumed run draws the same texts.
"""

from __future__ import annotations

import json
import random
import re
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
from torch.utils.data import Dataset

from tinygpt.data.bad_records import BadRecord, BadRecordCounter, BadRecordPolicy
from tinygpt.data.image import ImageTransform, checked_path, load_image
from tinygpt.errors import UserError
from tinygpt.tasks import DELIM, IMAGE_PLACEHOLDER, box_is_valid


@dataclass
class Record:
    """One validated entry: where it came from, its images (relative to ``root``) and loader-specific data."""

    images: list[str] = field(default_factory=list)
    data: Any = None
    where: str = ""  # set by RecordDataset.add


def read_json(path: str | Path, what: str = "annotation file") -> Any:
    """Parse a whole JSON file (a leading byte-order mark is allowed); a missing or malformed file is a UserError
    naming file, line and column."""
    path = Path(path)
    try:
        with open(path, "r", encoding="utf-8-sig") as f:  # a byte-order mark is allowed, as in JSONL
            return json.load(f)
    except FileNotFoundError:
        raise UserError(f"{path}: {what} does not exist") from None
    except IsADirectoryError:
        raise UserError(f"{path}: {what} is a directory, expected a JSON file") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: not valid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read {what} ({exc.strerror or exc})") from None


def iter_json_list(path: str | Path, key: Optional[str] = None) -> Iterator[tuple[str, Any]]:
    """(where, entry) for each entry of a JSON file that is a list (or an object whose ``key`` is a list)."""
    content = read_json(path)
    if key is not None:
        if not isinstance(content, dict) or not isinstance(content.get(key), list):
            raise UserError(f"{path}: expected a JSON object with a {key!r} list")
        content = content[key]
    elif not isinstance(content, list):
        raise UserError(f"{path}: expected a JSON list of records, got {type(content).__name__}")
    for index, entry in enumerate(content):
        yield f"{path} record {index}", entry


def looks_like_json_list(path: str | Path) -> bool:
    """Whether the file starts (after a byte-order mark and blanks) with ``[``: a JSON list, not JSON lines."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except FileNotFoundError:
        raise UserError(f"{path}: file does not exist") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror or exc})") from None
    return head.removeprefix(b"\xef\xbb\xbf").lstrip().startswith(b"[")


def iter_jsonl(path: str | Path, counter: BadRecordCounter) -> Iterator[tuple[str, Any]]:
    """(where, object) per non-blank line; a line that is not UTF-8 or not JSON is counted as bad and skipped (a
    byte-order mark at the start of the file is allowed)."""
    path = Path(path)
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise UserError(f"{path}: file does not exist") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror or exc})") from None
    with f:
        for line_no, raw in enumerate(f, start=1):
            where = f"{path}:{line_no}"
            try:
                line = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                counter.skip(where, f"not UTF-8 text ({exc.reason} at byte {exc.start})")
                continue
            if not line.strip():
                continue
            try:
                yield where, json.loads(line.rstrip("\r\n"))  # a column past the end, not line 2 column 1
            except json.JSONDecodeError as exc:
                counter.skip(where, f"not valid JSON ({exc.msg} at column {exc.colno})")


def require(entry: Any, key: str, kind: type | tuple[type, ...] = str) -> Any:
    """``entry[key]`` checked for type (a string must not be blank); BadRecord naming the field otherwise."""
    if not isinstance(entry, dict):
        raise BadRecord(f"expected a JSON object, got {type(entry).__name__}")
    if key not in entry:
        raise BadRecord(f"missing field {key!r}")
    value = entry[key]
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise BadRecord(f"field {key!r} has the wrong type (bool)")
    if not isinstance(value, kind):
        raise BadRecord(f"field {key!r} has the wrong type ({type(value).__name__})")
    if isinstance(value, str) and not value.strip():
        raise BadRecord(f"field {key!r} is empty")
    return value


def image_file_name(pattern: str, entry: dict) -> str:
    """Format a configured file-name pattern (e.g. ``"COCO_train2014_{id}.jpg"``) with a record's fields; a field
    the pattern names must be a non-blank string or an integer (a list or null would make a name that never exists)."""
    if not isinstance(entry, dict):
        raise BadRecord(f"expected a JSON object, got {type(entry).__name__}")
    try:
        fields = sorted({name for _, name, _, _ in string.Formatter().parse(pattern) if name})
    except ValueError as exc:
        raise BadRecord(f"cannot build the image name from pattern {pattern!r}: {exc}") from None
    for name in fields:
        if name not in entry:
            continue  # a missing field is reported by the KeyError below
        value = entry[name]
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise BadRecord(f"field {name!r} has the wrong type ({type(value).__name__}); the image name pattern "
                            f"{pattern!r} needs a string or an integer")
        if isinstance(value, str) and not value.strip():
            raise BadRecord(f"field {name!r} is empty; the image name pattern {pattern!r} needs it")
    try:
        return pattern.format(**entry)
    except KeyError as exc:
        raise BadRecord(f"missing field {exc.args[0]!r} needed by the image name pattern {pattern!r}") from None
    except (ValueError, TypeError, IndexError) as exc:
        raise BadRecord(f"cannot build the image name from pattern {pattern!r}: {exc}") from None


# A box attempt: two or more numeric <...> tokens (digits, maybe a sign, a point or a comma: <12>, <-3>, <30.5>),
# optionally in braces, or one such token in braces. Tags that merely hold a digit (<h1><h2>, <td2>) are not boxes.
_NUMBER_TAG = r"<\s*[-+]?(?=[\d.,\s]*\d)[\d.,\s]+>"
_BOX_ATTEMPT = re.compile(rf"\{{?\s*(?:{_NUMBER_TAG}\s*){{2,}}\}}?|\{{\s*{_NUMBER_TAG}\s*\}}")
_BOX_EXACT = re.compile(r"\{<(\d{1,3})><(\d{1,3})><(\d{1,3})><(\d{1,3})>\}")
_BOXES_ONLY = re.compile(rf"{_BOX_EXACT.pattern}(?:\s*{re.escape(DELIM)}\s*{_BOX_EXACT.pattern})*")


def check_box_text(text: str, field: str, at_least_one: bool = False) -> int:
    """Every box written in ``text`` is ``{<x1><y1><x2><y2>}`` with integers on the 0-100 grid, x1 <= x2 and
    y1 <= y2; anything that looks like a box and is not (3 or 5 numbers, decimals, a sign, a missing brace) is a
    BadRecord naming ``field``. Returns the number of boxes (``at_least_one``: none is a BadRecord too)."""
    count = 0
    for match in _BOX_ATTEMPT.finditer(text):
        written = match.group().strip()
        exact = _BOX_EXACT.fullmatch(written)
        if exact is None:
            raise BadRecord(f"malformed box {written!r} in {field}: a box is {{<x1><y1><x2><y2>}}, four integers "
                            "on the 0-100 grid")
        if not box_is_valid(tuple(int(v) for v in exact.groups())):  # type: ignore[arg-type]
            raise BadRecord(f"box {written} in {field} lies outside the 0-100 grid or is reversed "
                            "(needs 0 <= x1 <= x2 <= 100 and 0 <= y1 <= y2 <= 100)")
        count += 1
    if at_least_one and not count:
        raise BadRecord(f"{field} holds no {{<x1><y1><x2><y2>}} box")
    return count


def check_boxes_only(text: str, field: str) -> None:
    """``text`` is one box or several joined by ``<delim>`` (each checked by :func:`check_box_text`), with nothing
    else in it; anything else is a BadRecord naming ``field``."""
    check_box_text(text, field, at_least_one=True)
    if not _BOXES_ONLY.fullmatch(text.strip()):
        raise BadRecord(f"{field} must hold only boxes, several joined by {DELIM}, got {text!r}")


def check_unicode(text: str, what: str) -> None:
    """BadRecord when ``text`` holds an unpaired surrogate: JSON may escape half of a UTF-16 pair (``"\\ud83d"``, an
    emoji cut in two by a scraper), which parses but is no Unicode text, and no tokenizer takes it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise BadRecord(f"{what} holds an unpaired surrogate (\\u{ord(exc.object[exc.start]):04x}, half of an "
                        "escaped UTF-16 pair)") from None


def check_placeholders(turns: list[dict], image_count: int) -> None:
    """The data contract: >= 1 turn, texts that are Unicode, no blank answer (nothing to learn), and as many
    ``<ImageHere>`` in all user texts as there are images (a dataset text that itself contains the placeholder, or
    puts it in an answer, would break the model's splice)."""
    if not turns:
        raise BadRecord("no conversation turn")
    for number, turn in enumerate(turns, start=1):
        for side in ("user", "assistant"):
            check_unicode(turn[side], f"turn {number}'s {side} text")
        if not turn["assistant"].strip():  # e.g. an answer of only punctuation, which blip_caption strips
            raise BadRecord(f"turn {number}'s answer is empty (after text processing)")
    placed = sum(turn["user"].count(IMAGE_PLACEHOLDER) for turn in turns)
    if placed != image_count or any(IMAGE_PLACEHOLDER in turn["assistant"] for turn in turns):
        raise BadRecord(f"text holds {placed} {IMAGE_PLACEHOLDER} placeholders in user turns for {image_count} images"
                        " (or one in an answer)")


class RecordDataset(Dataset):
    """Map-style dataset of validated records; bad images found while decoding are skipped, counted and reported."""

    def __init__(self, *, name: str, source: str | Path, root: str | Path | None, image_size: int, seed: int,
                 bad_records: Optional[BadRecordPolicy] = None) -> None:
        self.name = name
        self.source = str(source)
        self.root = Path(root) if root is not None else None
        if self.root is not None and not self.root.is_dir():
            raise UserError(f"{self.root}: image root of dataset {name!r} is not a directory")
        self.seed = int(seed)
        self.epoch = 0
        self.policy = bad_records or BadRecordPolicy()
        self.transform = ImageTransform(image_size)
        self.record_counter = BadRecordCounter(self.source, self.policy, "records")
        self.image_counter = BadRecordCounter(self.source, self.policy, "images")
        self.records: list[Record] = []
        self._bad_indices: set[int] = set()
        self.resolved_dirs: dict[str, str] = {}  # directories resolved while indexing (finish clears it)

    # --- construction -------------------------------------------------------------------------------------------

    def add(self, where: str, build: Callable[[], Optional[Record]]) -> None:
        """Validate one raw entry; its image paths must stay inside the root (checked here and again at open)."""
        try:
            record = build()
            if record is None:
                return
            record.where = where
            for relative in record.images:
                checked_path(self.root, relative, self.resolved_dirs)
        except BadRecord as exc:
            self.record_counter.skip(where, str(exc))
            return
        self.record_counter.ok()
        self.records.append(record)

    def reject(self, where: str, reason: str) -> None:
        """Count an entry found bad before a Record could be built (e.g. a container holding several records)."""
        self.record_counter.skip(where, reason)

    def finish(self) -> None:
        """Apply the bad-record limit to the whole file and refuse an empty dataset."""
        self.resolved_dirs = {}
        self.record_counter.check_final()
        if not self.records:
            raise UserError(f"{self.source}: dataset {self.name!r} has no usable records")

    # --- access -------------------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.records)

    def set_epoch(self, epoch: int) -> None:
        """Changes the random draws (prompts, sampled answers) per epoch, reproducibly."""
        self.epoch = int(epoch)

    def rng(self, index: int) -> random.Random:
        return random.Random(f"{self.seed}/{self.epoch}/{index}")

    def make_turns(self, record: Record, sizes: list[tuple[int, int]], rng: random.Random) -> list[dict]:
        """The conversation of one record; ``sizes`` are the decoded images' (width, height)."""
        raise NotImplementedError

    def __getitem__(self, index: int) -> dict:
        """Record ``index``'s sample; for a bad one (an image that does not decode), a good record's drawn with
        ``rng(index)`` (so a batch keeps its size, and no one neighbour stands in for every bad record before it,
        which an epoch would then read twice as often), the same draw every time (an exact resume)."""
        n = len(self.records)
        if not 0 <= index < n:
            raise IndexError(index)
        sample = self.sample_at(index)
        if sample is not None:
            return sample
        start = self.rng(index).randrange(n)
        for offset in range(n):  # from a random place on: the first good record
            sample = self.sample_at((start + offset) % n)
            if sample is not None:
                return sample
        raise UserError(f"{self.source}: every record of dataset {self.name!r} has a bad image")

    def sample_at(self, i: int) -> Optional[dict]:
        """Record ``i``'s sample, or None when it is bad (counted and warned about once). A pass that must see each
        record once (the feature cache) reads this, not ``__getitem__``, which would repeat the next record."""
        if i in self._bad_indices:
            return None
        record = self.records[i]
        try:
            pil_images = [load_image(self.root, relative) for relative in record.images]
            turns = self.make_turns(record, [image.size for image in pil_images], self.rng(i))
            check_placeholders(turns, len(pil_images))
        except BadRecord as exc:
            self._bad_indices.add(i)
            self.image_counter.skip(record.where, str(exc))
            self.image_counter.check_running()
            return None
        self.image_counter.ok()
        images = torch.stack([self.transform(im) for im in pil_images]) if pil_images else self.transform.empty()
        return {"images": images, "turns": turns, "dataset": self.name}

    def report(self) -> list[str]:
        """One line per counter, for the per-dataset summary at the end of a run."""
        return [self.record_counter.summary(), self.image_counter.summary()]
