"""The registry of benchmarks: one module per benchmark, each defining ``BENCHMARK`` (a `Benchmark`).

`get_benchmark("gqa")` imports ``tinygpt.evaluation.benchmarks.gqa`` and returns its ``BENCHMARK``; `names()` lists
what is registered. A module is imported only when asked for.

`data_files(name, root, split, options)`: the annotation / question files that benchmark's ``load`` reads for that
split (never the images), from the module's ``data_files(root, split, options)`` (``DATA_FILES[name]`` in a module
defining several benchmarks); the evaluation's resume fingerprint hashes their bytes (resume.data_id).
"""

from __future__ import annotations

from importlib import import_module
from pathlib import Path

from ...errors import UserError
from ..benchmark import Benchmark

# registry name -> module in this package
MODULES = {
    "gqa": "gqa",
    "vsr": "vsr",
    "iconqa": "iconqa",
    "vizwiz": "vizwiz",
    "hateful_memes": "hateful_memes",
    "okvqa": "vqa",
    "vqav2": "vqa",
    "refcoco": "refcoco",
    "refcoco+": "refcoco",
    "refcocog": "refcoco",
    "pope": "pope",
    "shapes": "shapes",
    "multi_image": "multi_image",
}


def names() -> list[str]:
    return list(MODULES)


def get_benchmark(name: str) -> Benchmark:
    """The registered benchmark `name` (a module may define several: ``BENCHMARKS`` dict, else ``BENCHMARK``)."""
    if name not in MODULES:
        raise UserError(f"benchmark: expected one of {', '.join(MODULES)}, got {name!r}")
    module = import_module(f"{__name__}.{MODULES[name]}")
    several = getattr(module, "BENCHMARKS", None)
    return several[name] if several else module.BENCHMARK


def data_files(name: str, root: Path, split: str, options: dict) -> list[Path]:
    """The annotation files benchmark `name` reads for `split` under `root` (see the module docstring), whether or
    not they exist; the same whatever ``options.limit`` is."""
    get_benchmark(name)  # an unknown name: the same UserError
    module = import_module(f"{__name__}.{MODULES[name]}")
    several = getattr(module, "DATA_FILES", None)
    return list((several[name] if several else module.data_files)(Path(root), split, dict(options or {})))
