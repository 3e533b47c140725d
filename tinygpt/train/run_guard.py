"""What must hold before a training run starts, beyond its config: one run at a time per checkpoint directory, a
checkpoint to resume from that is intact, lies within the schedule and was written by this stage, and a word when the
run resumes with other settings.

    already_complete(cfg)                # "already complete: OUT (step N of N); ..." when auto finds the run done
                                         # (None when its output is damaged: the run saves it again from its end)
    check_resume(cfg)                    # the checkpoint run.resume picks (or None); UserError when it cannot be used
                                         # (auto / true: the newest intact one, a warning naming newer damaged ones;
                                         # one line naming the checkpoints of the run this one replaces)
    resume_line(cfg, found)              # "will resume from PATH (step N)" / "no checkpoint in DIR: starting at step 0"
    with run_lock(cfg, is_main):         # UserError when another live run holds cfg.checkpoint_dir
        ...
    changed_settings(state.get("fingerprint"), run_fingerprint(cfg))   # ["schedule.init_lr: 0.001 -> 0.005", ...]

The lock is an flock on ``<checkpoint_dir>/run.lock`` (beside ``checkpoints/``) held by the main process for the
whole run: the kernel drops it when that process ends, however it ends, so a killed run never leaves a stale lock.
The file names the holder's process and output dir, so a run that shares another's run.checkpoint_dir is told whose.
The fingerprint is the settings that decide what the resumed steps compute (schedule, optimizer, seed, micro-batch
layout, precision, packing, max_txt_len, image size, the init_from string, LoRA and MoE settings, prompt template, end
symbol, attention kind, 4-bit loading, each dataset's kind, batch size and ratio; with a stream among the datasets
also data.num_workers and run.save_every); data paths are left out, so a moved data
folder is no change. Settings added to it later are not reported against a checkpoint whose fingerprint predates them.
The stage record (``stage_record``: config file, output, trainable set, dataset names) tells another stage's
checkpoint: one whose trainable set differs, or that another config wrote into another output, is refused (one
written before the record resumes as before).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Iterator, Optional

from ..config.load import config_to_dict
from ..config.schema import RunConfig
from ..errors import UserError
from ..io_utils import exclusive_lock
from ..model.checkpoint_io import WEIGHTS
from . import checkpoint as ckpt

log = logging.getLogger("tinygpt.train")
RANK_VARIABLES = ("RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK", "PMI_RANK")  # as accelerate reads them


def launched_as_main() -> bool:
    """False in a process of a multi-process launch (torchrun, accelerate launch, mpirun) other than rank 0: before
    an accelerator exists, what tells the one process that prints what every process finds."""
    for name in RANK_VARIABLES:
        value = os.environ.get(name, "").strip()
        if value.isdigit():
            return int(value) == 0
    return True


def check_resume(cfg: RunConfig) -> Optional[Path]:
    """run.resume's checkpoint (None: start fresh), checked before any model is loaded: it exists, is intact
    (``checkpoint.verify_checkpoint``: state.json's values, every file's size and sha256), its step is not past
    schedule.total_steps, and this stage wrote it. auto and true take the newest intact one (``_newest_intact``); a
    checkpoint the user named must be intact itself. The checkpoints of the run this one replaces
    (``checkpoint.replaced_by``: a fresh start's old ones, those past the checkpoint resumed from) are named in one
    line (the run and ``--check`` say the same)."""
    where = cfg.origin("run.resume")
    mode = ckpt.resume_mode(cfg.run.resume)
    if mode in ("latest", "auto") and ckpt.list_checkpoints(cfg.checkpoint_dir):
        found, state = _newest_intact(cfg, where)
    else:
        found = ckpt.find_resume(cfg.run.resume, cfg.checkpoint_dir, where)
        if found is None:
            stale = ckpt.replaced_by(cfg.checkpoint_dir, None)  # run.resume false (auto found none)
            if stale and launched_as_main():
                log.warning("starting fresh: %d checkpoints of an earlier run in %s are kept until this run writes "
                            "its first checkpoint, then removed", len(stale), ckpt.checkpoints_root(cfg.checkpoint_dir))
            return None
        state = ckpt.verify_checkpoint(found)
    step, total = state["step"], cfg.schedule.total_steps
    if step > total:
        raise UserError(f"{cfg.origin('run.resume')}: run.resume: {found} is at step {step}, past "
                        f"schedule.total_steps {total} ({cfg.origin('schedule.total_steps')}); raise total_steps, or "
                        "start fresh with run.resume=false")
    changed = changed_settings(state.get("fingerprint"), run_fingerprint(cfg))
    its_end = (state.get("fingerprint") or {}).get("schedule.total_steps", step) == step  # not a run stopped early
    if step == total and its_end and changed and ckpt.resume_mode(cfg.run.resume) != "path":
        # the end of a finished run, picked by auto/true: resuming would only re-save it under new settings (a path
        # the user named, e.g. to write a lost output again, is taken as asked; a run killed at step 150 of 200 and
        # given total_steps 150 to end there is resumed: it writes its output)
        listed = "; ".join(changed[:3]) + (" ..." if len(changed) > 3 else "")
        raise UserError(f"{cfg.origin('run.resume')}: run.resume: {found} is the end of a finished run (step {step} "
                        f"of {total}), made with other settings ({listed}); "
                        "nothing is left to train: retrain with run.resume=false, or raise schedule.total_steps to "
                        "go on from it")
    _check_same_stage(cfg, found, state.get("stage"))
    stale = ckpt.replaced_by(cfg.checkpoint_dir, step) if step < total else []  # (at the end it writes none)
    if mode == "path" and stale and launched_as_main():  # (auto / true: the damaged ones, named above)
        what = (f"the {len(stale)} newer checkpoints" if len(stale) > 1 else "the newer checkpoint")
        log.warning("resuming from step %d: %s in %s (%s) %s of the run this one replaces: kept until this run "
                    "writes its first checkpoint, then removed", step, what, ckpt.checkpoints_root(cfg.checkpoint_dir),
                    ", ".join(p.name for p in stale), "are" if len(stale) > 1 else "is")
    return found


def _newest_intact(cfg: RunConfig, where: str) -> tuple[Path, dict]:
    """The newest checkpoint that verifies and its state.json; a newer, damaged one is named in one warning (it is
    kept until the run writes its first checkpoint, then removed: ``checkpoint.replaced_by``), and with none intact
    one error names each and what is wrong with it."""
    found, state, damaged = ckpt.newest_intact(cfg.checkpoint_dir)
    told = "; ".join(f"{path} is damaged ({why})" for path, why in damaged)
    if found is None:
        raise UserError(f"{where}: run.resume: no checkpoint in {ckpt.checkpoints_root(cfg.checkpoint_dir)} is "
                        f"intact: {told}; start afresh with --options run.resume=false")
    if damaged and launched_as_main():
        log.warning("%s; resuming from %s instead; %s kept until this run writes its first checkpoint, then removed",
                    told, found, "they are" if len(damaged) > 1 else "it is")
    return found, state


def resume_line(cfg: RunConfig, found: Optional[Path]) -> Optional[str]:
    """Where the run starts, in one line: ``will resume from PATH (step N)``, ``no checkpoint in DIR: starting at
    step 0`` (run.resume auto), or None (run.resume false)."""
    if found is not None:
        step = json.loads((found / "state.json").read_text(encoding="utf-8"))["step"]
        return f"will resume from {found} (step {step})"
    if ckpt.resume_mode(cfg.run.resume) == "auto":
        return f"no checkpoint in {ckpt.checkpoints_root(cfg.checkpoint_dir)}: starting at step 0"
    return None


def already_complete(cfg: RunConfig) -> Optional[str]:
    """With run.resume auto, the line to print instead of training again when the run is done: its newest checkpoint
    is at schedule.total_steps and the output's train_summary.json says that run finished (end_step total_steps, the
    same fingerprint as the checkpoint and as this config). None otherwise (also when anything cannot be read)."""
    found = ckpt.list_checkpoints(cfg.checkpoint_dir) if ckpt.resume_mode(cfg.run.resume) == "auto" else []
    if not found:
        return None
    total, out = cfg.schedule.total_steps, Path(cfg.run.output_dir)
    try:
        state = json.loads((found[-1] / "state.json").read_text(encoding="utf-8"))
        record = json.loads((out / "train_summary.json").read_text(encoding="utf-8"))
        end_step = record["summary"]["end_step"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    fingerprint = run_fingerprint(cfg)
    if not (isinstance(state, dict) and state.get("step") == total and end_step == total
            and _same(state.get("fingerprint"), fingerprint) and _same(record.get("fingerprint"), fingerprint)):
        return None
    damage = _output_damage(out)
    if damage is None and record.get("checkpoint_files", state.get("files")) != state.get("files"):
        damage = "it is not the output of the run that wrote this checkpoint (a run stopped while writing its output)"
    if damage:  # the run resumes from its final checkpoint, trains no step and writes the output again
        log.warning("%s: %s; writing the output again from %s", out, damage, found[-1])
        return None
    return f"already complete: {out} (step {total} of {total}); run.resume=false retrains it"


def newest_checkpoint_files(cfg: RunConfig) -> Optional[dict]:
    """The files record (name -> bytes, sha256) of the newest checkpoint, the run's final one when its output is
    written: kept in train_summary.json, so that ``already_complete`` tells an output another run wrote (a retrain
    killed after its final checkpoint, before its output replaced the old one) from this run's."""
    found = ckpt.list_checkpoints(cfg.checkpoint_dir)
    try:
        return json.loads((found[-1] / "state.json").read_text(encoding="utf-8")).get("files") if found else None
    except (OSError, ValueError, AttributeError):
        return None


