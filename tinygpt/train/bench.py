"""Benchmark a stage's training step: ``python -m tinygpt.train.bench --cfg-path train_configs/stageN.yaml --steps N
[--random-weights] [--text-tokens N] [--profile]``.

Runs N optimizer steps at the config's real batch size, image size, text length, precision, LoRA, trainable set and
gradient checkpointing, on synthetic batches (random pixels, answers of ``max_txt_len`` tokens), so no data and, with
``--random-weights``, no weights are needed. Prints seconds per step, samples/s, peak memory, the model FLOPs
utilisation on a GPU, and the step time with cached Q-Former features relative to the full step (features.py).
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
from ..errors import UserError, report_errors
from .build import build_model
from .loop import compute_loss, make_accelerator, to_device
from .optim import build_optimizer
from .progress import peak_memory_gb
from .stage import frozen_weight_dtype, seed_everything

# dense bf16 peak of common training GPUs (TFLOP/s), for the utilisation figure
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "4090": 165.0,
               "3090": 71.0, "V100": 125.0, "T4": 65.0}


def synthetic_batch(model, batch_size: int, text_tokens: int, image_size: int, features: bool) -> dict:
    """One batch of the data contract: one image per sample, an answer of about ``text_tokens`` tokens."""
    answer = " ".join(["shape"] * max(1, text_tokens))
    turns = [[{"user": "<Img><ImageHere></Img> Describe this image in detail.", "assistant": answer}]
             for _ in range(batch_size)]
    batch = {"turns": turns, "image_counts": [1] * batch_size, "dataset": ["bench"] * batch_size,
             "images": torch.randn(batch_size, 3, image_size, image_size)}
    if features:
        q, d = model.config.num_query_tokens, model.config.qformer_config.hidden_size
        batch["image_features"] = torch.randn(batch_size, q, d)
    return batch


def model_flops_per_sample(model, text_tokens: int) -> float:
    """FLOPs one sample needs (attention scores left out): the LLM's frozen matrices 4 x params x tokens (forward, and
    the backward's gradient with respect to their inputs; their weight gradients are never computed), its trainable
    ones (LoRA, norms) 6 x params x tokens, the frozen ViT and Q-Former forward only, 2 x params x tokens."""
    cfg = model.config
    named = [(n, p) for n, p in model.language_model.named_parameters() if "embed_tokens" not in n]
    frozen_llm = sum(p.numel() for _, p in named if not p.requires_grad)
    trainable_llm = sum(p.numel() for _, p in named if p.requires_grad)
    vit = sum(p.numel() for p in model.vision_model.parameters())
    qformer = sum(p.numel() for p in model.qformer.parameters())
    patches = (cfg.image_size // int(cfg.vision_config.patch_size)) ** 2 + 1
    tokens = 1 + cfg.num_query_tokens + text_tokens + 16
    return ((4.0 * frozen_llm + 6.0 * trainable_llm) * tokens + 2.0 * vit * patches
            + 2.0 * qformer * cfg.num_query_tokens)


def _peak_tflops() -> Optional[float]:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def time_steps(cfg, accelerator, model, optimizer, batch: dict, steps: int) -> float:
    batch = to_device(batch, accelerator.device)
    durations = []
    for _ in range(steps + 1):  # the first step warms up (allocations, kernels) and is not counted
        if accelerator.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with accelerator.autocast():
            loss = compute_loss(model, batch, cfg.model)
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if accelerator.device.type == "cuda":
            torch.cuda.synchronize()
        durations.append(time.perf_counter() - start)
    return sum(durations[1:]) / max(1, steps)


def profile_steps(cfg, accelerator, model, optimizer, batch: dict, steps: int = 3, rows: int = 15) -> str:
    """The operators that take the step time (torch.profiler over ``steps`` steps of an already warm model: the bench
    profiles after its timed steps), as a table."""
    cuda = accelerator.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        time_steps(cfg, accelerator, model, optimizer, batch, steps - 1)  # runs steps - 1 timed + 1 untimed
    key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows)


def bench(cfg, steps: int, random_weights: bool, text_tokens: Optional[int] = None, profile: bool = False) -> dict:
    if random_weights:
        cfg.model.init_from = None
    accelerator = make_accelerator(cfg.run)
    seed_everything(cfg.run.seed)
    built = build_model(cfg, frozen_dtype=frozen_weight_dtype(cfg, accelerator))
    model = built.model
    optimizer = build_optimizer(model, cfg.optim, cfg.schedule.init_lr)
    model, optimizer = accelerator.prepare(model, optimizer)
    unwrapped = accelerator.unwrap_model(model)
    cuda = accelerator.device.type == "cuda"
    load_peak = peak_memory_gb(accelerator.device)
    if cuda:  # the steps' own peak, apart from the loading's
        torch.cuda.reset_peak_memory_stats()
    batch_size = max(spec.batch_size for spec in cfg.active_datasets().values())
    text = text_tokens if text_tokens is not None else min(cfg.model.max_txt_len, 160)
    full = time_steps(cfg, accelerator, model, optimizer, synthetic_batch(unwrapped, batch_size, text,
                                                                       unwrapped.config.image_size, False), steps)
    peak = peak_memory_gb(accelerator.device)
    reserved = torch.cuda.max_memory_reserved() / 2**30 if cuda else None
    cached = time_steps(cfg, accelerator, model, optimizer, synthetic_batch(unwrapped, batch_size, text,
                                                                         unwrapped.config.image_size, True), steps)
    if profile:
        batch = synthetic_batch(unwrapped, batch_size, text, unwrapped.config.image_size, False)
        print(profile_steps(cfg, accelerator, model, optimizer, batch), file=sys.stderr)
    result = {"config": cfg.source, "device": str(accelerator.device), "precision": cfg.run.precision,
              "batch_size": batch_size, "image_size": unwrapped.config.image_size, "text_tokens": text,
              "trainable_params": built.trainable_count, "seconds_per_step": full,
              "samples_per_s": batch_size / full, "peak_memory_gb": peak, "peak_reserved_gb": reserved,
              "load_peak_memory_gb": load_peak,
              "cached_features_step_ratio": cached / full}
    if cuda:
        result["gpu"] = torch.cuda.get_device_name()
    peak_tflops = _peak_tflops()
    if peak_tflops:
        flops = model_flops_per_sample(unwrapped, text) * batch_size / full
        result["model_tflops"] = flops / 1e12
        result["mfu"] = flops / (peak_tflops * 1e12)
    return result


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tinygpt.train.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cfg-path", required=True)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--random-weights", action="store_true", help="random weights of the preset, no init_from")
    parser.add_argument("--text-tokens", type=int, default=None,
                        help="answer length per sample (default: the config's max_txt_len, at most 160)")
    parser.add_argument("--profile", action="store_true", help="also print the top operators of a step (stderr)")
    parser.add_argument("--options", nargs="+", default=[], metavar="KEY=VALUE")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    return report_errors(lambda: _bench_command(args))


def _bench_command(args: argparse.Namespace) -> int:
    cfg = load_config(args.cfg_path, args.options)
    if args.steps < 1:
        raise UserError("--steps must be >= 1")
    if not args.random_weights:
        check_paths(cfg)
    if args.text_tokens is not None and not 1 <= args.text_tokens <= cfg.model.max_txt_len:
        raise UserError(f"--text-tokens must be in 1..{cfg.model.max_txt_len} (model.max_txt_len of {cfg.source})")
    result = bench(cfg, args.steps, args.random_weights, args.text_tokens, args.profile)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(f"{result['config']}: batch {result['batch_size']} x {result['image_size']} px, "
              f"{result['trainable_params']:,} trainable, {result['device']} {result['precision']}")
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
