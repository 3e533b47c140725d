"""Resume checkpoints: everything needed to continue a run bit-for-bit, written atomically, the last K kept.

``<checkpoint_dir>/checkpoints/step_00001000/``:
  trainable.safetensors   the trainable tensors (fp32 master weights)
  optimizer.pt            optimizer state (AdamW moments; bitsandbytes 8-bit state too; under FSDP the gathered one)
  scaler.pt               fp16 loss-scaler state (fp16 runs only)
  rng_<rank>.pt           python / numpy / torch (CPU and CUDA) RNG states of each process
  state.json              step, counters, data position, schedule, run fingerprint; an MoE stage's expert load
                          counts so far (``moe_load``: the summary's whole-run moe_load_share goes on from them)
A checkpoint directory is first written as ``step_N.tmp`` and renamed when complete, so a kill at any moment leaves
the previous checkpoints intact and never a half-written one that resume could pick; a write failure removes it. A
checkpoint that goes (one of the same step replaced, one past ``keep_last``, one of the run a new one replaces once
that has written its first checkpoint: ``replaced_by``) is first renamed to ``step_N.old.tmp`` and only then deleted,
so a kill during the deletion leaves no partial ``step_N`` either; ``remove_temporaries`` sweeps such leftovers (every
save does, and so does the start of a run).
``state.json`` records every other file's size and sha256; ``verify_checkpoint`` checks them and state.json's own
values (``checkpoint_state.py``) without loading a tensor (run_guard calls it before the model loads), and resume reads
every file before restoring anything; either names the damaged file, offering the checkpoint before it.
``newest_intact`` is what ``run.resume`` auto / true take: the newest checkpoint that verifies, and the newer ones
that do not. Those, and the newer ones a resume from an older checkpoint (``run.resume=PATH``) leaves behind, are of
the run this one replaces (``replaced_by``): kept until this run writes its first checkpoint, then removed with it
(``save_checkpoint``'s ``replaces``); one of the same step as that first checkpoint is replaced as any same-step one
(moved aside first).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..errors import UserError
from ..io_utils import atomic_write_text, make_readable, writing
from ..paths import TRAINABLE_FILE
from . import sharded
from .checkpoint_state import STEP_DIR, state_problem

log = logging.getLogger("tinygpt.train")

REQUIRED_FILES = (TRAINABLE_FILE, "optimizer.pt", "rng_0.pt")  # in every manifest


def checkpoints_root(checkpoint_dir: str | Path) -> Path:
    return Path(checkpoint_dir) / "checkpoints"


def list_checkpoints(checkpoint_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    return _step_dirs(checkpoints_root(checkpoint_dir))


def step_of(path: Path) -> int:
    """The step a ``step_N`` directory is named after."""
    return int(STEP_DIR.match(path.name).group(1))


def _step_dirs(root: Path) -> list[Path]:
    """The ``step_N`` directories holding a state.json directly in ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name) and (p / "state.json").is_file()]
    return sorted(found, key=step_of)


def replaced_by(checkpoint_dir: str | Path, step: Optional[int]) -> list[Path]:
    """The checkpoints of the run that a run starting at ``step`` replaces, oldest first: with ``step`` None (a fresh
    start) every one, else every one past ``step`` (a resume from an older checkpoint, or past damaged ones). The run
    keeps them until it writes its first checkpoint (``save_checkpoint``'s ``replaces``), so a stop before that loses
    nothing, and a later ``run.resume`` auto never goes back to them after it."""
    return [p for p in list_checkpoints(checkpoint_dir) if step is None or step_of(p) > step]


def remove_temporaries(checkpoint_dir: str | Path) -> None:
    """Remove the ``step_*.tmp`` folders a killed run left: a checkpoint being written, or one being deleted. Only
    under the run lock (no other run writes into the folder)."""
    root = checkpoints_root(checkpoint_dir)
    for stale in sorted(root.glob("step_*.tmp")) if root.is_dir() else []:
        shutil.rmtree(stale, ignore_errors=True)


def _move_aside(path: Path) -> Path:
    """Rename a checkpoint directory that goes to ``step_N.old.tmp``: a name resume never picks and
    ``remove_temporaries`` removes. Returns the new path."""
    aside = path.with_name(f"{path.name}.old.tmp")
    if aside.exists():
        shutil.rmtree(aside)
    os.rename(path, aside)
    return aside