def _output_damage(out: Path) -> str | None:
    """What is wrong with a finished run's output directory (deleted or cut-short weights, no config.json), or None.
    Opening the weights reads only their header, which safetensors checks against the file's size."""
    from safetensors import safe_open

    if not (out / "config.json").is_file():
        return "config.json is missing"
    try:
        with safe_open(str(out / WEIGHTS), "pt"):
            return None
    except FileNotFoundError:
        return f"{WEIGHTS} is missing"
    except Exception as exc:  # safetensors' own error types for a cut-short or foreign file
        return f"{WEIGHTS} is unreadable ({type(exc).__name__})"


def _same(saved, fingerprint: dict) -> bool:
    """``saved`` is a fingerprint that names no change from ``fingerprint`` (one from before a setting was added
    to it counts as the same)."""
    return isinstance(saved, dict) and bool(saved) and not changed_settings(saved, fingerprint)


def stage_record(cfg: RunConfig) -> dict[str, Any]:
    """What tells one stage's checkpoints from another's (kept in each checkpoint's state.json as ``stage``)."""
    return {"config": cfg.source, "output_dir": os.path.abspath(cfg.run.output_dir),
            "trainable": cfg.model.trainable, "datasets": sorted(cfg.active_datasets())}


def _check_same_stage(cfg: RunConfig, found: Path, saved: Optional[dict]) -> None:
    """Refuse a checkpoint of another stage: another trainable set, or another config that wrote into another output
    (the same config into another output is a moved or deliberate copy; another config into the same output, a renamed
    config). A checkpoint written before the record passes."""
    if not saved:
        return
    now = stage_record(cfg)
    if saved["trainable"] == now["trainable"] and (saved["config"] == now["config"]
                                                   or saved["output_dir"] == now["output_dir"]):
        return
    raise UserError(f"{cfg.origin('run.resume')}: run.resume: {found} is a checkpoint of another stage: "
                    f"{saved['config']} wrote it into {saved['output_dir']} (model.trainable {saved['trainable']}), "
                    f"this run is {now['config']} into {now['output_dir']} (model.trainable {now['trainable']}); "
                    "resume from this stage's own checkpoints (run.resume=PATH), or give it its own "
                    "run.checkpoint_dir")


