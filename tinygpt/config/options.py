"""``--options key=value ...``: the command-line overrides train.py and evaluate.py share (an omegaconf dotlist,
each value parsed as YAML: ``run.seed=3``, ``model.lora=null``, ``benchmark.split=[a, b]``).

    tree, keys = parse_options(["run.seed=3"], example="run.seed=3")   # tree: a DictConfig (None for no items)

An item that is not ``key=value``, or whose value is not valid YAML, is one UserError naming ``--options`` and the
item. ``keys`` are the dotted keys the items set (``a.b`` sets ``a`` and ``a.b``), so a later message can say that a
value came from the command line rather than from the file.
"""

from __future__ import annotations

from typing import Any, Iterable

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from yaml import YAMLError

from ..errors import UserError

OPTIONS = "--options"


def flat_keys(node: Any, prefix: str = "") -> Iterable[str]:
    """Every dotted key of an omegaconf mapping, parents first (``a``, ``a.b``, ``a.b.c``)."""
    if OmegaConf.is_dict(node):
        for key in node.keys():
            dotted = f"{prefix}.{key}" if prefix else str(key)
            yield dotted
            yield from flat_keys(node._get_node(key), dotted)


def parse_options(options: Iterable[str] | None, example: str) -> tuple[DictConfig | None, list[str]]:
    """The overrides as one tree (None when there are none) and the dotted keys they set; ``example`` is shown
    when an item is not key=value."""
    items = list(options or [])
    if not items:
        return None, []
    tree = OmegaConf.create({})
    for item in items:
        if "=" not in item or not item.split("=", 1)[0].strip():
            raise UserError(f"{OPTIONS}: {item!r} is not key=value (e.g. {example})")
        try:
            tree.merge_with_dotlist([item])
        except (YAMLError, OmegaConfBaseException) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(f"{OPTIONS}: {item}: not valid YAML ({first})") from None
    return tree, list(flat_keys(tree))
