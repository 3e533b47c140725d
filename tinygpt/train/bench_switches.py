"""Each speed switch of ``speed.py`` before/after, side by side in one run (``python -m tinygpt.train.bench ...
--compare all``): one model build, then per variant a fresh optimizer, the layers compiled or not, and a few timed
steps on the same synthetic batch.

Variants: ``baseline`` (every compared switch off), ``all`` (every one on), one per switch (only that one on), and
``all but ...`` when ``all`` and some single switches failed.
Per variant: s/step, samples/s, real tokens/s (image and text tokens, no padding), padding tokens per step, model
FLOPs utilisation (real tokens only: padding is work the model did not need), peak memory (GPU: per variant; CPU:
the process's peak so far, which never falls).
"""

from __future__ import annotations

import sys
import time
import traceback
from dataclasses import dataclass, replace
from typing import Optional

import torch
import torch._dynamo
from accelerate.optimizer import AcceleratedOptimizer

from ..errors import UserError
from ..model.packing import RowLayout, padding_tokens
from .bench_steps import model_flops, time_steps
from .optim import build_optimizer
from .progress import peak_memory_gb
from .speed import compile_layers, exception_summary, uncompile_layers

SWITCHES = ("packing", "bucketing", "fused_adamw", "compile_llm", "compile_vision")
BUCKET = 64  # the bucketing variant's multiple when the config sets none


@dataclass(frozen=True)
class Variant:
    name: str
    on: frozenset


def parse_switches(text: str) -> list[str]:
    """``all`` or a comma list of :data:`SWITCHES`."""
    if text == "all":
        return list(SWITCHES)
    names = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [n for n in names if n not in SWITCHES]
    if unknown or not names:
        raise UserError(f"--compare: unknown switch {', '.join(unknown) or repr(text)}; "
                        f"choose from all, {', '.join(SWITCHES)}")
    return names


def variants(switches: list[str]) -> list[Variant]:
    """baseline, then all (the after; second, so that a deadline cuts single switches first), then each switch."""
    out = [Variant("baseline", frozenset())]
    if len(switches) > 1:
        out.append(Variant("all", frozenset(switches)))
    return out + [Variant(s, frozenset([s])) for s in switches]


def layout_of(cfg, on: frozenset) -> Optional[RowLayout]:
    tokens = cfg.run.packing.tokens_per_row if "packing" in on else None
    multiple = (cfg.run.pad_to_multiple if cfg.run.pad_to_multiple > 1 else BUCKET) if "bucketing" in on else 1
    return None if tokens is None and multiple == 1 else RowLayout(tokens, multiple)


def batch_tokens(model, batch: dict, cfg, layout: Optional[RowLayout]) -> tuple[int, int, int]:
    """(real tokens, padding tokens, rows) of ``batch`` as the model lays it out."""
    m = cfg.model
    inputs = model.prepare_inputs(batch["turns"], batch["image_counts"], m.max_txt_len, "right",
                                  m.prompt_template, m.end_sym)
    if layout is not None:
        inputs = layout.apply(inputs)
    real, pad = padding_tokens(inputs)
    return real, pad, int(inputs.input_ids.shape[0])