def streaming_datasets(cfg: RunConfig) -> list[str]:
    """The active datasets that are streams (their kind's loader an IterableDataset, e.g. webdataset_pairs): these
    restart at every checkpoint and are split among the data workers, so save_every and num_workers shape their data."""
    from torch.utils.data import IterableDataset

    from ..data.registry import KINDS

    def streams(kind: str) -> bool:
        loader = getattr(KINDS.get(kind), "loader", None)
        return isinstance(loader, type) and issubclass(loader, IterableDataset)

    return sorted(name for name, spec in cfg.active_datasets().items() if streams(spec.kind))


# settings the fingerprint took in later, by generation: a checkpoint whose fingerprint predates a generation (it
# lacks that generation's first key) is not told its settings changed, as nothing says what they were (a dataset's
# kind: see changed_settings)
ADDED_LATER_BY_GENERATION = (
    ("run.precision", "run.packing.", "model.max_txt_len", "model.init_from", "data.num_workers", "run.save_every"),
    ("model.end_sym", "model.prompt_template", "model.attention", "model.load_in_4bit", "model.lora", "model.moe"),
)
ADDED_LATER = tuple(key for generation in ADDED_LATER_BY_GENERATION for key in generation)


def run_fingerprint(cfg: RunConfig) -> dict[str, Any]:
    settings = config_to_dict(cfg)
    flat = {f"schedule.{k}": v for k, v in settings["schedule"].items()}
    flat.update({f"optim.{k}": v for k, v in settings["optim"].items()})
    flat.update({"run.seed": cfg.run.seed, "run.grad_accum_steps": cfg.run.grad_accum_steps,
                 "model.image_size": settings["model"].get("image_size"), "run.precision": cfg.run.precision,
                 "run.packing.enabled": cfg.run.packing.enabled, "model.max_txt_len": cfg.model.max_txt_len,
                 "model.init_from": cfg.model.init_from, "model.end_sym": cfg.model.end_sym,
                 "model.prompt_template": cfg.model.prompt_template, "model.attention": cfg.model.attention,
                 "model.load_in_4bit": cfg.model.load_in_4bit})
    for section in ("lora", "moe"):  # each setting named on its own (model.lora.alpha: 16.0 -> 64.0); None: off
        value = settings["model"][section]
        flat.update({f"model.{section}.{k}": v for k, v in value.items()} if value else {f"model.{section}": None})
    if cfg.run.packing.enabled:
        flat["run.packing.tokens_per_row"] = cfg.run.packing.tokens_per_row
    if streaming_datasets(cfg):  # streams restart at each checkpoint, and the workers split them
        flat.update({"data.num_workers": cfg.data.num_workers, "run.save_every": cfg.run.save_every})
    for name, spec in cfg.active_datasets().items():
        flat[f"data.datasets.{name}.batch_size"] = spec.batch_size
        flat[f"data.datasets.{name}.sample_ratio"] = spec.sample_ratio
        flat[f"data.datasets.{name}.kind"] = spec.kind
    return json.loads(json.dumps(flat, default=str))  # as state.json gives it back (tuples as lists)


