"""The inputs a stage config names exist: ``model.init_from`` (a model folder), ``model.tokenizer`` (for a fresh
model) and the path-like params of every active dataset. Each missing one is a UserError naming the YAML file (or
``--options``) and the dotted key. ``check_paths`` runs for ``train.py --check`` and before a stage trains."""

from __future__ import annotations

import glob
import os
import re
from pathlib import Path

from ..errors import UserError
from . import schema
from .schema import RunConfig


PATH_PARAM_NAMES = ("root", "path", "paths", "dir", "file")


def _looks_like_path_param(name: str) -> bool:
    return name in PATH_PARAM_NAMES or name.endswith(tuple(f"_{n}" for n in PATH_PARAM_NAMES)) or name == "shards"


def _path_values(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [item for item in value if isinstance(item, str)]
    return []


def check_paths(cfg: RunConfig) -> None:
    """Named inputs exist: ``model.init_from`` (a model dir) and the path-like params of every active dataset."""
    init = cfg.model.init_from
    if init is not None and not init.startswith(schema.BUILTIN_PREFIX):
        where = cfg.origin("model.init_from")
        if not Path(init).is_dir():
            raise UserError(f"{where}: model.init_from: {init} does not exist (run the previous stage first, "
                            "or build the base model with python -m tinygpt.weights.build)")
        if not (Path(init) / "config.json").is_file():
            raise UserError(f"{where}: model.init_from: {init} is not a model directory (no config.json)")
    tokenizer = cfg.model.tokenizer  # as tinygpt.tokenizer.load_tokenizer reads it: builtin, a folder or a hub id
    if init is None and tokenizer is not None and tokenizer != "builtin":
        where, folder = cfg.origin("model.tokenizer"), Path(tokenizer).expanduser()
        if folder.exists() and not folder.is_dir():
            raise UserError(f"{where}: model.tokenizer: {tokenizer} is a file, not a folder of tokenizer files")
        if not folder.exists() and not (_HUB_ID.match(tokenizer) and ".." not in tokenizer):
            raise UserError(f"{where}: model.tokenizer: {tokenizer} does not exist (a folder of tokenizer files, "
                            "a hub id like microsoft/phi-2, or builtin)")
    for name, spec in cfg.active_datasets().items():
        for param, values in spec.params.items():
            if not _looks_like_path_param(param):
                continue
            key = f"data.datasets.{name}.params.{param}"
            # a kind with a root (cc_sbu_align) names the files and folders inside it (ann_file, image_dir) relative to
            # it; a *_path param (its prompt_path) is a path of its own, as the loader opens it
            root = spec.params.get("root") if param.endswith(("_file", "_dir")) else None
            if param == "shards":
                _check_shards(cfg, key, _path_values(values))
                continue
            for value in _path_values(values):
                target = Path(root) / value if isinstance(root, str) and not Path(value).is_absolute() else Path(value)
                if not target.exists():
                    raise UserError(f"{cfg.origin(key)}: {key}: {target} does not exist{_DATA_HINT}")


_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")  # tinygpt.tokenizer's
_DATA_HINT = " (set TINYGPT_DATA or vars.data_root to your data folder)"
_BRACES = re.compile(r"\{[^{}]*\}")


def _check_shards(cfg: RunConfig, key: str, entries: list[str]) -> None:
    """Shards (paths and brace patterns) name at least one file: the loader skips the missing ones with a warning
    (partial downloads are common), so only a list of which nothing exists is an error (the first entry's)."""
    errors = []
    for entry in entries:
        try:
            if "{" in entry:
                _check_shard_pattern(cfg, key, entry)
            elif not Path(entry).exists():
                raise UserError(f"{cfg.origin(key)}: {key}: {entry} does not exist{_DATA_HINT}")
            return
        except UserError as exc:
            errors.append(exc)
    if errors:
        raise errors[0]


def _check_shard_pattern(cfg: RunConfig, key: str, pattern: str) -> None:
    """A brace pattern (``data/laion/{00000..05244}.tar``): the folder it lives in exists and holds at least one
    file of the pattern's shape (each ``{...}`` read as ``*``; the data loader expands the braces exactly)."""
    folder = Path(os.path.dirname(pattern.split("{", 1)[0]) or ".")
    if not folder.is_dir():
        raise UserError(f"{cfg.origin(key)}: {key}: {pattern}: the folder {folder} does not exist{_DATA_HINT}")
    if not glob.glob(_BRACES.sub("*", pattern)):
        raise UserError(f"{cfg.origin(key)}: {key}: {pattern}: no shard file of this pattern exists in "
                        f"{folder}{_DATA_HINT}")