def run_variant(cfg, accelerator, model, batch: dict, variant: Variant, steps: int, warmup: int,
                peak_tflops: Optional[float]) -> dict:
    """Time ``steps`` steps of ``variant`` after ``warmup`` untimed ones (allocations, kernels, compilation)."""
    unwrapped = accelerator.unwrap_model(model)
    uncompile_layers(unwrapped)
    compile_layers(unwrapped, "compile_llm" in variant.on, "compile_vision" in variant.on)
    optim_cfg = replace(cfg.optim, fused="fused_adamw" in variant.on)
    # wrapped for fp16 loss scaling like a prepared one, but not registered with the accelerator, which would keep
    # every variant's Adam state alive (and in the later variants' peak memory)
    optimizer = AcceleratedOptimizer(build_optimizer(unwrapped, optim_cfg, cfg.schedule.init_lr),
                                     device_placement=False, scaler=accelerator.scaler)
    layout = layout_of(cfg, variant.on)
    run_batch = dict(batch, row_layout=layout) if layout is not None else batch
    if accelerator.device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    seconds = time_steps(cfg, accelerator, model, optimizer, run_batch, steps, warmup)
    real, pad, rows = batch_tokens(unwrapped, batch, cfg, layout)
    samples = len(batch["turns"])
    row = {"variant": variant.name, "seconds_per_step": seconds, "samples_per_s": samples / seconds,
           "tokens_per_s": real / seconds, "padding_tokens": pad, "real_tokens": real, "rows": rows,
           "peak_memory_gb": peak_memory_gb(accelerator.device), "mfu": None}
    if peak_tflops:
        flops = model_flops(unwrapped, real, sum(batch["image_counts"]))
        row["mfu"] = flops / seconds / (peak_tflops * 1e12)
    uncompile_layers(unwrapped)
    return row


def compare(cfg, accelerator, model, batch: dict, switches: list[str], steps: int, warmup: int,
            peak_tflops: Optional[float], deadline: Optional[float] = None) -> list[dict]:
    """One row per variant of :func:`variants`, in order; once ``time.monotonic()`` passes ``deadline``, the variants
    not yet started are listed as skipped (a GPU lease is short: what ran is kept). A variant that raises is listed
    as failed with its exception (the traceback goes to stderr) and the rest still run; when ``all`` failed and some
    single switches failed too, ``all but <those>`` is timed at the end."""
    rows, failed = [], []
    for variant in variants(switches):
        rows.append(try_variant(cfg, accelerator, model, batch, variant, steps, warmup, peak_tflops, deadline))
        if "failed" in rows[-1].get("skipped", "") and len(variant.on) == 1:
            failed.append(variant.name)
    all_row = next((r for r in rows if r["variant"] == "all"), None)
    rest = frozenset(s for s in switches if s not in failed)
    if all_row and "skipped" in all_row and failed and len(rest) > 1:
        variant = Variant(f"all but {', '.join(failed)}", rest)
        rows.append(try_variant(cfg, accelerator, model, batch, variant, steps, warmup, peak_tflops, deadline))
    return rows


def try_variant(cfg, accelerator, model, batch: dict, variant: Variant, steps: int, warmup: int,
                peak_tflops: Optional[float], deadline: Optional[float]) -> dict:
    if deadline is not None and time.monotonic() > deadline:
        return {"variant": variant.name, "skipped": "not run: past the deadline"}
    try:
        return run_variant(cfg, accelerator, model, batch, variant, steps, warmup, peak_tflops)
    except Exception as exc:  # one variant's failure (a compiler error, out of memory) must not lose the others
        traceback.print_exc(file=sys.stderr)
        uncompile_layers(accelerator.unwrap_model(model))
        torch._dynamo.reset()
        model.zero_grad(set_to_none=True)
        if accelerator.device.type == "cuda":
            torch.cuda.empty_cache()
        return {"variant": variant.name, "skipped": f"failed: {exception_summary(exc, 200)}"}


def markdown_table(rows: list[dict], title: str) -> str:
    """The variants as one markdown table; the last column is samples/s relative to the baseline."""
    base = rows[0].get("samples_per_s")
    lines = [f"**{title}**", "",
             "| variant | s/step | samples/s | tokens/s | padding tokens/step | MFU | peak GiB | × baseline |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['variant']} | {r['skipped']} | | | | | | |")
            continue
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "–"
        lines.append(f"| {r['variant']} | {r['seconds_per_step']:.3f} | {r['samples_per_s']:.2f} | "
                     f"{r['tokens_per_s']:,.0f} | {r['padding_tokens']:,} | {mfu} | {r['peak_memory_gb']:.2f} | "
                     f"{r['samples_per_s'] / base:.2f} |" if base else "– |")
    return "\n".join(lines)