def discard(path: Path) -> None:
    """Delete a checkpoint directory, moved aside first, so a kill while deleting leaves nothing that resume could
    pick (``remove_temporaries`` finishes the job)."""
    shutil.rmtree(_move_aside(path), ignore_errors=True)


def resume_mode(resume) -> str:
    """``run.resume`` as "off" (false), "latest" (true: the newest checkpoint, which must exist), "auto" (the newest
    if any) or "path" (that checkpoint, or the newest in that folder)."""
    text = resume.lower() if isinstance(resume, str) else None
    if resume is False or text in ("false", "no", "off"):
        return "off"
    if resume is True or text in ("true", "latest"):
        return "latest"
    return "auto" if text == "auto" else "path"


def find_resume(resume, checkpoint_dir: str | Path, where: str) -> Optional[Path]:
    """``run.resume``: false -> None; auto -> latest or None; true -> latest (must exist); a path -> that one."""
    mode = resume_mode(resume)
    if mode == "off":
        return None
    if mode in ("latest", "auto"):
        found = list_checkpoints(checkpoint_dir)
        if found:
            return found[-1]
        if mode == "latest":
            raise UserError(f"{where}: run.resume: no checkpoint in {checkpoints_root(checkpoint_dir)}")
        return None
    path = Path(resume)
    if not path.exists():
        raise UserError(f"{where}: run.resume: {path} does not exist")
    if path.is_dir() and STEP_DIR.match(path.name) is None and not (path / "state.json").is_file():
        latest = list_checkpoints(path) or _step_dirs(path)  # a checkpoint_dir, or its checkpoints/ folder
        if latest:
            return latest[-1]
    if not (path / "state.json").is_file():
        raise UserError(f"{where}: run.resume: {path} is not a checkpoint (no state.json)")
    return path


def rng_state() -> dict:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    numpy_state = [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)]
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _digest(path: Path) -> dict:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            sha.update(block)
    return {"bytes": path.stat().st_size, "sha256": sha.hexdigest()}


def save_checkpoint(accelerator, model, optimizer, step: int, checkpoint_dir: str | Path, state: dict,
                    keep_last: int, replaces: tuple[Path, ...] = (), on_placed=None) -> Path:
    """Write ``step_N`` (all processes call this: each writes its RNG state); returns its path. ``replaces``: the
    checkpoints of the run this one replaces (``replaced_by``, kept until now), discarded once ``step_N`` is in place
    and before ``keep_last`` counts (one of step N was moved aside and replaced as any same-step one). ``on_placed``
    (main process): called as soon as ``step_N`` is in place, before anything is discarded (the training curve
    follows the checkpoints a stop would resume from, train.metrics_log).

    A write failure (full disk, permissions) raises one ``UserError`` naming the checkpoint; the partial
    ``step_N.tmp`` is removed and the earlier checkpoints stay as they were."""
    root = checkpoints_root(checkpoint_dir)
    final = root / f"step_{step:08d}"
    tmp = root / f"step_{step:08d}.tmp"
    main = accelerator.is_main_process
    weights = optim_state = None
    if main or sharded.is_fsdp(accelerator):  # collective under FSDP: every process gathers, the main one writes
        weights = sharded.trainable_state(accelerator, model)
        optim_state = sharded.optimizer_state(accelerator, model, optimizer)
    try:
        with writing(tmp, f"the checkpoint of step {step}"):
            if main:
                remove_temporaries(checkpoint_dir)  # left by a run that was killed while writing or deleting
                tmp.mkdir(parents=True)
            accelerator.wait_for_everyone()
            torch.save(rng_state(), tmp / f"rng_{accelerator.process_index}.pt")
            if main:
                save_file(weights, str(tmp / TRAINABLE_FILE), metadata={"format": "pt"})
                torch.save(optim_state, tmp / "optimizer.pt")
                scaler = getattr(accelerator, "scaler", None)
                if scaler is not None:
                    torch.save(scaler.state_dict(), tmp / "scaler.pt")
            accelerator.wait_for_everyone()
            if main:
                files = {}
                for file in sorted(tmp.iterdir()):
                    make_readable(file)
                    files[file.name] = _digest(file)
                record = {"step": step, **state, "files": files}
                atomic_write_text(tmp / "state.json", json.dumps(record, indent=1, sort_keys=True))
                make_readable(tmp)
                # a checkpoint of the same step is never deleted in place: a kill then would leave a partial step_N
                replaced = _move_aside(final) if final.exists() else None
                tmp.rename(final)
                if on_placed is not None:
                    on_placed()
                if replaced is not None:
                    shutil.rmtree(replaced, ignore_errors=True)
                for stale in replaces:  # never step_N itself: one of the same step was moved aside above
                    if stale != final and stale.is_dir():
                        discard(stale)
                # keep_last counts step_N and those before it: one past it is not this run's (those the replaced
                # run left went with this run's first checkpoint, just above)
                for old in [p for p in list_checkpoints(checkpoint_dir) if step_of(p) <= step][:-keep_last]:
                    discard(old)
    except BaseException:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    accelerator.wait_for_everyone()
    return final


