"""Resume checkpoints: everything needed to continue a run bit-for-bit, written atomically, the last K kept.

``<checkpoint_dir>/checkpoints/step_00001000/``:
  trainable.safetensors   the trainable tensors (fp32 master weights)
  optimizer.pt            optimizer state (AdamW moments; bitsandbytes 8-bit state too; under FSDP the gathered one)
  scaler.pt               fp16 loss-scaler state (fp16 runs only)
  rng_<rank>.pt           python / numpy / torch (CPU and CUDA) RNG states of each process
  state.json              step, counters, data position, schedule, run fingerprint; an MoE stage's expert load
                          counts so far (``moe_load``: the summary's whole-run moe_load_share goes on from them)
A checkpoint directory is first written as ``step_N.tmp`` and renamed when complete, so a kill at any moment leaves
the previous checkpoints intact and never a half-written one that resume could pick; a write failure removes it.
``state.json`` records every other file's size and sha256; resume validates every file before restoring anything
and names the damaged file, offering the checkpoint before it.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..errors import UserError
from ..io_utils import atomic_write_text, make_readable, writing
from . import sharded

STEP_DIR = re.compile(r"^step_(\d{8})$")


def checkpoints_root(checkpoint_dir: str | Path) -> Path:
    return Path(checkpoint_dir) / "checkpoints"


def list_checkpoints(checkpoint_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoints_root(checkpoint_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name) and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def find_resume(resume, checkpoint_dir: str | Path, where: str) -> Optional[Path]:
    """``run.resume``: false -> None; auto -> latest or None; true -> latest (must exist); a path -> that one."""
    if resume is False or (isinstance(resume, str) and resume.lower() in ("false", "no", "off")):
        return None
    if resume is True or (isinstance(resume, str) and resume.lower() in ("true", "auto", "latest")):
        found = list_checkpoints(checkpoint_dir)
        if found:
            return found[-1]
        if resume is True or resume.lower() in ("true", "latest"):
            raise UserError(f"{where}: run.resume: no checkpoint in {checkpoints_root(checkpoint_dir)}")
        return None
    path = Path(resume)
    if path.is_dir() and STEP_DIR.match(path.name) is None and list_checkpoints(path):
        return list_checkpoints(path)[-1]  # a checkpoint_dir was named: take its latest
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
                    keep_last: int) -> Path:
    """Write ``step_N`` (all processes call this: each writes its RNG state); returns its path.

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
                for stale in root.glob("step_*.tmp"):  # left by a run that was killed while writing
                    shutil.rmtree(stale, ignore_errors=True)
                tmp.mkdir(parents=True)
            accelerator.wait_for_everyone()
            torch.save(rng_state(), tmp / f"rng_{accelerator.process_index}.pt")
            if main:
                save_file(weights, str(tmp / "trainable.safetensors"), metadata={"format": "pt"})
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
                if final.exists():
                    shutil.rmtree(final)
                tmp.rename(final)
                for old in list_checkpoints(checkpoint_dir)[:-keep_last]:
                    shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    accelerator.wait_for_everyone()
    return final


def _damaged(file: Path, reason: str) -> UserError:
    """One error naming the damaged file, offering the checkpoint before it."""
    ckpt = file.parent
    step = STEP_DIR.match(ckpt.name)
    earlier = [p for p in list_checkpoints(ckpt.parent.parent)
               if step is not None and int(STEP_DIR.match(p.name).group(1)) < int(step.group(1))]
    offer = (f"resume from the previous checkpoint with --options run.resume={earlier[-1]}" if earlier else
             "no earlier checkpoint; start afresh with --options run.resume=false")
    return UserError(f"{file}: damaged checkpoint file ({reason}); {offer}")


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


def read_checkpoint(path: Path, rank: int, with_scaler: bool) -> dict:
    """Every file of the checkpoint, read and validated before anything is restored; a damaged one raises one
    ``UserError`` naming it. Returns {"state", "weights", "optimizer", "scaler", "rng"}."""
    state = _read(path / "state.json", lambda f: json.loads(f.read_text(encoding="utf-8")))
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise _damaged(path / "state.json", "no integer 'step'")
    for name, expected in (state.get("files") or {}).items():  # checkpoints written before the manifest have none
        file = path / name
        if not file.is_file():
            raise _damaged(file, "missing")
        if file.stat().st_size != expected.get("bytes") or _digest(file)["sha256"] != expected.get("sha256"):
            raise _damaged(file, "its size or sha256 differs from state.json's record")
    loaded = {"state": state, "scaler": None, "rng": None}
    loaded["weights"] = _read(path / "trainable.safetensors", lambda f: load_file(str(f)))
    optim = _read(path / "optimizer.pt", lambda f: torch.load(f, map_location="cpu", weights_only=True))
    if not isinstance(optim, dict) or not {"state", "param_groups"} <= set(optim):
        raise _damaged(path / "optimizer.pt", "not an optimizer state")
    loaded["optimizer"] = optim
    if with_scaler and (path / "scaler.pt").is_file():
        loaded["scaler"] = _read(path / "scaler.pt", lambda f: torch.load(f, weights_only=True))
    rng_file = path / f"rng_{rank}.pt"
    if rng_file.is_file() or "files" in state:
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
