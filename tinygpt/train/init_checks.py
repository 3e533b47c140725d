"""Checks of the model a stage starts from, made before it loads (``check_outputs`` calls them: in ``--check`` and
first thing in ``run_stage``). Only ``config.json`` of ``model.init_from`` is read, or the preset's sizes when it is
null; no weights. Each mistake is one UserError naming the YAML file and the dotted key:

* ``run.save_mode: trainable_only`` with ``model.init_from: null`` (random weights: there is no base to refer to);
* ``model.moe.layers`` outside the LLM's layers (``alternate`` of a one-layer LLM: none);
* ``model.moe`` against a starting model that already has MoE layers: the same settings are needed
  (``tinygpt.train.build`` compares them the same way after the load).

``model.init_from: builtin:tiny`` is checked once the entry point has resolved it to its directory.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from ..config.schema import RunConfig
from ..errors import UserError
from ..model.moe import SETTING_KEYS, moe_settings, resolve_layers
from .build import planned_config


def check_model_start(cfg: RunConfig) -> None:
    """All the checks of the module docstring, in that order."""
    m = cfg.model
    if cfg.run.save_mode == "trainable_only" and m.init_from is None:
        here, there = cfg.origin("run.save_mode"), cfg.origin("model.init_from")
        elsewhere = f" (in {there})" if there != here else ""
        raise UserError(f"{here}: run.save_mode: trainable_only is impossible: model.init_from is null{elsewhere}, "
                        "so the model starts from random weights and there is no base directory to refer to; use "
                        "auto or whole")
    start = _starting_config(cfg)
    if start is None:
        return
    depth, have, source = start
    if m.moe is not None:
        _check_moe_layers(cfg, depth, source)
    _check_moe_match(cfg, depth, have, source)


def _starting_config(cfg: RunConfig) -> Optional[tuple[int, Optional[dict], str]]:
    """(LLM layers, MoE settings or None, what they come from) of the starting model; None while ``init_from`` is
    unresolved (builtin) or no model directory (``check_paths`` says so)."""
    config = planned_config(cfg)
    if config is None:
        return None
    init, text = cfg.model.init_from, config.text_config
    source = f"preset {cfg.model.preset!r}" if init is None else f"model.init_from {init}"
    return int(text.num_hidden_layers), text.moe, source


def _check_moe_layers(cfg: RunConfig, depth: int, source: str) -> None:
    key = "model.moe.layers"
    where = f"{cfg.origin(key)}: {key}"
    try:
        layers = resolve_layers(cfg.model.moe.layers, depth, where)
    except UserError as exc:
        raise UserError(f"{exc} ({source} has {depth} LLM layers)") from None
    if not layers:
        raise UserError(f"{where}: {cfg.model.moe.layers!r} picks no layer of the {depth}-layer LLM of {source}; "
                        "name the layers, e.g. [0]")


def _check_moe_match(cfg: RunConfig, depth: int, have: Optional[dict], source: str) -> None:
    if have is None:
        return
    if cfg.model.moe is None:  # blamed on model.moe where a file says moe: null, else on the MoE model named
        key = "model.moe" if "model.moe" in cfg.origins else "model.init_from"
        raise UserError(f"{cfg.origin(key)}: {key}: the model {cfg.model.init_from} has MoE layers but this stage's "
                        "model.moe is null; set model.moe to the model's settings (and trainable: moe), or start "
                        "from a dense model")
    wanted = moe_settings(dataclasses.asdict(cfg.model.moe), depth)
    theirs = moe_settings(have, depth)
    differ = [k for k in SETTING_KEYS if wanted[k] != theirs[k]]
    if differ:
        key = f"model.moe.{differ[0]}"
        told = ", ".join(f"{k} {wanted[k]!r} (the model: {theirs[k]!r})" for k in differ)
        raise UserError(f"{cfg.origin(key)}: {key}: {source} already has MoE layers with other settings: {told}; "
                        "a model with experts trains further only with its own settings")
