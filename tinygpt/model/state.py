"""Loading a state dict into a model with a report: missing, unexpected, shape errors; never silent.

Used by every importer and by ``checkpoint_io``. A plain (non-LoRA) key ``...qkv.weight`` also fills the
``...qkv.base_layer.weight`` of a model that has LoRA injected, so a stage-1 model loads into stage 2.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import UserError


@dataclass
class LoadReport:
    source: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)

    def summary(self) -> str:
        def show(keys):
            return ", ".join(keys[:5]) + (f" ... (+{len(keys) - 5})" if len(keys) > 5 else "")

        parts = [f"{self.source}: loaded {len(self.loaded)} tensors"]
        if self.missing:
            parts.append(f"{len(self.missing)} missing [{show(self.missing)}]")
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} unexpected [{show(self.unexpected)}]")
        return "; ".join(parts)


def _lora_aware_names(model_keys: set[str]) -> dict[str, str]:
    """Maps plain names to ``base_layer`` names where LoRA wraps the layer."""
    aliases = {}
    for key in model_keys:
        if ".base_layer." in key:
            aliases[key.replace(".base_layer.", ".")] = key
    return aliases


def match_names(model_keys, names) -> dict[str, str | None]:
    """Each of ``names`` -> the model key it fills (itself, or its ``base_layer`` key under LoRA), or None."""
    own = set(model_keys)
    aliases = _lora_aware_names(own)
    return {name: name if name in own else aliases.get(name) for name in names}


def nothing_matched(source: str, file_keys: list[str], model_keys: list[str]) -> UserError:
    """The error for a file none of whose tensors belongs to the model, with examples of both sides."""
    def examples(keys):
        return ", ".join(keys[:2]) + (" ..." if len(keys) > 2 else "") if keys else "nothing"

    return UserError(f"{source}: no tensor matched the model: read {len(file_keys)} tensors from the file(s), none "
                     f"of them is one the model expects (the file has e.g. {examples(file_keys)}; the model "
                     f"expects e.g. {examples(model_keys)})")


def load_state(
    model: nn.Module,
    state: dict[str, torch.Tensor],
    source: str,
    expect_complete: bool = False,
    ignore_missing: tuple[str, ...] = (),
) -> LoadReport:
    """Copy matching tensors into ``model`` (in place, keeping the model's dtype) and report the rest.

    Fails (UserError naming ``source``) when nothing matched, when a shape differs, or, with ``expect_complete``,
    when a model tensor other than those under ``ignore_missing`` prefixes/infixes received nothing.
    """
    own = model.state_dict(keep_vars=True)
    targets = match_names(own, state)
    report = LoadReport(source)
    with torch.no_grad():
        for key, value in state.items():
            target = targets[key]
            if target is None:
                report.unexpected.append(key)
                continue
            param = own[target]
            if tuple(param.shape) != tuple(value.shape):
                raise UserError(
                    f"{source}: tensor {key} has shape {list(value.shape)} but the model expects {list(param.shape)}"
                )
            if param.device.type == "meta":
                raise UserError(f"{source}: cannot load {key} into a model built on the meta device")
            param.copy_(value.to(param.dtype))
            report.loaded.append(target)
    if not report.loaded:
        raise nothing_matched(source, list(state), list(own))
    got = set(report.loaded)
    report.missing = [k for k in own if k not in got and not any(p in k for p in ignore_missing)]
    if expect_complete and report.missing:
        raise UserError(f"{source}: incomplete checkpoint; " + report.summary())
    return report
