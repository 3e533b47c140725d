"""Where tinygpt keeps things, in one place: the cache root, the stage configs, the tiny default's data and outputs.

* cache root: ``$TINYGPT_CACHE``, else ``~/.cache/tinygpt`` (``~`` expanded either way); it holds the rebuilt builtin
  tokenizer (``tokenizers/``) and the tiny backbones (``tiny-backbones-v*-<hash>/``);
* stage configs: the checkout's top-level ``train_configs/`` when tinygpt runs from a checkout, else the copy that
  ``pip install`` puts in the package (``tinygpt/train_configs``, see pyproject.toml), so an installed tinygpt runs its
  tiny default from any directory;
* the tiny default's data (``$TINYGPT_TINY_DATA``, else ``data/synthetic``) and outputs (``outputs/tiny``), relative to
  the working directory;
* how a path is shown in logs and headers (:func:`display_path`): never a chain of ``..``;
* a training checkpoint (:func:`is_training_checkpoint`: a ``step_N`` folder of ``run.checkpoint_dir``, what a run
  resumes from) told apart from a saved model directory, for the commands that are given one by mistake.
"""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parent
TRAINABLE_FILE = "trainable.safetensors"  # in every training checkpoint (tinygpt.train.checkpoint), in no model dir


def cache_root(override: str | os.PathLike | None = None) -> Path:
    """``override``, else ``$TINYGPT_CACHE``, else ``~/.cache/tinygpt``."""
    chosen = override if override is not None else os.environ.get("TINYGPT_CACHE")
    return Path(chosen).expanduser() if chosen else Path.home() / ".cache" / "tinygpt"


def train_configs_dir() -> Path:
    """The stage YAML folder: the checkout's ``train_configs/`` first, else the installed package's copy."""
    checkout = PACKAGE_ROOT.parent / "train_configs"
    return checkout if checkout.is_dir() else PACKAGE_ROOT / "train_configs"


def shipped_copy(path: str | os.PathLike, folder: str, shipped: Path) -> Path:
    """``path``; or, when it is a relative ``FOLDER/NAME.yaml`` (``folder`` first) that does not exist here, the copy
    under ``shipped`` (the package's ``train_configs`` / ``eval_configs``) if there is one: an installed tinygpt run
    outside a checkout finds the configs the README names."""
    path = Path(path)
    if path.is_file() or path.is_absolute() or len(path.parts) < 2 or path.parts[0] != folder:
        return path
    copy = shipped.joinpath(*path.parts[1:])
    return copy if copy.is_file() else path


def tiny_data_dir(override: str | os.PathLike | None = None) -> Path:
    return Path(override or os.environ.get("TINYGPT_TINY_DATA") or "data/synthetic")


TINY_OUTPUT_DIR = Path("outputs/tiny")


def display_path(path: str | os.PathLike) -> str:
    """``path`` as a log line shows it: relative to the working directory when that is shorter and does not leave it
    (``outputs/tiny/stage4``), else absolute with ``..`` and links resolved (``/data/models/stage4``)."""
    absolute = Path(path).resolve()
    try:
        relative = str(absolute.relative_to(Path.cwd().resolve()))
    except ValueError:  # outside the working directory: relative would start with ..
        return str(absolute)
    return relative if len(relative) < len(str(absolute)) else str(absolute)


def is_training_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a training checkpoint (``run.checkpoint_dir/step_N``), not a saved model directory."""
    return (Path(path) / TRAINABLE_FILE).is_file()