def _is_kind(key: str) -> bool:
    return key.startswith("data.datasets.") and key.endswith(".kind")


def changed_settings(saved: Optional[dict], now: dict) -> list[str]:
    """``key: before -> now`` for every fingerprint entry that differs, in this run's or in the checkpoint's (a
    dataset dropped from the config: ``data.datasets.x.batch_size: 16 -> None``); none for a checkpoint without
    one, nor for the settings ``ADDED_LATER`` when the checkpoint's fingerprint predates them. A dataset's kind is
    named only when it changes (a dataset added or dropped is named by its batch size and ratio)."""
    if not saved:
        return []
    predates = tuple(key for keys in ADDED_LATER_BY_GENERATION if keys[0] not in saved for key in keys)
    keys = [key for key in now if not (key not in saved and key.startswith(predates))]
    keys += [key for key in saved if key not in now]
    keys = [key for key in keys if not (_is_kind(key) and (key not in saved or key not in now))]
    return [f"{key}: {saved.get(key)!r} -> {now.get(key)!r}" for key in keys if saved.get(key) != now.get(key)]


@contextlib.contextmanager
def run_lock(cfg: RunConfig, is_main: bool = True) -> Iterator[None]:
    """The flock on ``<checkpoint_dir>/run.lock``; the file holds the holder's process id, and on its second line
    its output dir (so a run with another output that shares the run.checkpoint_dir is told whose it is)."""
    if not is_main:
        yield
        return
    path = Path(cfg.checkpoint_dir) / "run.lock"
    with exclusive_lock(path, lambda holder: _busy(cfg, path, holder), note=os.path.abspath(cfg.run.output_dir)):
        yield


def _busy(cfg: RunConfig, path: Path, holder: str) -> str:
    """The message for a run.lock another live process holds (``holder``: the lock file's text)."""
    lines = holder.splitlines()
    pid = lines[0].strip() if lines and lines[0].strip() else "?"
    theirs = lines[1].strip() if len(lines) > 1 and lines[1].strip() else None
    if theirs == os.path.abspath(cfg.run.output_dir) or (theirs is None and not cfg.run.checkpoint_dir):
        return (f"{cfg.origin('run.output_dir')}: run.output_dir: another run (process {pid}) is training into "
                f"{cfg.run.output_dir} now ({path} is locked); wait for it, or give this run another run.output_dir")
    whose = f"process {pid}, training into {theirs}" if theirs else f"process {pid}"
    return (f"{cfg.origin('run.checkpoint_dir')}: run.checkpoint_dir: another run ({whose}) holds {path}: it "
            f"shares this run's checkpoint directory {cfg.checkpoint_dir} (this run trains into "
            f"{cfg.run.output_dir}); wait for it, or give this run its own run.checkpoint_dir")
