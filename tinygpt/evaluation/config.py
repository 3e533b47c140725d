"""Evaluation configs (`eval_configs/<benchmark>.yaml`): a launch config plus what to evaluate and how to run it.

    cfg = load_eval_config("eval_configs/gqa.yaml", ["benchmark.root=/data/gqa", "run.batch_size=16"])

The file is a launch config (tinygpt.chat.launch: `model`, `limits`, parsed and checked there; a non-empty
`generation` section is refused: answers are greedy and each benchmark sets its max_new_tokens) with two more
sections:

    benchmark:  name: a registry name (tinygpt.evaluation.benchmarks: gqa, vsr, ..., shapes)
                root: the dataset directory (default: the synthetic files for the tiny model,
                      data/synthetic/benchmarks/<name>; shapes: data/synthetic/eval; $TINYGPT_TINY_DATA moves both)
                split: one of the benchmark's splits (default: its first)
                options: a mapping handed to the benchmark's `load` (limit, prompt, prompt_style, images, ...)
    run:        out_dir: where predictions.jsonl and summary.json go (default outputs/eval/<name>-<split>)
                batch_size: questions generated together (default 8)
                scoring: official | tinygpt-v-compat (the headline; both are always computed)
                limit: the first N samples only (handed to `load` as options.limit; default: all)

`--options key=value ...` overrides any key (an omegaconf dotlist, values parsed as YAML, as train.py does). Every
bad key or value is one UserError naming the file (or ``--options`` when the override is at fault) and the key.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable

from ..chat.launch import LaunchConfig, check_section, find_launch_config, launch_config_from_tree, read_config_tree
from ..config.options import OPTIONS, parse_options
from ..errors import UserError, did_you_mean
from ..paths import tiny_data_dir
from .benchmark import SCORINGS, Benchmark
from .benchmarks import common, get_benchmark, names

LAUNCH_SECTIONS = ("model", "generation", "limits")
SECTIONS = (*LAUNCH_SECTIONS, "benchmark", "run")


@dataclass(frozen=True)
class BenchmarkChoice:
    name: str = ""
    root: str | None = None
    split: str | None = None
    options: dict = field(default_factory=dict)


@dataclass(frozen=True)
class RunChoice:
    out_dir: str | None = None
    batch_size: int = 8
    scoring: str = "official"
    limit: int | None = None


@dataclass(frozen=True)
class EvalConfig:
    source: Path
    launch: LaunchConfig
    benchmark: BenchmarkChoice  # name, root, split and options all filled in
    run: RunChoice  # out_dir filled in
    overridden: frozenset[str] = frozenset()  # the dotted keys --options set

    def blame(self, key: str) -> str:
        """Who set ``key``, for a message about its value: ``--options benchmark.root`` when the command line did,
        else ``eval_configs/gqa.yaml: benchmark.root``."""
        return f"{OPTIONS} {key}" if key in self.overridden else f"{self.source}: {key}"

    @property
    def load_options(self) -> dict:
        """The options `load` gets: benchmark.options plus run.limit as ``limit``."""
        options = dict(self.benchmark.options)
        if self.run.limit is not None:
            options["limit"] = self.run.limit
        return options


# benchmarks whose synthetic files `python -m tinygpt.tiny.synthetic` writes (in the held-out split), by their folder
GENERATOR_SPLITS = {"shapes": Path("eval"), "multi_image": Path("eval") / "multi_image"}


def default_root(name: str) -> Path:
    """Where the synthetic files for the tiny model are (tinygpt.tiny.synthetic writes them)."""
    return tiny_data_dir() / GENERATOR_SPLITS.get(name, Path("benchmarks") / name)


def _benchmark(path: Path, raw) -> BenchmarkChoice:
    choice = check_section(path, "benchmark", raw, BenchmarkChoice)
    if not choice.name:
        raise UserError(f"{path}: benchmark.name is required (one of {', '.join(names())})")
    if choice.name not in names():
        raise UserError(f"{path}: benchmark.name must be one of {', '.join(names())}, got {choice.name!r}"
                        f"{did_you_mean(choice.name, names())}")
    bench = get_benchmark(choice.name)
    split = choice.split or bench.splits[0]
    if split not in bench.splits:
        raise UserError(f"{path}: benchmark.split must be one of {', '.join(bench.splits)} for {choice.name}, "
                        f"got {split!r}{did_you_mean(split, bench.splits)}")
    options = {} if choice.options is None else choice.options
    if not isinstance(options, dict):
        raise UserError(f"{path}: benchmark.options must be a mapping (e.g. {{limit: 100}}), got {options!r}")
    _check_option_names(path, choice.name, bench, options)
    root = choice.root or str(default_root(choice.name))
    return BenchmarkChoice(choice.name, root, split, options)


def accepted_options(bench: Benchmark) -> tuple[str, ...] | None:
    """The option names ``bench.load`` accepts: its module's ``OPTIONS`` (shapes), or the shared ones of a module
    that reads them with ``common.parse_options`` (gqa, vqa, refcoco, ...); None when it declares neither (then only
    its ``load`` checks them)."""
    module = sys.modules[bench.load.__module__]
    if hasattr(module, "OPTIONS"):
        return tuple(module.OPTIONS)
    if getattr(module, "parse_options", None) is common.parse_options:
        return common.OPTIONS
    return None


def _check_option_names(path: Path, name: str, bench: Benchmark, options: dict) -> None:
    """A misspelt ``benchmark.options`` key is said here, when the config is read, not when the benchmark loads
    (after the model)."""
    accepted = accepted_options(bench)
    if accepted is None:
        return
    for key in options:
        if key not in accepted:
            raise UserError(f"{path}: benchmark.options.{key}: unknown option for benchmark {name}; expected one of "
                            f"{', '.join(accepted)}{did_you_mean(str(key), accepted)}")


def _run(path: Path, raw, bench: BenchmarkChoice) -> RunChoice:
    run = check_section(path, "run", raw, RunChoice)
    if run.batch_size < 1:
        raise UserError(f"{path}: run.batch_size must be >= 1, got {run.batch_size}")
    if run.scoring not in SCORINGS:
        raise UserError(f"{path}: run.scoring must be one of {', '.join(SCORINGS)}, got {run.scoring!r}"
                        f"{did_you_mean(run.scoring, SCORINGS)}")
    if run.limit is not None and run.limit < 1:
        raise UserError(f"{path}: run.limit must be >= 1 (or null: every sample), got {run.limit}")
    if run.limit is not None and bench.options.get("limit") not in (None, run.limit):
        raise UserError(f"{path}: run.limit ({run.limit}) and benchmark.options.limit "
                        f"({bench.options['limit']}) disagree; set one")
    out_dir = run.out_dir or str(Path("outputs") / "eval" / f"{bench.name}-{bench.split}")
    return RunChoice(out_dir, run.batch_size, run.scoring, run.limit)


def eval_config_from_tree(path: Path, tree: dict, check_model: bool = True) -> EvalConfig:
    """Check an already read tree (``read_config_tree``); errors name ``path``."""
    for key in tree:
        if key not in SECTIONS:
            raise UserError(f"{path}: unknown section {key!r}{did_you_mean(str(key), SECTIONS)} "
                            f"(valid: {', '.join(SECTIONS)})")
    if tree.get("benchmark") is None:
        if isinstance(tree.get("model"), dict) and tree.get("generation") is not None:  # eval_configs/gguf.yaml
            backend, model = tree["model"].get("backend", "torch"), tree["model"].get("path")
            raise UserError(f"{path}: a launch config (for chat, the demo and the server), not an evaluation config; "
                            "evaluate its model with a benchmark's config, e.g. python evaluate.py --cfg-path "
                            f"eval_configs/gqa.yaml --options model.backend={backend} model.path={model} "
                            f"run.out_dir=outputs/eval/gqa-{backend}")
        raise UserError(f"{path}: benchmark section is required (benchmark: {{name: ...}}; names: "
                        f"{', '.join(names())})")
    bench = _benchmark(path, tree["benchmark"])
    run = _run(path, tree.get("run"), bench)
    launch = launch_config_from_tree(path, {k: v for k, v in tree.items() if k in LAUNCH_SECTIONS}, check_model)
    _no_generation(path, tree.get("generation"))
    return EvalConfig(path, launch, bench, run)


def _no_generation(path: Path, section) -> None:
    """Evaluation is greedy and each benchmark sets its own max_new_tokens, so a (checked, non-empty) generation
    section would be silently ignored: it is refused, naming its first key."""
    if not section:
        return
    key = next(iter(section)) if isinstance(section, dict) else None
    raise UserError(f"{path}: {'generation.' + str(key) if key is not None else 'generation'}: an evaluation config "
                    "takes no generation settings (answers are greedy and each benchmark sets max_new_tokens); "
                    "remove the generation section")


TRAINING_KEYS = ("extends", "data", "optim", "schedule")  # train.py's configs; no evaluation config has them


def _refuse_training_config(path: Path) -> None:
    """A training config (train_configs/*.yaml) is named as one: read as an evaluation config it failed on its first
    ${vars...} interpolation, as "not valid YAML" (so the raw YAML is looked at, before interpolation)."""
    import yaml

    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return  # read_config_tree names what is wrong with it
    found = [key for key in TRAINING_KEYS if key in tree] if isinstance(tree, dict) else []
    if found and "benchmark" not in tree:
        raise UserError(f"{path}: a training config for train.py (it has {', '.join(found)}), not an evaluation "
                        "config; give one of eval_configs/<benchmark>.yaml, with --options model.path=<the trained "
                        "stage's output directory>")


def load_eval_config(path: str | os.PathLike, options: Iterable[str] = (), check_model: bool = True) -> EvalConfig:
    """Read and check an evaluation config with its ``--options`` overrides. ``check_model``: the model path must
    exist (off for tests of the parsing)."""
    path = find_launch_config(path)
    _refuse_training_config(path)
    overrides, keys = parse_options(options, example="run.batch_size=16")
    try:
        cfg = eval_config_from_tree(path, read_config_tree(path, overrides), check_model)
        return replace(cfg, overridden=frozenset(keys))
    except UserError as error:
        if overrides is None:
            raise
        try:  # the file alone may be fine: then the override is at fault, and the message says so
            # the file's own model is checked only when it is the one used (--options model.path=X replaces it)
            eval_config_from_tree(path, read_config_tree(path), check_model and "model.path" not in keys)
        except UserError:
            raise error from None
        message = str(error)
        prefix = f"{path}: "
        raise UserError(f"{OPTIONS} (over {path}): {message[len(prefix):] if message.startswith(prefix) else message}"
                        ) from None
