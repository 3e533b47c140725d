"""Reading, merging and resolving the (untyped) omegaconf tree of a stage YAML, each mistake one UserError line.

* :func:`read_yaml`: one file; a folder, bad YAML (:func:`yaml_problem`, what and where: ``found duplicate key seed
  (line 4, column 3)``) or a top level that is not a mapping is refused.
* :func:`merge`: ``OmegaConf.merge`` that names the key where a list would replace a mapping or the other way round
  (omegaconf's own answer is a bare ``TypeError``).
* :func:`resolve`: ``${...}`` interpolation; a failure blames the key whose own interpolation is wrong, not a key that
  only refers to it (``run.checkpoint_dir: ${run.output_dir}-checkpoints`` in base.yaml, when the stage's or the
  ``--options``' ``run.output_dir`` has the typo); a setting that an interpolation needs and no file sets is named
  as missing; an environment variable that ``${oc.env:NAME,default}`` reads and that is set but empty is refused.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Callable

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from yaml import YAMLError

from ..errors import UserError
from .options import flat_keys


def yaml_problem(exc: Exception) -> str:
    """What is wrong and where, from a YAML error (its first line alone, "while constructing a mapping", says
    neither)."""
    problem, mark = getattr(exc, "problem", None), getattr(exc, "problem_mark", None)
    context = getattr(exc, "context", None)
    if problem and mark is not None:
        what = f"{context}, {problem}" if context and not context.startswith("while") else problem
        return f"{what} (line {mark.line + 1}, column {mark.column + 1})"
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def read_yaml(path: Path):
    if path.is_dir():
        raise UserError(f"{path}: is a folder, not a YAML config file")
    if not path.is_file():
        raise UserError(f"{path}: config file does not exist")
    try:
        loaded = OmegaConf.load(path)
    except (YAMLError, OmegaConfBaseException, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not valid YAML ({yaml_problem(exc)})") from None
    if not OmegaConf.is_dict(loaded):
        raise UserError(f"{path}: the top level must be a mapping of sections (model, data, optim, schedule, run)")
    return loaded


def _kind(node: Any) -> str:
    return "mapping" if OmegaConf.is_dict(node) else "list"


def _clash(old: Any, new: Any, prefix: str = "") -> tuple[str, str, str] | None:
    """(dotted key, old kind, new kind) of the first place where ``new`` puts a list over a mapping or a mapping
    over a list."""
    if OmegaConf.is_dict(old) and OmegaConf.is_dict(new):
        old_keys = set(old.keys())
        for key in new.keys():
            if key in old_keys:
                dotted = f"{prefix}.{key}" if prefix else str(key)
                found = _clash(old._get_node(key), new._get_node(key), dotted)
                if found:
                    return found
        return None
    if OmegaConf.is_config(old) and OmegaConf.is_config(new) and OmegaConf.is_dict(old) != OmegaConf.is_dict(new):
        return prefix, _kind(old), _kind(new)
    return None


def merge(old: Any, new: Any, old_origins: dict[str, str], new_origins: dict[str, str]):
    """``OmegaConf.merge(old, new)``; the origins say which file (or ``--options``) set each dotted key of each."""
    try:
        return OmegaConf.merge(old, new)
    except (TypeError, OmegaConfBaseException) as exc:
        found = _clash(old, new)
        if found is None:
            raise UserError(f"{next(iter(new_origins.values()), '?')}: cannot merge it with the files it extends "
                            f"({exc})") from None
        key, was, now = found
        where, was_from = _origin(new_origins, key), _origin(old_origins, key)
        raise UserError(f"{where}: {key}: a {now} cannot replace the {was} set in {was_from} "
                        f"(give the whole {was})") from None


def _origin(origins: dict[str, str], dotted: str) -> str:
    key = dotted
    while key and key not in origins:
        key = key.rpartition(".")[0]
    return origins.get(key, "a base")


_REFERENCE = re.compile(r"\$\{([\w\-]+(?:\.[\w\-]+)*)\}")


def _error_of(merged, key: str) -> str | None:
    """The first line of the error that resolving ``key`` raises, or None when it resolves (or is no key)."""
    try:
        OmegaConf.select(merged, key, throw_on_missing=False)
    except OmegaConfBaseException as exc:
        return str(exc).strip().splitlines()[0]
    return None


def _raw(merged, key: str) -> Any:
    node = merged
    for part in key.split("."):
        if OmegaConf.is_dict(node) and part in node.keys():
            node = node._get_node(part)
        elif OmegaConf.is_list(node) and part.isdigit() and int(part) < len(node):
            node = node._get_node(int(part))
        else:
            return None
    return None if OmegaConf.is_config(node) else node._value()


_ENV = re.compile(r"\$\{oc\.env:\s*([A-Za-z_]\w*)")


def _check_env(merged, origins: dict[str, str], top: str) -> None:
    """An environment variable that ``${oc.env:NAME,default}`` reads is set but empty: omegaconf takes the empty
    text, not the default (``TINYGPT_OUTPUT=`` made ``${...}/stage1`` the folder /stage1)."""
    for key in flat_keys(merged):
        raw = _raw(merged, key)
        for name in _ENV.findall(raw) if isinstance(raw, str) else []:
            if name in os.environ and not os.environ[name].strip():
                raise UserError(f"{origins.get(key, top)}: {key}: the environment variable {name} is set but empty "
                                f"(unset it for the default, or give it a value)")


def resolve(merged, origins: dict[str, str], top: str, unset_setting: Callable[[str], str | None]) -> dict:
    """The tree as plain containers with every ``${...}`` resolved. A reference to a setting that no file sets
    (``${run.output_dir}`` in base.yaml, a stage without ``output_dir``) is named as such (``unset_setting``)."""
    _check_env(merged, origins, top)
    try:
        return OmegaConf.to_container(merged, resolve=True, throw_on_missing=False)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "?"
        message = str(exc).strip().splitlines()[0]
        seen = {key}
        while True:  # follow plain ${a.b} references to the innermost key that fails on its own
            raw = _raw(merged, key)
            inner = [ref for ref in _REFERENCE.findall(raw) if ref not in seen] if isinstance(raw, str) else []
            failing = [(ref, error) for ref in inner if (error := _error_of(merged, ref)) is not None]
            if not failing:
                break
            key, message = failing[0]
            seen.add(key)
        for ref in inner:  # a setting no file sets: say so, not "Interpolation key not found"
            what = unset_setting(ref) if OmegaConf.select(merged, ref) is None else None
            if what:
                raise UserError(f"{top}: {ref}: {what}; {key} in {origins.get(key, top)} refers to it") from None
        raise UserError(f"{origins.get(key, top)}: {key}: cannot resolve interpolation ({message})") from None
