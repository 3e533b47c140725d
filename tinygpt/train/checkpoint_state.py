"""What a checkpoint's ``state.json`` must hold before a run may resume from it: each value of the type the loop
reads it as, and the step the directory is named after. ``state_problem(state, dir_name)`` gives the first thing
wrong (the dotted key and what it holds) or None; ``tinygpt.train.checkpoint`` turns it into its "damaged checkpoint
file" error, which names the checkpoint before it.

Keys a checkpoint written by an older tinygpt lacks (``files``, ``fingerprint``, ``moe_load``, ``stage``, ``seconds``,
``bad_records``, ...) may be absent; a key that is present must hold the right type (``null`` only where the loop
writes it: ``last_loss``, ``fingerprint``).
"""

from __future__ import annotations

import re
from typing import Any, Callable, Optional

STEP_DIR = re.compile(r"^step_(\d{8})$")


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _counts(value: Any) -> bool:
    return isinstance(value, dict) and all(isinstance(k, str) and _count(v) for k, v in value.items())


def _number_or_null(value: Any) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))


def _dict_or_null(value: Any) -> bool:
    return value is None or isinstance(value, dict)


def _file_record(value: Any) -> bool:
    return isinstance(value, dict) and _count(value.get("bytes")) and isinstance(value.get("sha256"), str)


def _bad_records(value: Any) -> bool:
    """dataset name -> [{source, what, bad, seen}, ...] (``bad_records.read_totals``)"""
    return isinstance(value, dict) and all(
        isinstance(counters, list) and all(
            isinstance(c, dict) and isinstance(c.get("source"), str) and isinstance(c.get("what"), str)
            and _count(c.get("bad")) and _count(c.get("seen")) for c in counters) for counters in value.values())


def _stage(value: Any) -> bool:
    names = ("config", "output_dir", "trainable")
    return (isinstance(value, dict) and all(isinstance(value.get(k), str) for k in names)
            and isinstance(value.get("datasets"), list) and all(isinstance(n, str) for n in value["datasets"]))


# key -> (check, what it must be); every key optional except "step"
TOP: dict[str, tuple[Callable[[Any], bool], str]] = {
    "step": (_count, "an integer >= 0"),
    "skipped_steps": (_count, "an integer >= 0"),
    "nonfinite_in_a_row": (_count, "an integer >= 0"),
    "slots": (lambda v: _count(v) and v >= 1, "an integer >= 1"),
    "last_loss": (_number_or_null, "a number or null"),
    "fingerprint": (_dict_or_null, "an object of settings or null"),
    "schedule": (lambda v: isinstance(v, dict), "an object"),
    "moe_load": (lambda v: isinstance(v, dict), "an object of per-layer counts"),
    "data": (lambda v: isinstance(v, dict) and "0" in v, "an object of data positions by process ('0', ...)"),
    "files": (lambda v: isinstance(v, dict) and all(_file_record(r) for r in v.values()),
              "an object of {bytes, sha256} records"),
    "stage": (_stage, "an object {config, output_dir, trainable, datasets}"),
    "seconds": (lambda v: v is not None and _number_or_null(v) and v >= 0, "a number >= 0"),
    "bad_records": (_bad_records, "an object of per-dataset lists of {source, what, bad, seen} counts"),
}
DATA: dict[str, tuple[Callable[[Any], bool], str]] = {
    "restart_step": (_count, "an integer >= 0"),
    "read_since_restart": (_counts, "an object of integer counts"),
    "counts": (_counts, "an object of integer counts"),
    "pass_seeds": (_counts, "an object of integer seeds"),
}


def _wrong(key: str, value: Any, expected: str) -> str:
    shown = repr(value)
    return f"{key} is {shown[:60] + '...' if len(shown) > 60 else shown}, not {expected}"


def state_problem(state: Any, dir_name: str) -> Optional[str]:
    """The first thing in ``state`` (state.json, parsed) that the loop cannot resume from, or None. ``dir_name``: the
    checkpoint directory's name (a ``step_N`` name must match ``step``)."""
    if not isinstance(state, dict):
        return f"not an object but {type(state).__name__}"
    if "step" not in state:
        return "no 'step'"
    for key, (ok, expected) in TOP.items():
        if key in state and not ok(state[key]):
            return _wrong(key, state[key], expected)
    named = STEP_DIR.match(dir_name)
    if named is not None and int(named.group(1)) != state["step"]:
        return f"step is {state['step']}, but the directory is {dir_name}"
    for process, position in state.get("data", {}).items():
        if not isinstance(position, dict):
            return _wrong(f"data.{process}", position, "an object")
        for key, (ok, expected) in DATA.items():
            if key in position and not ok(position[key]):
                return _wrong(f"data.{process}.{key}", position[key], expected)
    return None