class DamagedCheckpoint(UserError):
    """A checkpoint file that is missing, unreadable or not what state.json records: ``file`` and ``reason`` say
    which and how; the message also offers the checkpoint before it."""

    def __init__(self, file: Path, reason: str, message: str):
        super().__init__(message)
        self.file, self.reason = file, reason


def _damaged(file: Path, reason: str) -> DamagedCheckpoint:
    """One error naming the damaged file, offering the checkpoint before it."""
    ckpt = file.parent
    step = STEP_DIR.match(ckpt.name)
    earlier = [p for p in list_checkpoints(ckpt.parent.parent) if step is not None and step_of(p) < step_of(ckpt)]
    offer = (f"resume from the previous checkpoint with --options run.resume={earlier[-1]}" if earlier else
             "no earlier checkpoint; start afresh with --options run.resume=false")
    return DamagedCheckpoint(file, reason, f"{file}: damaged checkpoint file ({reason}); {offer}")


def _read(file: Path, reader):
    if not file.is_file():
        raise _damaged(file, "missing")
    try:
        return reader(file)
    except UserError:
        raise
    except Exception as exc:  # torch, safetensors and json raise many types for truncated or foreign files
        text = str(exc).strip().splitlines()
        raise _damaged(file, f"{type(exc).__name__}: {text[0][:200] if text else 'unreadable'}") from None


def read_state(path: Path) -> dict:
    """The checkpoint's state.json, its values checked (``checkpoint_state.state_problem``); a damaged one raises
    one ``UserError`` naming the key and the checkpoint before it."""
    state = _read(path / "state.json", lambda f: json.loads(f.read_text(encoding="utf-8")))
    problem = state_problem(state, path.name)
    if problem is not None:
        raise _damaged(path / "state.json", problem)
    return state


def _check_manifest(path: Path, state: dict) -> None:
    """Every file state.json records is there with its recorded size and sha256."""
    files = state["files"]
    for name in REQUIRED_FILES:
        if name not in files:
            raise _damaged(path / "state.json", f"its files list has no {name}")
    for name, expected in files.items():
        file = path / name
        if not file.is_file():
            raise _damaged(file, "missing")
        try:
            same = file.stat().st_size == expected["bytes"] and _digest(file)["sha256"] == expected["sha256"]
        except OSError as exc:  # an I/O error, a file without read permission: damaged, so auto takes an older one
            raise _damaged(file, f"unreadable ({exc.strerror or exc})") from None
        if not same:
            raise _damaged(file, "its size or sha256 differs from state.json's record")


def verify_checkpoint(path: Path) -> dict:
    """state.json checked, and every file against its recorded size and sha256, without loading a tensor; a
    checkpoint written before the manifest (no ``files`` in state.json) has each file read by its loader instead.
    Returns state.json. Raises one ``UserError`` naming the damaged file (run_guard calls this before the model
    loads)."""
    state = read_state(path)
    if "files" in state:
        _check_manifest(path, state)
    else:
        _read_files(path, state, 0, with_scaler=False)
    return state


