"""What saving, restoring and clipping need under FSDP (accelerate's FSDP1 with ``use_orig_params``, as the shipped
``train_configs/accelerate/fsdp.yaml`` sets it up); without FSDP each helper is the plain operation.

Between steps FSDP keeps only a flat 1-D shard of every parameter on each process, and the wrapped layers add
``_fsdp_wrapped_module.`` to parameter names. So every tensor that is saved or restored goes through the gathered,
full-shape view under the plain names, and gradients are clipped by FSDP's own global norm. Every function that
gathers is collective: under FSDP all processes must call it.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

FSDP_PREFIX = "_fsdp_wrapped_module."


def is_fsdp(accelerator) -> bool:
    return accelerator.distributed_type.name == "FSDP"


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


def _full_state_dict_type(accelerator, model: nn.Module, rank0_only: bool):
    """Full (gathered) state dicts of model and optimizer; copied to the CPU from a GPU (on a CPU, FSDP's "offload"
    hands back views of buffers it frees: a crash)."""
    from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    offload = accelerator.device.type != "cpu"
    return FSDP.state_dict_type(model, StateDictType.FULL_STATE_DICT,
                                FullStateDictConfig(offload_to_cpu=offload, rank0_only=rank0_only),
                                FullOptimStateDictConfig(offload_to_cpu=offload, rank0_only=rank0_only))


def optimizer_state(accelerator, model: nn.Module, optimizer) -> dict:
    """The optimizer's state dict; under FSDP the full one, keyed by parameter name (collective; complete on the
    main process). An FSDP checkpoint therefore resumes only under FSDP, and a plain one only without it."""
    if not is_fsdp(accelerator):
        return optimizer.state_dict()
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    with _full_state_dict_type(accelerator, model, rank0_only=True):
        return FSDP.optim_state_dict(model, optimizer)


def load_optimizer_state(accelerator, model: nn.Module, optimizer, state: dict) -> None:
    """Restore :func:`optimizer_state`'s dict (every process reads the full one; FSDP keeps its own shard)."""
    if not is_fsdp(accelerator):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    with _full_state_dict_type(accelerator, model, rank0_only=False):
        optimizer.load_state_dict(FSDP.optim_state_dict_to_load(model, optimizer, state))


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
    trainable = {plain_name(n) for n, p in unwrapped.named_parameters() if p.requires_grad}
    with _full_state_dict_type(accelerator, model, rank0_only=True):
        state = model.state_dict()  # complete on the main process, empty on the others
    return FullModelView(unwrapped, state, trainable)
