"""``run_stage(cfg) -> output_dir``: check inputs, build datasets and model, train, write the stage output.

The stage output (``run.output_dir``) is an HF-native model directory (``tinygpt.model.save_vlm``) that evaluation,
chat, export and the next stage's ``init_from`` read directly. ``run.save_mode``:
  trainable_only  only the trainable tensors + a reference to the directory holding the rest (small);
  whole           every tensor;
  auto            trainable_only when the stage started from a model directory, else whole (random init).
Release directories hold no optimizer state; resume checkpoints live under ``run.checkpoint_dir``.
Datasets, cached Q-Former features (kind ``qformer_features``) included, come from ``tinygpt.data.registry``; this
module only names the YAML key at fault when the registry rejects a spec.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import logging
import random
from pathlib import Path

import numpy as np
import torch

from ..config.inputs import check_paths
from ..config.load import config_to_dict
from ..config.schema import RunConfig
from ..data.bad_records import BadRecordPolicy
from ..data.collate import collate_batch
from ..data.registry import DatasetSpecError, build_dataset, check_params, missing_input
from ..errors import UserError, did_you_mean
from ..io_utils import check_output_dir, remove_stale_temporaries
from ..model import save_vlm
from ..model.checkpoint_io import check_model_out, model_chain
from .build import build_model, planned_image_size
from .features import check_feature_cache
from .init_checks import check_model_start
from .interrupt import StepReached, interrupts_reported
from .run_guard import already_complete, check_resume, newest_checkpoint_files, run_fingerprint, run_lock
from .loop import check_deepspeed, make_accelerator, train
from .mixing import DataMixer, MixEntry
from .sharded import model_to_save
from .speed import apply_compile

log = logging.getLogger("tinygpt.train")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def check_dataset_specs(cfg: RunConfig) -> None:
    """Every dataset's kind and params pass the registry's :func:`check_params`, and the files a loader builds from
    its params (RefCOCO's ``refs(unc).p`` and ``instances.json`` under ``ann_root``, ...) exist and can be read
    (:func:`missing_input`; nothing is parsed), and a cached-features dataset fits the stage's model
    (:func:`check_feature_cache`). Errors name the YAML file, the dotted key and the path."""
    for name, spec in cfg.active_datasets().items():
        key = f"data.datasets.{name}"
        try:
            check_params(spec.kind, dict(spec.params))
        except DatasetSpecError as exc:
            raise UserError(_spec_message(cfg, key, spec.kind, exc)) from None
        missing = missing_input(spec.kind, dict(spec.params))
        if missing is not None:
            param, path, problem = missing
            raise UserError(f"{cfg.origin(f'{key}.params.{param}')}: {key}.params.{param}: dataset {name!r} (kind "
                            f"{spec.kind!r}) reads {path}, which {problem}")
        if spec.kind == "qformer_features":
            check_feature_cache(cfg, name)  # made from this stage's model, at its image size and width


def _spec_message(cfg: RunConfig, key: str, kind: str, exc: DatasetSpecError) -> str:
    """The registry's verdict on ``key``'s spec, told with the YAML file and dotted key at fault."""
    if exc.problem == "kind":
        hint = did_you_mean(kind, exc.valid, cutoff=0.5)
        return f"{cfg.origin(key + '.kind')}: {key}.kind: unknown dataset kind {kind!r}{hint}"
    param = f"{key}.params.{exc.name}"
    if exc.problem == "unknown":
        hint = did_you_mean(exc.name, exc.valid, cutoff=0.5, form=f" (did you mean {key}.params.{{!r}}?)")
        return f"{cfg.origin(param)}: {param}: unknown param of kind {kind!r}{hint}; valid: {', '.join(exc.valid)}"
    if exc.problem == "missing":
        return f"{cfg.origin(key)}: {param}: required by kind {kind!r}"
    return f"{cfg.origin(key)}: {key}: {exc}"


def build_datasets(cfg: RunConfig, image_size: int) -> list:
    """One MixEntry per active dataset (the registry's loaders, cached Q-Former features included)."""
    policy = BadRecordPolicy(max_bad_fraction=cfg.data.max_bad_fraction, min_records=cfg.data.bad_records_min)
    entries = []
    for name, spec in cfg.active_datasets().items():
        params = dict(spec.params)
        params.setdefault("name", name)
        try:
            dataset = build_dataset(spec.kind, image_size=image_size, seed=cfg.run.seed, bad_records=policy, **params)
        except UserError as exc:
            raise UserError(f"{cfg.origin(f'data.datasets.{name}')}: data.datasets.{name}: {exc}") from None
        entries.append(MixEntry(name=name, dataset=dataset, batch_size=spec.batch_size, ratio=spec.sample_ratio))
    return entries


def resolve_save_mode(cfg: RunConfig, base_dir) -> str:
    """A stage that resized the ViT position embeddings (224 -> 448 px) still saves trainable-only: ``load_vlm``
    redoes the same deterministic resize when it loads the base under the larger model."""
    mode = cfg.run.save_mode
    if mode == "auto":
        return "trainable_only" if base_dir is not None else "whole"
    if mode == "trainable_only" and base_dir is None:
        raise UserError(f"{cfg.origin('run.save_mode')}: run.save_mode: trainable_only is impossible here "
                        "(the model starts from random weights); use auto or whole")
    return mode


def frozen_weight_dtype(cfg: RunConfig, accelerator) -> torch.dtype | None:
    """The storage dtype of the frozen weights (None: keep fp32)."""
    if cfg.run.precision == "fp32" or accelerator.device.type == "cpu":
        return None  # CPU autocast is used for compute only; fp32 storage keeps frozen weights exact
    return torch.bfloat16 if cfg.run.precision == "bf16" else torch.float16


def check_outputs(cfg: RunConfig) -> None:
    """Before any work: ``run.output_dir`` and the checkpoint directory can be written, and writing them destroys
    nothing of the user's (the output directory is replaced whole, so it must be missing, empty or a model dir);
    then the starting model's config.json against the stage (``init_checks.check_model_start``)."""
    out = check_model_out(cfg.run.output_dir, f"{cfg.origin('run.output_dir')}: run.output_dir")
    ckpt_where = f"{cfg.origin('run.checkpoint_dir')}: run.checkpoint_dir"
    ckpt = check_output_dir(cfg.checkpoint_dir, ckpt_where, "checkpoints and logs")
    if ckpt.resolve() == out.resolve() or out.resolve() in ckpt.resolve().parents:
        raise UserError(f"{ckpt_where}: {ckpt} is inside run.output_dir {out}, which the stage output replaces "
                        "whole; choose a directory outside it")
    for key, package, wanted in (("run.tensorboard", "tensorboard", cfg.run.tensorboard),
                                 ("run.wandb_project", "wandb", cfg.run.wandb_project)):
        if wanted and importlib.util.find_spec(package) is None:  # before the model loads, and in --check
            raise UserError(f"{cfg.origin(key)}: {key}: needs the {package} package (pip install {package})")
    start = cfg.model.init_from
    if start and not start.startswith("builtin:") and (Path(start) / "config.json").is_file():
        if out.resolve() in {part.resolve() for part in model_chain(start)}:
            raise UserError(f"{cfg.origin('run.output_dir')}: run.output_dir: {out} is the model this stage starts "
                            f"from (model.init_from {start}) or a directory it builds on; the stage output replaces "
                            "it whole, so choose another directory")
    check_model_start(cfg)  # save mode and MoE settings against the starting model, before it loads


def save_output(cfg: RunConfig, model, base_dir, mode: str, summary: dict) -> Path:
    """Write the model directory and its ``train_summary.json`` in one atomic rename; first the temporaries of a
    run that was killed while writing it go (and an output it had moved aside comes back: ``io_utils``)."""
    out = Path(cfg.run.output_dir)
    for stale in remove_stale_temporaries(out.parent, [glob.escape(out.name)]):
        log.info("removed %s (a temporary of a run that was killed while writing %s)", stale, out)
    record = {"summary": summary, "save_mode": mode, "config": config_to_dict(cfg), "config_file": cfg.source,
              "fingerprint": run_fingerprint(cfg),  # with the final checkpoint: tells a finished run (run_guard)
              "checkpoint_files": newest_checkpoint_files(cfg)}  # ... and that this output is that run's
    extra = {"train_summary.json": json.dumps(record, indent=1, default=str)}
    if mode == "trainable_only":
        save_vlm(model, out, trainable_only=True, base_model=str(base_dir), extra_files=extra)
    else:
        save_vlm(model, out, extra_files=extra)
    return out


def run_stage(cfg: RunConfig) -> Path:
    """Train one stage as configured; returns the output model directory."""
    check_outputs(cfg)  # first: where we write is checked before anything is read or built
    check_paths(cfg)
    check_dataset_specs(cfg)
    complete = already_complete(cfg)  # run.resume auto, and this run already finished: nothing to do
    if complete:
        log.info("%s", complete)
        return Path(cfg.run.output_dir)
    resume_from = check_resume(cfg)  # a checkpoint that cannot be resumed: said before the model loads
    reached = StepReached(checkpoint=resume_from)
    with interrupts_reported(cfg, reached):  # Ctrl-C / SIGTERM: one line saying where a rerun resumes
        accelerator = make_accelerator(cfg.run, cfg.origin("run.grad_accum_steps"))
        check_deepspeed(cfg, accelerator)
        reached.main = accelerator.is_main_process  # the one process that says it
        with run_lock(cfg, accelerator.is_main_process):
            return _run_locked(cfg, accelerator, resume_from, reached)


def _run_locked(cfg: RunConfig, accelerator, resume_from: Path | None, reached: StepReached) -> Path:
    seed_everything(cfg.run.seed)
    if cfg.model.load_in_4bit and cfg.run.save_mode == "whole":
        raise UserError(f"{cfg.origin('run.save_mode')}: run.save_mode: whole cannot save 4-bit base weights")
    image_size = planned_image_size(cfg)
    entries = build_datasets(cfg, image_size)
    built = build_model(cfg, frozen_dtype=frozen_weight_dtype(cfg, accelerator))
    apply_compile(cfg, accelerator, built.model)
    seed_everything(cfg.run.seed + accelerator.process_index)  # own dropout masks per process
    mode = resolve_save_mode(cfg, built.base_dir)
    if cfg.model.load_in_4bit and mode == "whole":
        raise UserError(f"{cfg.origin('model.load_in_4bit')}: model.load_in_4bit: this stage must save whole "
                        "weights (random init or resized ViT), which 4-bit base weights cannot give")
    mixer = DataMixer(entries, seed=cfg.run.seed, total_steps=cfg.schedule.total_steps,
                      world_size=accelerator.num_processes, rank=accelerator.process_index,
                      grad_accum_steps=cfg.run.grad_accum_steps, num_workers=cfg.data.num_workers,
                      collate=collate_batch)
    result = train(cfg, accelerator, built.model, mixer, built.trainable_count, resume_from, reached)
    accelerator.wait_for_everyone()
    out = Path(cfg.run.output_dir)
    model = model_to_save(accelerator, result.model)  # collective under FSDP (gathers the shards)
    if accelerator.is_main_process:
        save_output(cfg, model, built.base_dir, mode, result.summary)
        log.info("stage output: %s (%s)", out, mode)
    accelerator.wait_for_everyone()
    return out
