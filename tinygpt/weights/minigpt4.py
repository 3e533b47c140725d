"""MiniGPT-4's projection as TinyGPT-V's first projection (the paper's "Linear 1 (MiniGPT-4)").

MiniGPT-4's Vicuna-7B checkpoint (``pretrained_minigpt4_7b.pth``) holds ``llama_proj.{weight [4096, 768], bias}``;
that is exactly ``proj1`` (Linear 768 -> 4096). Every other tensor in the file is skipped.
"""

from __future__ import annotations

from ..errors import UserError
from .torch_file import TensorSource

_NAMES = {"llama_proj.weight": "proj1.weight", "llama_proj.bias": "proj1.bias"}


def minigpt4_proj_tensors(raw: TensorSource) -> TensorSource:
    loaders = {_NAMES[k]: (lambda k=k: raw[k]) for k in raw if k in _NAMES}
    if not loaders:
        raise UserError(f"{raw.origin}: no llama_proj.weight / llama_proj.bias in it (the file has e.g. "
                        f"{', '.join(list(raw)[:2])}); expected a MiniGPT-4 checkpoint (pretrained_minigpt4_7b.pth)")
    skipped = [k for k in raw if k not in _NAMES]
    return raw.derived(loaders, skipped=skipped, notes=["proj1 initialised from MiniGPT-4's llama_proj"])
