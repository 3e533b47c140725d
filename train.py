"""Train one TinyGPT-V stage:  python train.py --cfg-path train_configs/stage1.yaml [--options key=value ...]

With no --cfg-path it runs the embedded tiny default: synthetic data, tiny backbones, tiny stages 1-4 and their
evaluation, on any CPU in minutes (tinygpt.tiny.recipe). Multi-GPU: accelerate launch train.py --cfg-path ...
"""

from __future__ import annotations

import argparse
import logging
import sys


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="train.py", description="Train one stage of TinyGPT-V (no arguments: the tiny recipe, stages 1-4).")
    parser.add_argument("--cfg-path", help="stage YAML, e.g. train_configs/stage1.yaml or train_configs/tiny/stage1.yaml")
    parser.add_argument("--options", nargs="+", default=[], metavar="KEY=VALUE",
                        help="dotted overrides, e.g. run.output_dir=out/s1 schedule.total_steps=100 run.resume=false")
    parser.add_argument("--check", action="store_true", help="validate the config and its paths, then exit")
    parser.add_argument("--quiet", action="store_true", help="warnings only")
    parser.add_argument("--tiny-llm-steps", type=int, metavar="N",
                        help="tiny recipe only: pretrain the tiny LLM for N steps instead of 2700 (cached per N; "
                             "each 1000 steps add ~1.5 min on 2 cores)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    from tinygpt.errors import report_errors

    return report_errors(lambda: _run(args))


def _run(args: argparse.Namespace) -> int:
    from tinygpt.errors import UserError

    if args.cfg_path is None:
        if args.options or args.check:
            raise UserError("--options/--check need --cfg-path (without it train.py runs the tiny recipe)")
        from tinygpt.tiny.pretrain_llm import LLMPretrainSettings
        from tinygpt.tiny.recipe import run_tiny_recipe

        llm = LLMPretrainSettings()
        run_tiny_recipe(llm=llm if args.tiny_llm_steps is None else llm.with_steps(args.tiny_llm_steps))
        return 0
    if args.tiny_llm_steps is not None:
        raise UserError("--tiny-llm-steps is for the tiny recipe (train.py without --cfg-path)")
    from tinygpt.config import check_paths, load_config

    cfg = load_config(args.cfg_path, args.options)
    if args.check:
        check_paths(cfg)
        from tinygpt.train.stage import check_dataset_specs, check_outputs

        check_dataset_specs(cfg)
        check_outputs(cfg)
        print(f"{args.cfg_path}: ok")
        return 0
    from tinygpt.tiny.backbones import resolve_builtin
    from tinygpt.train.stage import run_stage

    resolve_builtin(cfg)
    out = run_stage(cfg)
    print(f"stage output: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
