"""``--options key=value ...``: the command-line overrides train.py and evaluate.py share (an omegaconf dotlist,
each value parsed as YAML: ``run.seed=3``, ``model.lora=null``, ``benchmark.split=[a, b]``).

    tree, keys = parse_options(["run.seed=3"], example="run.seed=3")   # tree: a DictConfig (None for no items)
    add_options_argument(parser, example="run.seed=3")                  # the flag itself (argparse)

An item that is not ``key=value``, or whose value is not valid YAML, is one UserError naming ``--options`` and the
item; so is a value that YAML reads as a mapping or list although it looks like text (``prompt=Q: {question}``: a
block mapping; ``prompt={question}``: a flow mapping without any ``key: value``). Both messages show the item with
its value quoted, ``'benchmark.options.prompt="[vqa] {question}"'``, which is how a text with ``{``, ``[`` or
``: `` is written. ``keys`` are the dotted keys the items set (``a.b`` sets ``a`` and ``a.b``), so a later message
can say that a value came from the command line rather than from the file.
"""

from __future__ import annotations

import json
import shlex
from typing import Any, Callable, Iterable

import yaml

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from yaml import YAMLError

from ..errors import UserError

OPTIONS = "--options"


def add_options_argument(parser, example: str) -> None:
    """The ``--options KEY=VALUE ...`` flag of every command that reads a config; given twice, both apply."""
    parser.add_argument(OPTIONS, nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help=f"dotted overrides, e.g. {example}")


def flat_keys(node: Any, prefix: str = "") -> Iterable[str]:
    """Every dotted key of an omegaconf mapping, parents first (``a``, ``a.b``, ``a.b.c``)."""
    if OmegaConf.is_dict(node):
        for key in node.keys():
            dotted = f"{prefix}.{key}" if prefix else str(key)
            yield dotted
            yield from flat_keys(node._get_node(key), dotted)


def quoted(key: str, value: str) -> str:
    """The item with its value as a YAML double-quoted string, quoted for a POSIX shell."""
    return shlex.quote(f"{key}={json.dumps(value, ensure_ascii=False)}")


def _reads_as_text(value: str) -> bool:
    """Whether `value` parses as a YAML mapping / list that nobody writes on a command line on purpose: block style
    (``Q: {question}``, ``- a``), or a flow mapping with no ``key: value`` in it (``{question}``)."""
    try:
        parsed = yaml.safe_load(value)
    except YAMLError:
        return False
    if not isinstance(parsed, (dict, list)):
        return False
    if not value.startswith(("{", "[")):
        return True
    return value.startswith("{") and ":" not in value


def parse_options(options: Iterable[str] | None, example: str,
                  takes_mapping: Callable[[str], bool] | None = None) -> tuple[DictConfig | None, list[str]]:
    """The overrides as one tree (None when there are none) and the dotted keys they set; ``example`` is shown
    when an item is not key=value. ``takes_mapping(key)``: the key holds a mapping, so ``key={}`` is the empty
    mapping (``model.lora={}``: LoRA with its defaults), not text."""
    items = list(options or [])
    if not items:
        return None, []
    tree = OmegaConf.create({})
    for item in items:
        if "=" not in item or not item.split("=", 1)[0].strip():
            raise UserError(f"{OPTIONS}: {item!r} is not key=value (e.g. {example})")
        key, value = (part.strip() for part in item.split("=", 1))
        empty_mapping = value == "{}" and takes_mapping is not None and takes_mapping(key)
        if _reads_as_text(value) and not empty_mapping:
            kind = "mapping" if isinstance(yaml.safe_load(value), dict) else "list"
            raise UserError(f"{OPTIONS}: {item}: the value reads as a YAML {kind}, not as text; "
                            f"to pass text, quote it: {quoted(key, value)}")
        try:
            tree.merge_with_dotlist([item])
        except (YAMLError, OmegaConfBaseException) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            hint = f"; if the value is text, quote it: {quoted(key, value)}" if isinstance(exc, YAMLError) else ""
            raise UserError(f"{OPTIONS}: {item}: not valid YAML ({first}){hint}") from None
    return tree, list(flat_keys(tree))
