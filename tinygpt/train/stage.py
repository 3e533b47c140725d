"""``run_stage(cfg) -> output_dir``: check inputs, build datasets and model, train, write the stage output.

The stage output (``run.output_dir``) is an HF-native model directory (``tinygpt.model.save_vlm``) that evaluation,
chat, export and the next stage's ``init_from`` read directly. ``run.save_mode``:
  trainable_only  only the trainable tensors + a reference to the directory holding the rest (small);
  whole           every tensor;
  auto            trainable_only when the stage started from a model directory, else whole (random init).
Release directories hold no optimizer state; resume checkpoints live under ``run.checkpoint_dir``.
"""

from __future__ import annotations

import difflib
import inspect
import json
import logging
import random
from pathlib import Path

import numpy as np
import torch

from ..config.load import check_paths, config_to_dict
from ..config.schema import RunConfig
from ..errors import UserError
from ..io_utils import check_output_dir

log = logging.getLogger("tinygpt.train")
FEATURES_KIND = "qformer_features"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def check_dataset_specs(cfg: RunConfig) -> None:
    """Every dataset's kind and params are known to the registry (errors name the YAML file and dotted key)."""
    from ..data.registry import KINDS, kind_params

    for name, spec in cfg.active_datasets().items():
        key = f"data.datasets.{name}"
        if spec.kind == FEATURES_KIND:
            from .features import FEATURE_PARAMS

            accepted = dict(FEATURE_PARAMS)
        elif spec.kind not in KINDS:
            close = difflib.get_close_matches(spec.kind, [*KINDS, FEATURES_KIND], n=1, cutoff=0.5)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise UserError(f"{cfg.origin(key + '.kind')}: {key}.kind: unknown dataset kind {spec.kind!r}{hint}")
        else:
            accepted = kind_params(spec.kind)
        for param in spec.params:
            if param not in accepted:
                close = difflib.get_close_matches(param, list(accepted), n=1, cutoff=0.5)
                hint = f" (did you mean {key}.params.{close[0]!r}?)" if close else ""
                raise UserError(f"{cfg.origin(f'{key}.params.{param}')}: {key}.params.{param}: unknown param of "
                                f"kind {spec.kind!r}{hint}; valid: {', '.join(accepted)}")
        for param, default in accepted.items():
            if default is inspect.Parameter.empty and spec.params.get(param) is None:
                raise UserError(f"{cfg.origin(key)}: {key}.params.{param}: required by kind {spec.kind!r}")


def build_datasets(cfg: RunConfig, image_size: int) -> list:
    """One MixEntry per active dataset (the registry's loaders, or cached Q-Former features)."""
    from ..data.bad_records import BadRecordPolicy
    from ..data.registry import build_dataset
    from .mixing import MixEntry

    policy = BadRecordPolicy(max_bad_fraction=cfg.data.max_bad_fraction, min_records=cfg.data.bad_records_min)
    entries = []
    for name, spec in cfg.active_datasets().items():
        params = dict(spec.params)
        if spec.kind == FEATURES_KIND:
            from .features import FeatureDataset

            dataset = FeatureDataset(name=name, **params)
        else:
            params.setdefault("name", name)
            try:
                dataset = build_dataset(spec.kind, image_size=image_size, seed=cfg.run.seed, bad_records=policy,
                                        **params)
            except UserError as exc:
                raise UserError(f"{cfg.origin(f'data.datasets.{name}')}: data.datasets.{name}: {exc}") from None
        entries.append(MixEntry(name=name, dataset=dataset, batch_size=spec.batch_size, ratio=spec.sample_ratio))
    return entries


def collate(samples: list[dict]) -> dict:
    """The data contract's collate, plus stacked cached features when the samples carry them."""
    if samples and "image_features" in samples[0]:
        from .features import collate_features

        return collate_features(samples)
    from ..data.collate import collate_samples

    return collate_samples(samples)


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


def _frozen_dtype(cfg: RunConfig, accelerator):
    if cfg.run.precision == "fp32" or accelerator.device.type == "cpu":
        return None  # CPU autocast is used for compute only; fp32 storage keeps frozen weights exact
    return torch.bfloat16 if cfg.run.precision == "bf16" else torch.float16


def check_outputs(cfg: RunConfig) -> None:
    """Before any work: ``run.output_dir`` and the checkpoint directory can be written, and writing them destroys
    nothing of the user's (the output directory is replaced whole, so it must be missing, empty or a model dir)."""
    from ..model.checkpoint_io import check_model_out

    out = check_model_out(cfg.run.output_dir, f"{cfg.origin('run.output_dir')}: run.output_dir")
    ckpt_where = f"{cfg.origin('run.checkpoint_dir')}: run.checkpoint_dir"
    ckpt = check_output_dir(cfg.checkpoint_dir, ckpt_where, "checkpoints and logs")
    if ckpt.resolve() == out.resolve() or out.resolve() in ckpt.resolve().parents:
        raise UserError(f"{ckpt_where}: {ckpt} is inside run.output_dir {out}, which the stage output replaces "
                        "whole; choose a directory outside it")


def save_output(cfg: RunConfig, model, base_dir, mode: str, summary: dict) -> Path:
    """Write the model directory and its ``train_summary.json`` in one atomic rename."""
    from ..model import save_vlm

    out = Path(cfg.run.output_dir)
    record = {"summary": summary, "save_mode": mode, "config": config_to_dict(cfg), "config_file": cfg.source}
    extra = {"train_summary.json": json.dumps(record, indent=1, default=str)}
    if mode == "trainable_only":
        save_vlm(model, out, trainable_only=True, base_model=str(base_dir), extra_files=extra)
    else:
        save_vlm(model, out, extra_files=extra)
    return out


def run_stage(cfg: RunConfig) -> Path:
    """Train one stage as configured; returns the output model directory."""
    from .build import build_model, planned_image_size
    from .loop import make_accelerator, train
    from .mixing import DataMixer

    check_outputs(cfg)  # first: where we write is checked before anything is read or built
    check_paths(cfg)
    check_dataset_specs(cfg)
    accelerator = make_accelerator(cfg.run)
    seed_everything(cfg.run.seed)
    if cfg.model.load_in_4bit and cfg.run.save_mode == "whole":
        raise UserError(f"{cfg.origin('run.save_mode')}: run.save_mode: whole cannot save 4-bit base weights")
    image_size = planned_image_size(cfg)
    entries = build_datasets(cfg, image_size)
    built = build_model(cfg, frozen_dtype=_frozen_dtype(cfg, accelerator))
    seed_everything(cfg.run.seed + accelerator.process_index)  # own dropout masks per process
    mode = resolve_save_mode(cfg, built.base_dir)
    if cfg.model.load_in_4bit and mode == "whole":
        raise UserError(f"{cfg.origin('model.load_in_4bit')}: model.load_in_4bit: this stage must save whole "
                        "weights (random init or resized ViT), which 4-bit base weights cannot give")
    mixer = DataMixer(entries, seed=cfg.run.seed, total_steps=cfg.schedule.total_steps,
                      world_size=accelerator.num_processes, rank=accelerator.process_index,
                      grad_accum_steps=cfg.run.grad_accum_steps, num_workers=cfg.data.num_workers, collate=collate)
    result = train(cfg, accelerator, built.model, mixer, built.trainable_count)
    accelerator.wait_for_everyone()
    out = Path(cfg.run.output_dir)
    if accelerator.is_main_process:
        model = accelerator.unwrap_model(built.model)
        save_output(cfg, model, built.base_dir, mode, result.summary)
        log.info("stage output: %s (%s)", out, mode)
    accelerator.wait_for_everyone()
    return out
