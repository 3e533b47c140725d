"""The predictions file of an evaluation run and what guards it: one run at a time per out_dir, and a file made by
another run (another benchmark, split, data path, data content, model path, model content, backend or prompt)
refused.

    with run_lock(out_dir, where):               # UserError: another evaluation holds <out_dir>/run.lock
        done = read_predictions(path, fingerprint(cfg))

``model_id`` (in the fingerprint): a cheap content id of the model files, so a model replaced at the same path (a
retrained stage, a new export) is refused rather than silently reusing the old answers. For a PyTorch model directory
it is the size and mtime (ns) of config.json and every ``*.safetensors`` of each directory of its ``base_model`` chain
(no file is read but config.json); for a GGUF directory those of every ``*.gguf``. A copy of the directory (new
mtimes) counts as another model: rerun with --restart.

``data_id`` (in the fingerprint): the content id of the benchmark's annotation files, so annotations written again at
the same root (a new version, other questions or answers) are refused rather than reused. It is the sha256 of the
bytes of every file the benchmark's ``load`` reads for the split (benchmarks.data_files: the questions / annotations
JSON, JSONL or pickle, whatever the limit), so it does not change when nothing did (a touch, or the same bytes
written again, keep it). The images are left out: an image folder (COCO: tens of thousands of files) would cost a
listing and a stat of every file on every run, and an official image does not change under its name. Predictions saved
before data_id existed have none: they are refused the same way (rerun with --restart).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Iterator

from ..errors import UserError
from ..io_utils import dirs_removed_on_failure, exclusive_lock
from ..model.checkpoint_io import model_chain
from .benchmark import Prediction
from .benchmarks import data_files
from .config import EvalConfig

PREDICTIONS = "predictions.jsonl"
SUMMARY = "summary.json"
LOCK = "run.lock"


def _chain(directory: Path) -> list[Path]:
    """A PyTorch model directory and the directories its ``base_model`` chain leads to; just the directory when the
    chain is broken (loading the model reports that, not this)."""
    try:
        return model_chain(directory)
    except UserError:
        return [directory]


def _model_file(name: str, backend: str) -> bool:
    return name.endswith(".gguf") if backend == "gguf" else name == "config.json" or name.endswith(".safetensors")


def model_id(path: str | os.PathLike, backend: str) -> str:
    """The model's content id (see the module docstring): 16 hex digits, or ``missing`` without any model file."""
    root = Path(path)
    directories = _chain(root) if backend == "torch" else [root]
    stats = []
    for number, directory in enumerate(directories):
        try:
            names = sorted(p.name for p in directory.iterdir() if p.is_file() and _model_file(p.name, backend))
        except OSError:
            continue
        for name in names:
            try:
                found = (directory / name).stat()
            except OSError:
                continue
            stats.append([number, name, found.st_size, found.st_mtime_ns])
    if not stats:
        return "missing"
    return hashlib.sha256(json.dumps(stats).encode()).hexdigest()[:16]


def data_id(files: list[Path], root: str | os.PathLike) -> str:
    """The content id of the benchmark files (see the module docstring): 16 hex digits of the sha256 of each file's
    name (relative to ``root`` where it is under it) and the sha256 of its bytes (``missing`` for a file not there)."""
    root = Path(root).resolve()
    entries = []
    for path in files:
        path = Path(path).resolve()
        name = str(path.relative_to(root)) if path.is_relative_to(root) else str(path)
        try:
            with open(path, "rb") as f:
                entries.append([name, hashlib.file_digest(f, "sha256").hexdigest()])
        except OSError:
            entries.append([name, "missing"])
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()[:16]


def fingerprint(cfg: EvalConfig) -> dict:
    """What decides the answers (so a file with another fingerprint cannot be resumed); not the scoring, not the
    limit (a rerun with a larger limit continues)."""
    model, bench = cfg.launch.model, cfg.benchmark
    files = data_files(bench.name, Path(bench.root), bench.split, bench.options)
    return {"benchmark": bench.name, "split": bench.split,
            "root": str(Path(bench.root).resolve()), "data_id": data_id(files, bench.root),
            "model": str(Path(model.path).resolve()),
            "model_id": model_id(model.path, model.backend),
            "backend": {"name": model.backend, "bits": model.bits, "qtype": model.qtype},
            "options": {k: v for k, v in sorted(cfg.benchmark.options.items()) if k != "limit"}}


