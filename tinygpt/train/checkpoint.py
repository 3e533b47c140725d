"""Resume checkpoints: everything needed to continue a run bit-for-bit, written atomically, the last K kept.

``<checkpoint_dir>/checkpoints/step_00001000/``:
  trainable.safetensors   the trainable tensors (fp32 master weights)
  optimizer.pt            optimizer state (AdamW moments; bitsandbytes 8-bit state too)
  scaler.pt               fp16 loss-scaler state (fp16 runs only)
  rng_<rank>.pt           python / numpy / torch (CPU and CUDA) RNG states of each process
  state.json              step, counters, data position, schedule, run fingerprint
A checkpoint directory is first written as ``step_N.tmp`` and renamed when complete, so a kill at any moment leaves
the previous checkpoints intact and never a half-written one that resume could pick.
"""

from __future__ import annotations

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
from ..io_utils import atomic_write_text

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


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().to("cpu", copy=True).contiguous() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(accelerator, model, optimizer, step: int, checkpoint_dir: str | Path, state: dict,
                    keep_last: int) -> Path:
    """Write ``step_N`` (all processes call this: each writes its RNG state); returns its path."""
    root = checkpoints_root(checkpoint_dir)
    final = root / f"step_{step:08d}"
    tmp = root / f"step_{step:08d}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    torch.save(rng_state(), tmp / f"rng_{accelerator.process_index}.pt")
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        save_file(trainable_state(unwrapped), str(tmp / "trainable.safetensors"), metadata={"format": "pt"})
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        scaler = getattr(accelerator, "scaler", None)
        if scaler is not None:
            torch.save(scaler.state_dict(), tmp / "scaler.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        atomic_write_text(tmp / "state.json", json.dumps({"step": step, **state}, indent=1, sort_keys=True))
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        for old in list_checkpoints(checkpoint_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(path: Path, accelerator, model, optimizer) -> dict:
    """Restore weights, optimizer, scaler and this process's RNG; returns state.json's content."""
    try:
        state = json.loads((path / "state.json").read_text())
        weights = load_file(str(path / "trainable.safetensors"))
    except (OSError, json.JSONDecodeError, Exception) as exc:  # safetensors raises its own error types
        raise UserError(f"{path}: unreadable checkpoint ({type(exc).__name__}: {exc})") from None
    unwrapped = accelerator.unwrap_model(model)
    params = dict(unwrapped.named_parameters())
    wanted = {n for n, p in params.items() if p.requires_grad}
    if set(weights) != wanted:
        extra, missing = sorted(set(weights) - wanted), sorted(wanted - set(weights))
        raise UserError(f"{path}: checkpoint does not match this stage's trainable set "
                        f"(missing {missing[:3]}, unexpected {extra[:3]}); resume with the same config")
    with torch.no_grad():
        for name, value in weights.items():
            if params[name].shape != value.shape:
                raise UserError(f"{path}: tensor {name} has shape {list(value.shape)}, "
                                f"the model has {list(params[name].shape)}")
            params[name].copy_(value)
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True))
    scaler = getattr(accelerator, "scaler", None)
    if scaler is not None and (path / "scaler.pt").is_file():
        scaler.load_state_dict(torch.load(path / "scaler.pt", weights_only=True))
    rng_file = path / f"rng_{accelerator.process_index}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=True))
    return state
