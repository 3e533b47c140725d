"""The evaluate command (python evaluate.py or tinygpt evaluate):  --cfg-path eval_configs/gqa.yaml [--options k=v ...]

Evaluates the model a config names on its benchmark (tinygpt.evaluation.runner): predictions appended to
``<out_dir>/predictions.jsonl`` (a rerun continues where a stopped one ended; ``--restart`` moves them aside and starts
over), ``summary.json``, and a table beside the paper's figures (tinygpt.evaluation.report). A user error prints one
``error:`` line and exits 2 (tinygpt.errors); results that look like a broken model print a ``WARNING`` line and are
marked in summary.json (exit 0: they are written for inspection). A config whose benchmark.root is the default
synthetic location (data/synthetic/benchmarks/<name>) that is missing gets those files written first, once the config
and run.out_dir are known to be good; a training config (train_configs/*.yaml) as --cfg-path is named as one.
docs/evaluation.md is the manual.
"""

from __future__ import annotations

import argparse

from tinygpt.config.options import add_options_argument
from tinygpt.errors import report_errors


def parse_args(argv: list[str] | None = None, prog: str = "evaluate.py") -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=prog, description="Evaluate a trained (PyTorch) or exported (GGUF) model on one benchmark.")
    parser.add_argument("--cfg-path", required=True,
                        help="evaluation config, e.g. eval_configs/gqa.yaml (one per benchmark; "
                             "eval_configs/shapes.yaml is the tiny model's held-out split)")
    add_options_argument(parser, example="benchmark.root=/data/gqa model.path=outputs/stage4 run.limit=100 "
                                          "run.scoring=tinygpt-v-compat")
    parser.add_argument("--restart", action="store_true",
                        help="move the predictions of an earlier run aside and predict every sample again")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None, prog: str = "evaluate.py") -> int:
    args = parse_args(argv, prog)
    return report_errors(lambda: _run(args))


def _run(args: argparse.Namespace) -> int:
    from tinygpt.evaluation.config import load_eval_config
    from tinygpt.evaluation.report import format_run
    from tinygpt.evaluation.runner import SUMMARY, run_evaluation
    from tinygpt.io_utils import check_output_dir

    cfg = load_eval_config(args.cfg_path, args.options)
    check_output_dir(cfg.run.out_dir, cfg.blame("run.out_dir"), "evaluation results")  # before anything is written
    _write_synthetic_files(cfg)
    summary = run_evaluation(cfg, restart=args.restart, quiet=args.quiet)
    print(format_run(summary))
    print(f"results: {cfg.run.out_dir}/{SUMMARY}")
    return 0


def _write_synthetic_files(cfg) -> None:
    """The shipped configs' default root, the synthetic files for the tiny model, is written when it is missing
    (in seconds; tinygpt.tiny.synthetic.benchmark_files), so they run right after the quick start."""
    from pathlib import Path

    from tinygpt.evaluation.config import GENERATOR_SPLITS, default_root

    root = Path(cfg.benchmark.root)
    if cfg.benchmark.name in GENERATOR_SPLITS or root.exists() or root != default_root(cfg.benchmark.name):
        return
    from tinygpt.tiny.synthetic.benchmark_files import write_benchmark_files

    print(f"writing the synthetic benchmark files for the tiny model: {root.parent}", flush=True)
    write_benchmark_files(root.parent)
