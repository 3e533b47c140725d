"""What must hold before a training run starts, beyond its config: one run at a time per checkpoint directory, a
checkpoint to resume from that lies within the schedule, and a word when the run resumes with other settings.

    check_resume(cfg)                    # the checkpoint run.resume picks (or None); UserError when it cannot be used
    with run_lock(cfg, is_main):         # UserError when another live run holds cfg.checkpoint_dir
        ...
    changed_settings(state.get("fingerprint"), run_fingerprint(cfg))   # ["schedule.init_lr: 0.001 -> 0.005", ...]

The lock is an flock on ``<checkpoint_dir>/run.lock`` (beside ``checkpoints/``) held by the main process for the
whole run: the kernel drops it when that process ends, however it ends, so a killed run never leaves a stale lock.
The fingerprint is the settings that decide what the resumed steps compute (schedule, optimizer, seed, micro-batch
layout, image size, each dataset's batch size and ratio); paths are left out, so a moved data folder is no change.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Iterator, Optional

from ..config.load import config_to_dict
from ..config.schema import RunConfig
from ..errors import UserError
from ..io_utils import exclusive_lock
from . import checkpoint as ckpt


def check_resume(cfg: RunConfig) -> Optional[Path]:
    """run.resume's checkpoint (None: start fresh), checked before any model is loaded: it exists, and its step is
    not past schedule.total_steps."""
    found = ckpt.find_resume(cfg.run.resume, cfg.checkpoint_dir, cfg.origin("run.resume"))
    if found is None:
        return None
    try:
        step = int(json.loads((found / "state.json").read_text(encoding="utf-8"))["step"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{found / 'state.json'}: not a readable checkpoint state ({type(exc).__name__}); resume from "
                        "an earlier checkpoint with run.resume=PATH, or start fresh with run.resume=false") from None
    total = cfg.schedule.total_steps
    if step > total:
        raise UserError(f"{cfg.origin('run.resume')}: run.resume: {found} is at step {step}, past "
                        f"schedule.total_steps {total} ({cfg.origin('schedule.total_steps')}); raise total_steps, or "
                        "start fresh with run.resume=false")
    return found


def run_fingerprint(cfg: RunConfig) -> dict[str, Any]:
    settings = config_to_dict(cfg)
    flat = {f"schedule.{k}": v for k, v in settings["schedule"].items()}
    flat.update({f"optim.{k}": v for k, v in settings["optim"].items()})
    flat.update({"run.seed": cfg.run.seed, "run.grad_accum_steps": cfg.run.grad_accum_steps,
                 "model.image_size": settings["model"].get("image_size")})
    for name, spec in cfg.active_datasets().items():
        flat[f"data.datasets.{name}.batch_size"] = spec.batch_size
        flat[f"data.datasets.{name}.sample_ratio"] = spec.sample_ratio
    return json.loads(json.dumps(flat, default=str))  # as state.json gives it back (tuples as lists)


def changed_settings(saved: Optional[dict], now: dict) -> list[str]:
    """``key: before -> now`` for every fingerprint entry that differs (none for a checkpoint without one)."""
    if not saved:
        return []
    return [f"{key}: {saved.get(key)!r} -> {value!r}" for key, value in now.items() if saved.get(key) != value]


@contextlib.contextmanager
def run_lock(cfg: RunConfig, is_main: bool = True) -> Iterator[None]:
    if not is_main:
        yield
        return
    path = Path(cfg.checkpoint_dir) / "run.lock"
    with exclusive_lock(path, lambda holder: (
            f"{cfg.origin('run.output_dir')}: run.output_dir: another run (process {holder}) is training into "
            f"{cfg.run.output_dir} now ({path} is locked); wait for it, or give this run another run.output_dir")):
        yield
