"""What saving, restoring and clipping need under FSDP (accelerate's FSDP1 with ``use_orig_params``, as the shipped
``train_configs/accelerate/fsdp.yaml`` sets it up); without FSDP each helper is the plain operation.

Between steps FSDP keeps only a flat 1-D shard of every parameter on each process, and the wrapped layers add
``_fsdp_wrapped_module.`` to parameter names. So every tensor that is saved or restored goes through the gathered,
full-shape view under the plain names, and gradients are clipped by FSDP's own global norm. Every function that
gathers is collective: under FSDP all processes must call it.

On a machine without a GPU accelerate sets an FSDP launch up as plain data parallel (MULTI_CPU) and refuses the
launch's ``sync_module_states``; :func:`cpu_fsdp_launch` and :func:`fsdp_on_cpu` make such a launch train FSDP on the
CPU instead (tests/test_fsdp.py, tests/test_train_env_fsdp_cpu.py).
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Iterator

import torch
from torch import nn

FSDP_PREFIX = "_fsdp_wrapped_module."
log = logging.getLogger("tinygpt.train")


def is_fsdp(accelerator) -> bool:
    return accelerator.distributed_type.name == "FSDP"


def cpu_fsdp_launch(cuda: bool) -> bool:
    """Before the Accelerator is built: whether this is an FSDP launch (``accelerate launch --config_file
    train_configs/accelerate/fsdp.yaml``) without a GPU. Then ``sync_module_states`` (and the CPU-RAM-efficient
    loading that forces it) are turned off: accelerate refuses them on a CPU, and all they do is broadcast rank 0's
    initial weights, which every process here already holds (the same model file, or the same ``run.seed``)."""
    if cuda or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return False
    said = os.environ.get("RANK", "0") != "0"
    if os.environ.get("FSDP_SYNC_MODULE_STATES", "false").lower() == "true" and not said:
        log.info("FSDP on the CPU: fsdp_sync_module_states turned off (accelerate allows it only on a GPU; every "
                 "process loads the same initial weights)")
    os.environ["FSDP_SYNC_MODULE_STATES"] = "false"
    os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] = "false"
    return True


def fsdp_on_cpu(accelerator):
    """After: an FSDP launch of several CPU processes, which accelerate set up as plain data parallel, trains FSDP
    (gloo) with the plugin built from the launch's FSDP settings, computing on ``cpu`` (accelerate's ``cpu:0`` is
    not a device FSDP computes on). One process stays as accelerate set it up (FSDP needs a process group)."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    if accelerator.num_processes < 2 or is_fsdp(accelerator):
        return accelerator
    plugin = FullyShardedDataParallelPlugin()  # from the launch's FSDP_* variables
    if accelerator.mixed_precision != "no":
        plugin.set_mixed_precision(accelerator.mixed_precision)
    for state in (accelerator.state, PartialState()):  # AcceleratorState() copies PartialState's on every call
        state.distributed_type = DistributedType.FSDP
        state.device = torch.device("cpu")
    accelerator.state.fsdp_plugin = plugin
    return accelerator


def plain_name(name: str) -> str:
    return name.replace(FSDP_PREFIX, "")


def clip_parameters(accelerator, model: nn.Module, trainable: list) -> list:
    """The parameters to hand to ``accelerator.clip_grad_norm_``: under FSDP all of the model's (accelerate then
    uses FSDP's clip, whose norm spans every process's shard; frozen parameters have no gradient), else the
    trainable ones (a norm of local shards alone would differ per process)."""
    return list(model.parameters()) if is_fsdp(accelerator) else trainable


@contextlib.contextmanager
def full_parameters(accelerator, model: nn.Module, writeback: bool = False) -> Iterator[dict[str, nn.Parameter]]:
    """``{plain name: parameter}`` with full shapes; with ``writeback`` changes made inside reach the shards."""
    unwrapped = accelerator.unwrap_model(model)
    if not is_fsdp(accelerator):
        yield dict(unwrapped.named_parameters())
        return
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    with FSDP.summon_full_params(model, writeback=writeback):
        yield {plain_name(n): p for n, p in unwrapped.named_parameters()}


def trainable_state(accelerator, model: nn.Module) -> dict[str, torch.Tensor]:
    """CPU copies of the trainable tensors under their plain names (collective under FSDP)."""
    with full_parameters(accelerator, model) as params:
        return {n: p.detach().to("cpu", copy=True).contiguous() for n, p in params.items() if p.requires_grad}


def _full_options(accelerator, gather_on_main: bool = True):
    """torch.distributed.checkpoint's options for full (gathered) state dicts of model and optimizer, keyed by
    parameter name. From a GPU (``gather_on_main``) they are copied to the CPU and complete on the main process only;
    on a CPU every process gets them whole (there FSDP's "offload" hands back views of buffers it frees: a crash)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=gather_on_main and accelerator.device.type != "cpu")


def _plain_optimizer(optimizer):
    """The torch optimizer inside accelerate's wrapper (whose step() is tied to gradient accumulation)."""
    return getattr(optimizer, "optimizer", optimizer)


def optimizer_state(accelerator, model: nn.Module, optimizer) -> dict:
    """The optimizer's state dict; under FSDP the full one, keyed by parameter name (collective; complete on the
    main process). An FSDP checkpoint therefore resumes only under FSDP, and a plain one only without it."""
    if not is_fsdp(accelerator):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, _plain_optimizer(optimizer), options=_full_options(accelerator))


def load_optimizer_state(accelerator, model: nn.Module, optimizer, state: dict) -> None:
    """Restore :func:`optimizer_state`'s dict (every process reads the full one; FSDP keeps its own shard): the
    moments and step counts. The settings stay this run's config (weight decay, betas, eps, fused: loading would put
    the checkpoint's back, and a resume warned about a change would then not make it; the schedule sets the lr)."""
    settings = [{k: v for k, v in group.items() if k not in ("params", "lr", "initial_lr")}
                for group in optimizer.param_groups]
    if not is_fsdp(accelerator):
        optimizer.load_state_dict(state)
    else:
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        set_optimizer_state_dict(model, _plain_optimizer(optimizer), state,
                                 options=_full_options(accelerator, gather_on_main=False))
    for group, own in zip(optimizer.param_groups, settings):
        group.update(own)


class FullModelView:
    """What ``save_vlm`` reads of a model (config, tokenizer, named_parameters, state_dict), built from the full state
    dict that FSDP gathers on the main process (plain names)."""

    def __init__(self, model: nn.Module, state: dict[str, torch.Tensor], trainable: set[str]):
        self.config, self.tokenizer = model.config, model.tokenizer
        self._state, self._trainable = state, trainable

    def named_parameters(self):
        for name, tensor in self._state.items():
            yield name, nn.Parameter(tensor, requires_grad=name in self._trainable)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self._state)


def model_to_save(accelerator, model: nn.Module):
    """The model the main process saves as the stage output (collective under FSDP: the full state is gathered)."""
    unwrapped = accelerator.unwrap_model(model)
    if not is_fsdp(accelerator):
        return unwrapped
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    trainable = {plain_name(n) for n, p in unwrapped.named_parameters() if p.requires_grad}
    state = get_model_state_dict(model, options=_full_options(accelerator))  # complete on the main process
    return FullModelView(unwrapped, state, trainable)
