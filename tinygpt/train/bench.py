"""Benchmark a stage's training step: ``python -m tinygpt.train.bench --cfg-path train_configs/stageN.yaml --steps N
[--random-weights] [--text-tokens N] [--lengths fixed|mixed] [--profile] [--compare all|SWITCH,...]``.

Runs N optimizer steps at the config's real batch size, image size, text length, precision, LoRA, trainable set and
gradient checkpointing, on synthetic batches (random pixels, answers of ``max_txt_len`` tokens, or spread up to it
with ``--lengths mixed``), so no data and, with ``--random-weights``, no weights are needed. Prints seconds per step,
samples/s, peak memory, the model FLOPs utilisation on a GPU, and the step time with cached Q-Former features
relative to the full step (features.py). ``--compare`` instead times every speed switch before/after side by side
in the same run (``bench_switches.py``) and prints a markdown table.

Without a GPU (or with ``run.cpu: true``) a model of more than a billion parameters (the full-size stages) is refused
with one line before anything is built: one step of it takes many minutes and tens of GiB there. ``--allow-cpu``
runs it anyway; the tiny stages (``train_configs/tiny/``) run on any CPU.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from typing import Optional

import torch
from torch.profiler import ProfilerActivity, profile

from ..config import check_paths, load_config
from ..config.options import add_options_argument
from ..errors import UserError, report_errors
from ..model import TinyGPTVForConditionalGeneration, build_config
from .bench_steps import model_flops_per_sample, peak_tflops, synthetic_batch, time_steps
from .bench_switches import compare, markdown_table, parse_switches
from .build import build_model, planned_config
from .loop import make_accelerator, precision_note, ran_precision
from .optim import build_optimizer
from .progress import peak_memory_gb
from .stage import frozen_weight_dtype, seed_everything

__all__ = ["bench", "main", "model_flops_per_sample"]
log = logging.getLogger("tinygpt.train")
CPU_MAX_PARAMS = 1_000_000_000  # larger models are refused on the CPU without --allow-cpu (the tiny one has 31 M)


def model_parameters(cfg, random_weights: bool) -> int | None:
    """Parameters of the model the bench would build, counted on the meta device (nothing is allocated); None for
    the built-in tiny models."""
    config = build_config(cfg.model.preset) if random_weights else planned_config(cfg)
    if config is None:
        return None
    with torch.device("meta"):
        return sum(p.numel() for p in TinyGPTVForConditionalGeneration(config).parameters())


def check_cpu_size(cfg, random_weights: bool, allow_cpu: bool) -> None:
    """Refuse a model of more than :data:`CPU_MAX_PARAMS` parameters when the bench would run on the CPU."""
    if allow_cpu or (torch.cuda.is_available() and not cfg.run.cpu):
        return
    count = model_parameters(cfg, random_weights)
    if count is None or count <= CPU_MAX_PARAMS:
        return
    key = "model.preset" if random_weights or cfg.model.init_from is None else "model.init_from"
    value = cfg.model.preset if key == "model.preset" else cfg.model.init_from
    where = "run.cpu: true" if cfg.run.cpu else "no GPU"
    raise UserError(f"{cfg.origin(key)}: {key}: {value} is a {count / 1e9:.1f} B-parameter model and this run has "
                    f"{where}: one CPU step takes many minutes and tens of GiB; bench a tiny stage "
                    "(train_configs/tiny/stageN.yaml), run on a GPU, or pass --allow-cpu to run it anyway")


def profile_steps(cfg, accelerator, model, optimizer, batch: dict, steps: int = 3, rows: int = 15) -> str:
    """The operators that take the step time (torch.profiler over ``steps`` steps of an already warm model: the bench
    profiles after its timed steps), as a table."""
    cuda = accelerator.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        time_steps(cfg, accelerator, model, optimizer, batch, steps - 1)  # runs steps - 1 timed + 1 untimed
    key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows)


def bench(cfg, steps: int, random_weights: bool, text_tokens: Optional[int] = None, profile: bool = False,
          lengths: str = "fixed", switches: Optional[list[str]] = None, warmup: int = 1,
          deadline_s: Optional[float] = None) -> dict:
    deadline = None if deadline_s is None else time.monotonic() + deadline_s
    if random_weights:
        cfg.model.init_from = None
    accelerator = make_accelerator(cfg.run, cfg.origin("run.grad_accum_steps"))
    note = precision_note(cfg, accelerator)
    if note:
        log.warning("%s", note)
    seed_everything(cfg.run.seed)
    built = build_model(cfg, frozen_dtype=frozen_weight_dtype(cfg, accelerator),
                        init_device=accelerator.device if random_weights else None)
    model = accelerator.prepare(built.model)
    unwrapped = accelerator.unwrap_model(model)
    cuda = accelerator.device.type == "cuda"
    load_peak = peak_memory_gb(accelerator.device)
    if cuda:  # the steps' own peak, apart from the loading's
        torch.cuda.reset_peak_memory_stats()
    batch_size = max(spec.batch_size for spec in cfg.active_datasets().values())
    text = text_tokens if text_tokens is not None else min(cfg.model.max_txt_len, 160)
    size = unwrapped.config.image_size
    result = {"config": cfg.source, "device": str(accelerator.device), "precision": ran_precision(accelerator),
              "batch_size": batch_size, "image_size": size, "text_tokens": text, "lengths": lengths,
              "trainable_params": built.trainable_count, "load_peak_memory_gb": load_peak}
    if note:
        result["precision_requested"] = cfg.run.precision
    if cuda:
        result["gpu"] = torch.cuda.get_device_name()
    if switches:  # every variant builds its own optimizer
        batch = synthetic_batch(unwrapped, batch_size, text, size, False, lengths)
        result["variants"] = compare(cfg, accelerator, model, batch, switches, steps, warmup, peak_tflops(),
                                     deadline)
        return result
    optimizer = accelerator.prepare(build_optimizer(unwrapped, cfg.optim, cfg.schedule.init_lr))
    full = time_steps(cfg, accelerator, model, optimizer, synthetic_batch(unwrapped, batch_size, text, size, False,
                                                                         lengths), steps, warmup)
    peak = peak_memory_gb(accelerator.device)
    reserved = torch.cuda.max_memory_reserved() / 2**30 if cuda else None
    cached = time_steps(cfg, accelerator, model, optimizer, synthetic_batch(unwrapped, batch_size, text, size, True,
                                                                           lengths), steps, warmup)
    if profile:
        batch = synthetic_batch(unwrapped, batch_size, text, size, False, lengths)
        print(profile_steps(cfg, accelerator, model, optimizer, batch), file=sys.stderr)
    result.update({"seconds_per_step": full, "samples_per_s": batch_size / full, "peak_memory_gb": peak,
                   "peak_reserved_gb": reserved, "cached_features_step_ratio": cached / full})
    tflops = peak_tflops()
    if tflops:
        flops = model_flops_per_sample(unwrapped, text) * batch_size / full
        result["model_tflops"] = flops / 1e12
        result["mfu"] = flops / (tflops * 1e12)
    return result


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tinygpt.train.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cfg-path", required=True)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (allocations, compilation)")
    parser.add_argument("--random-weights", action="store_true", help="random weights of the preset, no init_from")
    parser.add_argument("--text-tokens", type=int, default=None,
                        help="answer length per sample (default: the config's max_txt_len, at most 160)")
    parser.add_argument("--lengths", choices=("fixed", "mixed"), default="fixed",
                        help="every answer --text-tokens long, or spread evenly up to it (padding, as in real data)")
    parser.add_argument("--compare", default=None, metavar="all|SWITCH,...",
                        help="time each speed switch before/after: packing, bucketing, fused_adamw, compile_llm, "
                             "compile_vision (or all)")
    parser.add_argument("--deadline-s", type=float, default=None,
                        help="with --compare: start no variant this many seconds after the start (the rest are "
                             "listed as skipped)")
    parser.add_argument("--profile", action="store_true", help="also print the top operators of a step (stderr)")
    parser.add_argument("--allow-cpu", action="store_true",
                        help="bench a model of more than a billion parameters without a GPU (refused otherwise)")
    add_options_argument(parser, example="data.datasets.NAME.batch_size=4 model.lora=null")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    return report_errors(lambda: _bench_command(args))


def _bench_command(args: argparse.Namespace) -> int:
    cfg = load_config(args.cfg_path, args.options)
    if args.steps < 1:
        raise UserError("--steps must be >= 1")
    if args.warmup < 1:
        raise UserError("--warmup must be >= 1")
    switches = parse_switches(args.compare) if args.compare is not None else None
    if switches and args.profile:
        raise UserError("--profile and --compare: choose one")
    if not args.random_weights:
        check_paths(cfg)
    check_cpu_size(cfg, args.random_weights, args.allow_cpu)
    if args.text_tokens is not None and not 1 <= args.text_tokens <= cfg.model.max_txt_len:
        raise UserError(f"--text-tokens must be in 1..{cfg.model.max_txt_len} (model.max_txt_len of {cfg.source})")
    result = bench(cfg, args.steps, args.random_weights, args.text_tokens, args.profile, args.lengths, switches,
                   args.warmup, args.deadline_s)
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    print(f"{result['config']}: batch {result['batch_size']} x {result['image_size']} px, answers "
          f"{result['lengths']} up to {result['text_tokens']} tokens, {result['trainable_params']:,} trainable, "
          f"{result['device']} {result['precision']}")
    if switches:
        print(markdown_table(result["variants"], f"{result['config']} ({result.get('gpu', result['device'])})"))
        return 0
    print(f"  {result['seconds_per_step']:.3f} s/step, {result['samples_per_s']:.2f} samples/s, "
          f"peak memory {result['peak_memory_gb']:.2f} GiB"
          + (f" ({result['peak_reserved_gb']:.2f} GiB reserved)" if result["peak_reserved_gb"] else "")
          + f", loading {result['load_peak_memory_gb']:.2f} GiB")
    if "mfu" in result:
        print(f"  model FLOPs utilisation {result['mfu']:.1%} ({result['model_tflops']:.1f} TFLOP/s)")
    print(f"  with cached Q-Former features: {result['cached_features_step_ratio']:.2f} x the step time")
    return 0


if __name__ == "__main__":
    sys.exit(main())