def newest_intact(checkpoint_dir: str | Path) -> tuple[Optional[Path], Optional[dict], list[tuple[Path, str]]]:
    """The newest checkpoint that passes ``verify_checkpoint`` and its state.json (None, None: none does), and each
    newer one that fails it with what is wrong (``optimizer.pt: its size or sha256 differs ...``), newest first."""
    damaged = []
    for path in reversed(list_checkpoints(checkpoint_dir)):
        try:
            return path, verify_checkpoint(path), damaged
        except DamagedCheckpoint as exc:
            damaged.append((path, f"{exc.file.name}: {exc.reason}"))
    return None, None, damaged


def read_checkpoint(path: Path, rank: int, with_scaler: bool) -> dict:
    """Every file of the checkpoint, read and validated before anything is restored; a damaged one raises one
    ``UserError`` naming it. Returns {"state", "weights", "optimizer", "scaler", "rng"}."""
    state = read_state(path)
    if "files" in state:  # checkpoints written before the manifest have none
        _check_manifest(path, state)
    return _read_files(path, state, rank, with_scaler)


def _read_files(path: Path, state: dict, rank: int, with_scaler: bool) -> dict:
    loaded = {"state": state, "scaler": None, "rng": None}
    loaded["weights"] = _read(path / TRAINABLE_FILE, lambda f: load_file(str(f)))
    optim = _read(path / "optimizer.pt", lambda f: torch.load(f, map_location="cpu", weights_only=True))
    if not isinstance(optim, dict) or not {"state", "param_groups"} <= set(optim):
        raise _damaged(path / "optimizer.pt", "not an optimizer state")
    loaded["optimizer"] = optim
    if with_scaler and (path / "scaler.pt").is_file():
        loaded["scaler"] = _read(path / "scaler.pt", lambda f: torch.load(f, weights_only=True))
    rng_file = path / f"rng_{rank}.pt"
    recorded = state.get("files")
    if recorded is not None and rng_file.name not in recorded:  # written by fewer processes than this run has
        writers = sum(1 for name in recorded if name.startswith("rng_"))
        log.warning("%s holds no random state for process %d (written by %d process%s): that process keeps the "
                    "one run.seed gave it, and its dropout draws differ from an uninterrupted run's", path, rank,
                    writers, "" if writers == 1 else "es")
    elif rng_file.is_file() or recorded is not None:
        rng = _read(rng_file, lambda f: torch.load(f, weights_only=True))
        if not isinstance(rng, dict) or not {"python", "numpy", "torch"} <= set(rng):
            raise _damaged(rng_file, "not an RNG state")
        loaded["rng"] = rng
    return loaded


def load_checkpoint(path: Path, accelerator, model, optimizer) -> dict:
    """Validate every file, then restore weights, optimizer, scaler and this process's RNG; returns state.json."""
    scaler = getattr(accelerator, "scaler", None)
    loaded = read_checkpoint(path, accelerator.process_index, scaler is not None)
    weights = loaded["weights"]
    with sharded.full_parameters(accelerator, model) as params:
        wanted = {n for n, p in params.items() if p.requires_grad}
        shapes = {n: tuple(p.shape) for n, p in params.items()}
    if set(weights) != wanted:
        extra, missing = sorted(set(weights) - wanted), sorted(wanted - set(weights))
        raise UserError(f"{path}: checkpoint does not match this stage's trainable set "
                        f"(missing {missing[:3]}, unexpected {extra[:3]}); resume with the same config")
    for name, value in weights.items():
        if shapes[name] != tuple(value.shape):
            raise UserError(f"{path}: tensor {name} has shape {list(value.shape)}, "
                            f"the model has {list(shapes[name])}")

    def restore_optimizer(state: dict) -> None:
        sharded.load_optimizer_state(accelerator, model, optimizer, state)

    for file, restore, value in ((path / "optimizer.pt", restore_optimizer, loaded["optimizer"]),
                                 (path / "scaler.pt", scaler.load_state_dict if scaler else None, loaded["scaler"]),
                                 (path / f"rng_{accelerator.process_index}.pt", set_rng_state, loaded["rng"])):
        if value is None:
            continue
        try:
            restore(value)
        except (ValueError, KeyError, TypeError, RuntimeError, IndexError) as exc:
            raise UserError(f"{file}: does not match this run ({type(exc).__name__}: {exc}); "
                            "resume with the same config") from None
    with sharded.full_parameters(accelerator, model, writeback=True) as params, torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)
    return loaded["state"]