def read_predictions(path: Path, expected: dict) -> dict[str, Prediction]:
    """The predictions already in ``path`` (id -> Prediction); cuts a last line left unfinished by a kill off the
    file. Another run's file (its fingerprint differs) is a UserError saying what differs."""
    if not path.is_file():
        return {}
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1  # everything after the last newline is a line a kill cut off
    lines = data[:end].decode("utf-8", errors="replace").splitlines()
    if not lines:
        path.write_bytes(b"")
        return {}
    try:
        header = json.loads(lines[0])["fingerprint"]
        if not isinstance(header, dict):
            raise TypeError
    except (ValueError, KeyError, TypeError):
        raise UserError(f"{path}: line 1 is not a predictions header (not written by tinygpt evaluate?); move it "
                        "away or rerun with --restart") from None
    if header != expected:
        differ = [f"{key} {header.get(key)!r} (now {expected[key]!r})" for key in expected
                  if header.get(key) != expected[key]]
        if "model_id" in header and header.get("model_id") != expected["model_id"] and all(
                header.get(key) == expected[key] for key in ("model", "backend")):  # else another model, named above
            differ.append("the model files changed since these predictions were made")
        if "data_id" not in header:
            differ.append("these predictions were made before tinygpt recorded the benchmark files' content, so "
                          "they cannot be checked against the files now")
        elif header["data_id"] != expected["data_id"] and all(
                header.get(key) == expected[key] for key in ("benchmark", "split", "root")):
            differ.append("the benchmark files changed since these predictions were made")
        raise UserError(f"{path}: predictions of another run ({'; '.join(differ)}); rerun with --restart to move "
                        "them aside, or choose another run.out_dir")
    done = {}
    for number, line in enumerate(lines[1:], start=2):
        try:
            prediction = Prediction.from_json(json.loads(line))
        except (ValueError, KeyError, TypeError):
            raise UserError(f"{path}: line {number} is not a prediction; rerun with --restart to start over") from None
        done[prediction.id] = prediction
    if end < len(data):
        with open(path, "r+b") as f:
            f.truncate(end)
    return done


def move_aside(out_dir: Path) -> list[Path]:
    """``--restart``: predictions.jsonl and summary.json renamed to ``<name>.<time>.old`` (``<time>-2`` ... when a
    restart in the same second moved some already: an earlier run's files are never overwritten); the new names."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    free, number = stamp, 1
    while any((out_dir / f"{name}.{free}.old").exists() for name in (PREDICTIONS, SUMMARY)):
        number += 1
        free = f"{stamp}-{number}"
    moved = []
    for name in (PREDICTIONS, SUMMARY):
        if (out_dir / name).exists():
            target = out_dir / f"{name}.{free}.old"
            (out_dir / name).rename(target)
            moved.append(target)
    return moved


def _has_predictions(path: Path) -> bool:
    """Whether a predictions file holds a prediction (a line after the header); an unreadable one counts as yes."""
    try:
        with open(path, "rb") as f:
            return sum(1 for line in f if line.endswith(b"\n")) > 1
    except FileNotFoundError:
        return False
    except OSError:
        return True


def _remove_unused(out_dir: Path, made: bool, had_predictions: bool) -> None:
    """After a failed run (the lock still held): a predictions file it made without a prediction goes, and so does
    run.lock when the run made ``out_dir`` and nothing else is in it (its folders then go with
    io_utils.dirs_removed_on_failure). What was there before is never touched."""
    predictions = out_dir / PREDICTIONS
    if not had_predictions and predictions.is_file() and not _has_predictions(predictions):
        with contextlib.suppress(OSError):
            predictions.unlink()
    if made:
        with contextlib.suppress(OSError):
            if os.listdir(out_dir) == [LOCK]:
                (out_dir / LOCK).unlink()


def _ours(path: Path) -> bool:
    """Whether ``path`` is still the lock file this process holds (a failed run removes its own; one that opened it
    just before then holds a file nobody else sees)."""
    try:
        return path.read_text(errors="replace").split()[:1] == [str(os.getpid())]
    except OSError:
        return False


@contextlib.contextmanager
def run_lock(out_dir: Path, where: str = "run.out_dir") -> Iterator[None]:
    """An flock on ``<out_dir>/run.lock`` held for the block (the kernel drops it when the process ends, however it
    ends: a killed run leaves no stale lock); another live evaluation holding it is a UserError, at once, and so is a
    lock file that cannot be opened (``where``: who set run.out_dir). A block that fails before any prediction is
    written removes what the run made: the predictions file (its header only) and, when the run made ``out_dir``,
    run.lock and the folders it made; an ``out_dir`` that was there keeps all it held."""
    out_dir = Path(out_dir)
    path, made, had_predictions = out_dir / LOCK, not out_dir.exists(), (out_dir / PREDICTIONS).exists()

    def busy(holder: str) -> str:
        return (f"{out_dir} is in use by another evaluation (process {holder}); wait for it, or give this run "
                "another run.out_dir")

    # the folders made for the run go again when it fails (empty: run.lock removed by _remove_unused, the lock
    # released first: the ExitStack closes before them)
    with dirs_removed_on_failure(out_dir), contextlib.ExitStack() as held:
        for _ in range(3):
            try:
                held.enter_context(exclusive_lock(path, busy))
            except OSError as error:
                raise UserError(f"{where}: cannot use {path} as the run's lock file ({error.strerror or error}); "
                                "move it away or choose another run.out_dir") from None
            if _ours(path):
                break
            held.close()  # a run that failed removed this lock file: take a new one
        else:
            raise UserError(busy("?"))
        try:
            yield
        except BaseException:
            _remove_unused(out_dir, made, had_predictions)
            raise
