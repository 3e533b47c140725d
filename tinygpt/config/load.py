"""Load a stage YAML into a validated ``RunConfig``.

* ``extends:`` a path or a list of paths (relative to the YAML that names them), merged in order, then the file itself,
  then the ``--options key=value`` overrides (dotted keys, values parsed as YAML: ``run.seed=3``, ``model.lora=null``).
* ``${...}`` interpolation (omegaconf), including ``${oc.env:NAME,default}`` and ``${vars.x}``.
* Every mistake is one ``UserError`` line naming the YAML file (or ``--options``) that set the key and the dotted key:
  unknown/misspelt keys (with the closest valid key), wrong types, missing required values, bad choices and ranges.
  This happens before any work; ``check_paths`` (tinygpt.config.inputs, called by ``run_stage``) also checks that
  named paths exist.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Any, Iterable, Union, get_args, get_origin, get_type_hints

from omegaconf import OmegaConf

from ..errors import UserError, did_you_mean
from ..paths import shipped_copy, train_configs_dir
from . import schema
from .options import OPTIONS, flat_keys, parse_options
from .inputs import check_paths
from .schema import REQUIRED, RunConfig
from .tree import merge, read_yaml, resolve


class _Mismatch(Exception):
    """A value of the wrong type (turned into a UserError naming the key)."""


# ---- reading and merging -----------------------------------------------------------------------------------------

def _load_tree(path: Path, origins: dict[str, str], stack: tuple[Path, ...] = ()):
    """The merged (unresolved) config of ``path`` and everything it extends; records which file set each key."""
    path = path.resolve() if path.is_absolute() else Path(os.path.abspath(path))
    if path in stack:
        chain = " -> ".join(str(p) for p in (*stack, path))
        raise UserError(f"{stack[-1]}: extends makes a cycle ({chain})")
    own = read_yaml(path)
    extends = own.pop("extends", None)
    if extends is None:
        bases = []
    elif isinstance(extends, str):
        bases = [extends]
    elif OmegaConf.is_list(extends) and all(isinstance(item, str) for item in extends):
        bases = list(extends)
    else:
        raise UserError(f"{path}: extends: expected a path or a list of paths, got {extends!r}")
    merged = OmegaConf.create({})
    for base in bases:
        base_path = Path(base)
        if base_path.is_absolute():
            raise UserError(f"{path}: extends: {base!r} is absolute; name bases relative to this file")
        target = path.parent / base_path
        if not target.is_file():
            state = "is a folder" if target.is_dir() else "does not exist"
            raise UserError(f"{path}: extends: {base!r} names {target}, which {state} (bases are relative to "
                            "this file)")
        before = dict(origins)
        merged = merge(merged, _load_tree(target, origins, (*stack, path)), before, origins)
    own_origins = dict.fromkeys(flat_keys(own), str(path))
    merged = merge(merged, own, origins, own_origins)
    origins.update(own_origins)
    return merged


def _schema_type(dotted: str, through_mappings: bool = True) -> Any:
    """The schema's type at ``dotted`` (Optional unwrapped; None: no such key). ``through_mappings``: a key under a
    free mapping (``vars.x``, ``params.x``) is its value type, else None."""
    tp: Any = RunConfig
    for part in dotted.split("."):
        if dataclasses.is_dataclass(tp):
            tp = get_type_hints(tp).get(part)
        elif get_origin(tp) is dict and through_mappings:
            tp = get_args(tp)[1]
        else:
            return None
        if get_origin(tp) is Union:
            tp = next((a for a in get_args(tp) if a is not type(None)), None)
    return tp


def _takes_mapping(dotted: str) -> bool:
    """Whether the schema's type at ``dotted`` is a mapping (a section, ``model.lora``, ``params``, ``vars``)."""
    tp = _schema_type(dotted)
    return dataclasses.is_dataclass(tp) or get_origin(tp) is dict


