"""Where accelerate's own launch settings meet ours: gradient accumulation and, under DeepSpeed, gradient clipping.

* Accumulation: ``run.grad_accum_steps`` is the one count. The Accelerator is built with it
  (:func:`accumulation_plugin`), so ``accelerator.backward`` divides each micro-batch's loss by it once (under
  DeepSpeed the engine divides, by the same count). Without that, accelerate read
  ``ACCELERATE_GRADIENT_ACCUMULATION_STEPS`` (``accelerate launch --gradient_accumulation_steps N``, an accelerate
  config file) and divided the loop's already divided loss by N again. A different value there than
  ``run.grad_accum_steps`` is refused, not silently ignored.
* DeepSpeed clipping: accelerate's ``clip_grad_norm_`` does not clip under DeepSpeed; the engine clips with its
  config's ``gradient_clipping``, which accelerate fills with 1.0 when it is "auto" (whatever ``optim.max_grad_norm``
  says). :func:`agree_deepspeed` writes ``optim.max_grad_norm`` there (0.0, DeepSpeed's "no clipping", for null) when
  it is "auto" or absent, and refuses an explicit other value. The same for ``gradient_accumulation_steps``.
"""

from __future__ import annotations

import os

from accelerate.utils import GradientAccumulationPlugin

from ..config.schema import RunConfig
from ..errors import UserError

ACCUM_ENV = "ACCELERATE_GRADIENT_ACCUMULATION_STEPS"


def accumulation_plugin(run, where: str = "") -> GradientAccumulationPlugin:
    """The plugin to build the Accelerator with: ``run.grad_accum_steps`` micro-batches per step (a plugin makes
    accelerate ignore :data:`ACCUM_ENV`). UserError when that variable is set to another count; ``where``: the file
    (or --options) that set run.grad_accum_steps, named first in it."""
    steps = run.grad_accum_steps
    value = os.environ.get(ACCUM_ENV, "").strip()
    if value and value != "auto" and (not value.isdigit() or int(value) != steps):
        prefix = f"{where}: " if where else ""
        raise UserError(f"{prefix}run.grad_accum_steps: {steps} disagrees with {ACCUM_ENV}={value} (set by accelerate "
                        "launch --gradient_accumulation_steps or an accelerate config file); this trainer accumulates "
                        f"run.grad_accum_steps micro-batches per step: set run.grad_accum_steps: {value} or unset "
                        f"{ACCUM_ENV} (or set it to {steps})")
    return GradientAccumulationPlugin(num_steps=steps)


def _explicit(config: dict, key: str):
    """The DeepSpeed config's ``key`` when it holds a value, None when it is absent or "auto"."""
    value = config.get(key)
    return None if value is None or value == "auto" else value


def agree_deepspeed(cfg: RunConfig, plugin) -> None:
    """Make the DeepSpeed config (``plugin``: accelerate's DeepSpeedPlugin) clip with ``optim.max_grad_norm`` and
    accumulate ``run.grad_accum_steps``: "auto" or absent values are set to ours (before ``prepare``, which would fill
    "auto" clipping with 1.0), explicit other values are refused. Idempotent."""
    config = plugin.deepspeed_config
    norm = cfg.optim.max_grad_norm
    clipping = float(norm) if norm is not None else 0.0  # DeepSpeed clips when gradient_clipping > 0
    theirs = _explicit(config, "gradient_clipping")
    if theirs is not None and float(theirs) != clipping:
        wanted = "null" if float(theirs) == 0 else f"{float(theirs):g}"
        raise UserError(f"{cfg.origin('optim.max_grad_norm')}: optim.max_grad_norm: {norm} disagrees with the "
                        f"DeepSpeed config's gradient_clipping: {theirs} (under DeepSpeed the engine clips with its "
                        "config's value, not optim.max_grad_norm): set gradient_clipping to \"auto\" in the DeepSpeed "
                        "config (or unset ACCELERATE_GRADIENT_CLIPPING, from accelerate launch --gradient_clipping), "
                        f"or set optim.max_grad_norm: {wanted}")
    config["gradient_clipping"] = clipping
    plugin.gradient_clipping = clipping
    steps = cfg.run.grad_accum_steps
    theirs = _explicit(config, "gradient_accumulation_steps")
    if theirs is not None and int(theirs) != steps:
        raise UserError(f"{cfg.origin('run.grad_accum_steps')}: run.grad_accum_steps: {steps} disagrees with the "
                        f"DeepSpeed config's gradient_accumulation_steps: {theirs}: set it to \"auto\" or {steps} in "
                        "the DeepSpeed config")
    config["gradient_accumulation_steps"] = steps
    plugin.gradient_accumulation_steps = steps
