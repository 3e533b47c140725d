"""The speed switches of a stage (``run.packing``, ``run.pad_to_multiple``, ``run.compile``, ``optim.fused``): all on in
the full-size stages, where together they won on every stage of an H200, off in the tiny twin (docs/benchmarks.md,
"Speed switches").

* packing and bucketing change only the row layout of a batch (``tinygpt.model.packing``): the same loss;
* regional compilation: ``torch.compile`` of every Phi decoder layer, and of every frozen ViT and Q-Former layer.
  All layers of one class share one code object, so one compiled graph serves them all (compile time of one layer,
  not of the model), and Dynamo recompiles only for a new input shape (bucketing keeps those few);
* fused AdamW: ``optim.py``.
bf16 storage of frozen weights needs no switch: every bf16/fp16 run on a GPU already stores them so (``build.py``).
"""

from __future__ import annotations

import logging
from typing import Optional

import torch
import torch._dynamo
from torch import nn

from ..config.schema import RunSection
from ..errors import UserError
from ..model.packing import RowLayout

log = logging.getLogger(__name__)

RECOMPILE_LIMIT = 64


def row_layout(run: RunSection) -> Optional[RowLayout]:
    """The batch row layout the config asks for; None when it is the plain one (one sample per row, no bucketing)."""
    tokens = run.packing.tokens_per_row if run.packing.enabled else None
    if tokens is None and run.pad_to_multiple == 1:
        return None
    return RowLayout(tokens_per_row=tokens, pad_to_multiple=run.pad_to_multiple)


def llm_layers(model: nn.Module) -> list[nn.Module]:
    return list(model.language_model.model.layers)


def vision_layers(model: nn.Module) -> list[nn.Module]:
    return list(model.vision_model.encoder.layers) + list(model.qformer.encoder.layer)


def compile_layers(model: nn.Module, llm: bool, vision: bool) -> int:
    """``torch.compile`` in place (``Module.compile``) the chosen layers; returns how many. Parameters, state dict
    names and checkpoints stay as they are (only the call goes through the compiled code)."""
    layers = (llm_layers(model) if llm else []) + (vision_layers(model) if vision else [])
    # transformers wraps every layer class's forward in one shared function (gradient checkpointing), so the Phi,
    # ViT and Q-Former layers (and each input shape, grad mode and model of a process) share one code object's
    # cache of compiled graphs; Dynamo's default of 8 would send the rest back to eager without a word
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    for layer in layers:
        layer.compile()
    return len(layers)


def uncompile_layers(model: nn.Module) -> None:
    """Back to eager calls (the bench switches compilation off and on in one run)."""
    for layer in llm_layers(model) + vision_layers(model):
        layer._compiled_call_impl = None


def apply_compile(cfg, accelerator, model: nn.Module) -> int:
    """``run.compile`` on a built (not yet prepared) model. Under FSDP, whose flat parameters would sit under the
    compiled layers (untested), the layers stay eager with one warning: the full-size stages turn compile on by
    default, and ``accelerate launch --config_file train_configs/accelerate/fsdp.yaml`` must still run them."""
    switches = cfg.run.compile
    if not (switches.llm or switches.vision):
        return 0
    if accelerator.distributed_type.name == "FSDP":
        log.warning("%s: run.compile: not applied under FSDP (untested there); the layers run eager",
                    cfg.origin("run.compile"))
        return 0
    return compile_layers(model, switches.llm, switches.vision)



def compile_failed(cfg, exc: Exception) -> UserError:
    """One line for a torch.compile failure inside training (e.g. torch 2.11's inductor on an H200 failed on the Phi
    layers under gradient checkpointing with padded rows: "Node ... was invalid, but is output")."""
    return UserError(f"{cfg.origin('run.compile')}: run.compile: torch {torch.__version__} could not compile the "
                     f"model ({exception_summary(exc, 300)}); set run.compile.llm=false and run.compile.vision=false "
                     "(--options), or keep run.packing on, with which it compiled")


def exception_summary(exc: Exception, limit: int) -> str:
    """``Type: message`` on one line: the message's first two lines, without torch's "Set TORCH..." hints (a
    compiler error's first line is only "backend='inductor' raised:"), cut to ``limit`` characters."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip() and not line.startswith("Set TORCH")]
    return f"{type(exc).__name__}: {' '.join(lines[:2])[:limit]}"