def _unset_setting(dotted: str) -> str | None:
    """What to say of a schema setting that an interpolation refers to and no file sets; None for no setting (a
    typo, or a free value such as ``vars.x``)."""
    parent, _, name = dotted.rpartition(".")
    cls = _schema_type(parent, through_mappings=False) if parent else RunConfig
    fields = {f.name: f for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else {}
    if name not in fields or fields[name].metadata.get("internal"):
        return None
    if fields[name].default is REQUIRED:
        return "required value is missing"
    return "not set by any file or --options (an interpolation sees only those, not the defaults)"


def _parse_options(options: Iterable[str], origins: dict[str, str]):
    parsed, keys = parse_options(options, example="run.seed=3", takes_mapping=_takes_mapping)
    for key in keys:
        origins[key] = OPTIONS
    return parsed


# ---- typed validation --------------------------------------------------------------------------------------------

def _describe(tp: Any) -> str:
    if tp is type(None):
        return "null"
    origin = get_origin(tp)
    if origin is Union:
        return " or ".join(_describe(a) for a in get_args(tp))
    if origin is list:
        return f"a list of {_describe(get_args(tp)[0])}"
    if origin is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


def _convert(value: Any, tp: Any, key: str, cfg: RunConfig) -> Any:
    if tp is Any:
        return value
    origin = get_origin(tp)
    if origin is Union:
        args = get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise _Mismatch
        for option in (a for a in args if a is not type(None)):
            try:
                return _convert(value, option, key, cfg)
            except _Mismatch:
                continue
        raise _Mismatch
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise _Mismatch
        return _build(tp, value, key, cfg)
    if origin is list:
        if not isinstance(value, list):
            raise _Mismatch
        return [_checked(item, get_args(tp)[0], f"{key}.{i}", cfg) for i, item in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise _Mismatch
        return {str(k): _checked(v, get_args(tp)[1], f"{key}.{k}", cfg) for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise _Mismatch
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Mismatch
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _Mismatch
        if not math.isfinite(value):  # .nan / .inf: no setting means them (null is "off" where there is an off)
            raise UserError(f"{cfg.origin(key)}: {key}: expected a finite number, got {value}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise _Mismatch
        return value
    raise TypeError(f"schema type {tp!r} is not supported")  # a bug in schema.py, not a user error


def _checked(value: Any, tp: Any, key: str, cfg: RunConfig) -> Any:
    if value == REQUIRED:
        raise UserError(f"{cfg.origin(key)}: {key}: required value is missing (set it, e.g. --options {key}=...)")
    try:
        return _convert(value, tp, key, cfg)
    except _Mismatch:
        shown = repr(value) if not isinstance(value, (dict, list)) else type(value).__name__
        raise UserError(f"{cfg.origin(key)}: {key}: expected {_describe(tp)}, got {shown}") from None


def _build(cls: type, values: dict, prefix: str, cfg: RunConfig):
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    for key in values:
        if key not in fields:
            dotted = f"{prefix}.{key}" if prefix else str(key)
            hint = did_you_mean(str(key), fields, cutoff=0.5, prefix=prefix + "." if prefix else "")
            valid = ", ".join(fields)
            raise UserError(f"{cfg.origin(dotted)}: unknown key {dotted!r}{hint}; valid keys here: {valid}")
    kwargs = {}
    for name, f in fields.items():
        dotted = f"{prefix}.{name}" if prefix else name
        if name in values:
            kwargs[name] = _checked(values[name], hints[name], dotted, cfg)
        elif f.default is REQUIRED:
            raise UserError(f"{cfg.origin(prefix) if prefix else cfg.source}: {dotted}: required value is missing")
        elif dataclasses.is_dataclass(f.default_factory):  # an absent section: its required keys are still required
            kwargs[name] = _build(f.default_factory, {}, dotted, cfg)
    return cls(**kwargs)


# ---- semantic checks (no file system) ----------------------------------------------------------------------------

def _choice(cfg: RunConfig, key: str, value: str, choices: Iterable[str]) -> None:
    choices = list(choices)
    if value not in choices:
        hint = did_you_mean(value, choices)
        raise UserError(f"{cfg.origin(key)}: {key}: {value!r} is not one of {', '.join(choices)}{hint}")


def _require(cfg: RunConfig, key: str, ok: bool, what: str) -> None:
    if not ok:
        raise UserError(f"{cfg.origin(key)}: {key}: {what}")


def _require_pair(cfg: RunConfig, key: str, what: str, other: str, other_what: str, ok: bool) -> None:
    """A check on two keys: names ``key`` (``what``), or ``other`` (``other_what``) when only that one was set by
    ``--options``, and says where the partner came from if elsewhere (``--options schedule.total_steps=2`` against
    ``warmup_steps: 5`` in a file blames ``--options`` and names the file)."""
    if ok:
        return
    here, there = cfg.origin(key), cfg.origin(other)
    if there == OPTIONS and here != OPTIONS:
        key, what, other, here, there = other, other_what, key, there, here
    partner = f"; {other} comes from {there}" if there != here else ""
    raise UserError(f"{here}: {key}: {what}{partner}")


def _validate_moe(cfg: RunConfig) -> None:
    """``model.moe`` and the ``moe`` trainable set go together; layer indices are checked against the starting
    model's depth before it loads (``tinygpt.train.init_checks``, from ``check_outputs``)."""
    moe = cfg.model.moe
    if moe is None:
        _require(cfg, "model.trainable", cfg.model.trainable != "moe",
                 "trainable set 'moe' needs MoE settings (e.g. moe: {num_experts: 4, top_k: 2})")
        return
    _require(cfg, "model.trainable", cfg.model.trainable == "moe",
             f"model.moe is set, so the stage trains the router and experts: use trainable: moe, "
             f"not {cfg.model.trainable!r}")
    _require(cfg, "model.moe.num_experts", moe.num_experts >= 1, f"must be >= 1, got {moe.num_experts}")
    _require(cfg, "model.moe.top_k", 1 <= moe.top_k <= moe.num_experts,
             f"must be in [1, num_experts={moe.num_experts}], got {moe.top_k}")
    if isinstance(moe.layers, str):
        _choice(cfg, "model.moe.layers", moe.layers, schema.MOE_LAYER_PATTERNS)
    else:
        _require(cfg, "model.moe.layers", len(moe.layers) > 0 and len(set(moe.layers)) == len(moe.layers)
                 and min(moe.layers) >= 0, f"needs distinct layer indices >= 0, got {moe.layers}")
    _require(cfg, "model.moe.aux_loss_weight", moe.aux_loss_weight >= 0, "must be >= 0")
    _require(cfg, "model.moe.capacity_factor", moe.capacity_factor is None or moe.capacity_factor > 0,
             "must be > 0 or null (dropless)")
    _require(cfg, "model.moe.router_jitter", 0 <= moe.router_jitter < 1, "must be in [0, 1)")
    _require(cfg, "model.moe.z_loss_weight", moe.z_loss_weight >= 0, "must be >= 0")


def validate(cfg: RunConfig) -> RunConfig:
    m, d, o, s, r = cfg.model, cfg.data, cfg.optim, cfg.schedule, cfg.run
    _choice(cfg, "model.preset", m.preset, schema.PRESETS)
    _choice(cfg, "model.trainable", m.trainable, schema.TRAINABLE_SETS)
    if m.attention is not None:
        _choice(cfg, "model.attention", m.attention, schema.ATTENTIONS)
    if m.init_from is not None and m.init_from.startswith(schema.BUILTIN_PREFIX):
        _choice(cfg, "model.init_from", m.init_from, schema.BUILTIN_MODELS)
    _require(cfg, "model.init_from", m.init_from is None or m.init_from.strip() != "", "empty path (use null)")
    _require(cfg, "model.tokenizer", m.tokenizer is None or m.tokenizer.strip() != "", "empty (use null: builtin)")
    _require(cfg, "model.tokenizer", m.tokenizer is None or m.init_from is None,
             "only used when init_from is null (the model in init_from has its own tokenizer); set it to null")
    if m.trainable == "lora":
        _require(cfg, "model.lora", m.lora is not None, "trainable set 'lora' needs LoRA settings (e.g. lora: {})")
    elif m.trainable == "stage1":
        _require(cfg, "model.lora", m.lora is None, "trainable set 'stage1' trains no LoRA; set lora: null")
    _validate_moe(cfg)
    if m.lora is not None:
        _require(cfg, "model.lora.r", m.lora.r >= 1, f"must be >= 1, got {m.lora.r}")
        _require(cfg, "model.lora.dropout", 0.0 <= m.lora.dropout < 1.0, "must be in [0, 1)")
        for i, target in enumerate(m.lora.target_modules):
            _choice(cfg, f"model.lora.target_modules.{i}", target, ("qkv", "dense"))
    if m.image_size is not None:
        _require(cfg, "model.image_size", m.image_size > 0 and m.image_size % 14 == 0,
                 f"{m.image_size} px is not a positive multiple of the ViT patch size 14")
    _require(cfg, "model.max_txt_len", m.max_txt_len >= 1, "must be >= 1")
    _require(cfg, "model.prompt_template", m.prompt_template.count("{}") <= 1, "may hold at most one {}")
    _require(cfg, "model.load_in_4bit", not (m.load_in_4bit and m.trainable != "lora"),
             "4-bit base weights (QLoRA) need trainable: lora")

    active = cfg.active_datasets()
    _require(cfg, "data.datasets", bool(active), "no dataset (every entry is null)")
    for name, spec in active.items():
        key = f"data.datasets.{name}"
        _require(cfg, f"{key}.batch_size", spec.batch_size >= 1, f"must be >= 1, got {spec.batch_size}")
        _require(cfg, f"{key}.sample_ratio", spec.sample_ratio > 0, f"must be > 0, got {spec.sample_ratio}")
        _require(cfg, f"{key}.kind", spec.kind.strip() != "", "empty kind")
    _require(cfg, "data.num_workers", d.num_workers >= 0, "must be >= 0")
    _require(cfg, "data.max_bad_fraction", 0.0 <= d.max_bad_fraction <= 1.0, "must be in [0, 1]")
    _require(cfg, "data.bad_records_min", d.bad_records_min >= 1, "must be >= 1")

    _choice(cfg, "optim.name", o.name, schema.OPTIMIZERS)
    _require(cfg, "optim.weight_decay", o.weight_decay >= 0, "must be >= 0")
    _require(cfg, "optim.betas", len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), "needs two values in [0, 1)")
    _require(cfg, "optim.eps", o.eps > 0, "must be > 0")
    _require(cfg, "optim.max_grad_norm", o.max_grad_norm is None or o.max_grad_norm > 0, "must be > 0 or null")

    for key in ("init_lr", "min_lr", "warmup_lr"):
        _require(cfg, f"schedule.{key}", getattr(s, key) >= 0, "must be >= 0")
    _require(cfg, "schedule.init_lr", s.init_lr > 0, "must be > 0")
    rises = "the cosine would rise instead of decay"
    _require_pair(cfg, "schedule.min_lr", f"{s.min_lr:g} is above init_lr {s.init_lr:g} ({rises})",
                  "schedule.init_lr", f"{s.init_lr:g} is below min_lr {s.min_lr:g} ({rises})", s.min_lr <= s.init_lr)
    _require(cfg, "schedule.total_steps", s.total_steps >= 1, "must be >= 1")
    warmup_range = f"must be in [0, total_steps={s.total_steps}]"
    _require(cfg, "schedule.warmup_steps", s.warmup_steps >= 0, warmup_range)
    _require_pair(cfg, "schedule.warmup_steps", warmup_range, "schedule.total_steps",
                  f"{s.total_steps} is below warmup_steps {s.warmup_steps} (the warm-up must fit in the run)",
                  s.warmup_steps <= s.total_steps)

    _choice(cfg, "run.precision", r.precision, schema.PRECISIONS)
    _choice(cfg, "run.save_mode", r.save_mode, schema.SAVE_MODES)
    _require(cfg, "run.output_dir", r.output_dir.strip() != "", "empty path")
    _require(cfg, "run.checkpoint_dir", r.checkpoint_dir is None or r.checkpoint_dir.strip() != "",
             "empty path (use null for <output_dir>-checkpoints)")
    _require(cfg, "run.seed", abs(r.seed) < 2**63, f"must be below 2^63 in size (torch seeds are 64-bit), got {r.seed}")
    _require(cfg, "run.grad_accum_steps", r.grad_accum_steps >= 1, "must be >= 1")
    _require(cfg, "run.save_every", r.save_every >= 0, "must be >= 0")
    _require(cfg, "run.keep_last", r.keep_last >= 1, "must be >= 1")
    _require(cfg, "run.log_every", r.log_every >= 1, "must be >= 1")
    _require(cfg, "run.max_nonfinite", r.max_nonfinite >= 1, "must be >= 1")
    _require(cfg, "run.packing.tokens_per_row", r.packing.tokens_per_row >= 1, "must be >= 1")
    _require(cfg, "run.pad_to_multiple", r.pad_to_multiple >= 1, "must be >= 1 (1: no bucketing)")
    if isinstance(r.resume, str):
        _require(cfg, "run.resume", r.resume.strip() != "", "empty (use false, true, auto or a checkpoint path)")
    return cfg


# ---- public API --------------------------------------------------------------------------------------------------

def load_config(path: str | os.PathLike, overrides: Iterable[str] | None = None,
                check_files: bool = False) -> RunConfig:
    """YAML (+ extends + overrides) -> validated RunConfig. ``check_files`` also checks that named paths exist.
    ``train_configs/...`` missing here is the copy shipped in the package (tinygpt.paths.shipped_copy)."""
    path = shipped_copy(path, "train_configs", train_configs_dir())
    origins: dict[str, str] = {}
    merged = _load_tree(path, origins)
    if overrides:
        before = dict(origins)
        merged = merge(merged, _parse_options(overrides, origins), before, origins)
    top = str(Path(os.path.abspath(path)))
    values = resolve(merged, origins, top, _unset_setting)
    cfg = RunConfig(source=top, origins=origins)
    built = _build(RunConfig, values, "", cfg)
    built.source, built.origins = top, origins
    validate(built)
    if check_files:
        check_paths(built)
    return built


def config_to_dict(cfg: RunConfig) -> dict:
    """The YAML-able content of a config (without the internal source/origins), e.g. for the run summary."""
    out = dataclasses.asdict(cfg)
    out.pop("source", None)
    out.pop("origins", None)
    return out
