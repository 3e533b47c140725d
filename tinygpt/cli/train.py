"""The train command (python train.py or tinygpt train):  --cfg-path train_configs/stage1.yaml [--options k=v ...]

With no --cfg-path it runs the embedded tiny default: synthetic data, tiny backbones, tiny stages 1-4 and their
evaluation, on any CPU in minutes (tinygpt.tiny.recipe). Multi-GPU: accelerate launch train.py --cfg-path ...
The top-level train.py is a shim over :func:`main`; ``prog`` only changes the name that usage and errors print.
A user error prints one ``error:`` line and exits 2, results that are not believable exit 3 (tinygpt.errors). Ctrl-C
or SIGTERM during training prints one line saying at which step and where a rerun resumes (the main process of a
multi-process run; every process exits so), and exits 130 / 143.
"""

from __future__ import annotations

import argparse
import logging
import sys

from tinygpt.config.options import add_options_argument
from tinygpt.errors import UserError, report_errors


def parse_args(argv: list[str] | None = None, prog: str = "train.py") -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=prog, description="Train one stage of TinyGPT-V (no arguments: the tiny recipe, stages 1-4).")
    parser.add_argument("--cfg-path",
                        help="stage YAML, e.g. train_configs/stage1.yaml or train_configs/tiny/stage1.yaml")
    add_options_argument(parser, example="run.output_dir=out/s1 schedule.total_steps=100 run.resume=false")
    parser.add_argument("--check", action="store_true", help="validate the config and its paths, then exit")
    parser.add_argument("--quiet", action="store_true", help="warnings only: no info lines, no progress bar")
    parser.add_argument("--tiny-llm-steps", type=int, metavar="N",
                        help="tiny recipe only: pretrain the tiny LLM for N steps instead of 2700 (cached per N; "
                             "each 1000 steps add ~1.5 min on 2 cores)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None, prog: str = "train.py") -> int:
    args = parse_args(argv, prog)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    return report_errors(lambda: _run_reporting_interrupts(args))


def _run_reporting_interrupts(args: argparse.Namespace) -> int:
    from tinygpt.train.interrupt import TrainingInterrupted

    try:
        return _run(args)
    except TrainingInterrupted as stopped:  # "interrupted at step N; rerun the same command to resume from ..."
        if stopped.main:  # one line for a multi-process run; every process exits with the code
            print(stopped.message, file=sys.stderr)
        return stopped.exit_code


def _run(args: argparse.Namespace) -> int:
    # The config, training and recipe modules import torch and transformers: imported here, not at the top, so that
    # --help and argument errors answer at once.
    if args.cfg_path is None:
        if args.options or args.check:
            raise UserError("--options/--check need --cfg-path (without it train.py runs the tiny recipe)")
        from tinygpt.tiny.pretrain_llm import LLMPretrainSettings
        from tinygpt.tiny.recipe import run_tiny_recipe

        llm = LLMPretrainSettings()
        run_tiny_recipe(llm=llm if args.tiny_llm_steps is None else llm.with_steps(args.tiny_llm_steps),
                        progress=not args.quiet)
        return 0
    if args.tiny_llm_steps is not None:
        raise UserError("--tiny-llm-steps is for the tiny recipe (train.py without --cfg-path)")
    from tinygpt.config import check_paths, load_config

    cfg = load_config(args.cfg_path, args.options + (["run.progress=false"] if args.quiet else []))
    from tinygpt.tiny.backbones import resolve_builtin

    resolve_builtin(cfg, build=False)  # when built: the directory a finished run recorded (nothing is built here)
    if args.check:
        check_paths(cfg)
        from tinygpt.train.run_guard import already_complete, check_resume, resume_line
        from tinygpt.train.stage import check_dataset_specs, check_outputs

        check_dataset_specs(cfg)
        check_outputs(cfg)
        where = already_complete(cfg)  # as the run would say it (and then it checks no checkpoint)
        if where is None:
            where = resume_line(cfg, check_resume(cfg))
        if where:
            print(where)
        print(f"{args.cfg_path}: ok")
        return 0
    from tinygpt.train.run_guard import already_complete
    from tinygpt.train.stage import check_outputs, run_stage

    check_outputs(cfg)  # before builtin:tiny may build the backbones: a bad output location costs nothing
    complete = already_complete(cfg)  # run.resume auto and the run already finished: no model loads
    if complete:
        print(complete)
        return 0
    resolve_builtin(cfg)  # still builtin:tiny when the backbones are not built: built now, the first time
    out = run_stage(cfg)
    print(f"stage output: {out}")
    return 0
