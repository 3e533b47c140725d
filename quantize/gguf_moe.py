"""MoE layers (model.moe, tinygpt.model.moe) in the LLM GGUF file: the export's stacking and the runtimes' reading.

File layout (llama.cpp's convention, shapes in ggml order; names and keys in quantize.gguf_names):
  blk.N.ffn_gate_inp.weight   [n_embd, n_expert]          the router (no bias); F32, F16 in an f16 export
  blk.N.ffn_up_exps.weight    [n_embd, n_ff, n_expert]    expert e's fc1 weight is slice e; in --qtype
  blk.N.ffn_up_exps.bias      [n_ff, n_expert]            F32
  blk.N.ffn_down_exps.weight  [n_ff, n_embd, n_expert]    expert e's fc2 weight; in --qtype
  blk.N.ffn_down_exps.bias    [n_embd, n_expert]          F32
  phi2.expert_count, phi2.expert_used_count (top-k), tinygptv.moe_layers (array of int)
Layers not in moe_layers keep the dense blk.N.ffn_up / ffn_down. A dense model's file has none of these.

The runtimes (quantize.ggml_moe, quantize.torch_llm) compute what MoEFeedForward computes at inference (dropless):
gates = softmax(router logits) over the top-k experts, renormalised to sum 1; out = sum_k gate_k * expert_k(h).
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

from tinygpt.errors import UserError

from . import gguf_names as names


# ------------------------------------------------------------------------------------------------ export
def check_moe_config(moe: Mapping[str, Any] | None, num_layers: int, where: str) -> None:
    """UserError (naming `where`, e.g. the config.json, and the field) for MoE settings the runtimes cannot run."""
    if moe is None:
        return
    field = f"{where}: text_config.moe"
    experts, top_k, layers = moe.get("num_experts"), moe.get("top_k"), moe.get("layers")
    if not isinstance(experts, int) or experts < 1:
        raise UserError(f"{field}.num_experts is {experts!r}, expected a positive integer")
    if not isinstance(top_k, int) or not 1 <= top_k <= experts:
        raise UserError(f"{field}.top_k is {top_k!r}, expected 1..num_experts ({experts})")
    if not isinstance(layers, list) or not layers or any(not isinstance(i, int) or not 0 <= i < num_layers
                                                         for i in layers) or len(set(layers)) != len(layers):
        raise UserError(f"{field}.layers is {layers!r}, expected a non-empty list of distinct layer indices "
                        f"0..{num_layers - 1}")


def expert_groups(torch_names: Sequence[str], moe_layers: Sequence[int], num_experts: int,
                  where: str) -> dict[str, list[str]]:
    """The experts' state-dict names grouped by the stacked GGUF tensor they go into: {gguf name: [torch name of
    expert 0, 1, ...]}. UserError when a layer's experts are not exactly 0..num_experts-1 or sit in a dense layer."""
    groups: dict[str, dict[int, str]] = {}
    for name in torch_names:
        found = names.expert_slice(name)
        if found is not None:
            groups.setdefault(found[0], {})[found[1]] = name
    for gguf_name, by_index in groups.items():
        layer = int(gguf_name.split(".")[1])
        if layer not in moe_layers:
            raise UserError(f"{where}: layer {layer} has expert weights but is not in text_config.moe.layers "
                            f"{list(moe_layers)}")
        if sorted(by_index) != list(range(num_experts)):
            raise UserError(f"{where}: {gguf_name} would stack experts {sorted(by_index)}, but text_config.moe."
                            f"num_experts is {num_experts}")
    return {g: [by_index[e] for e in range(num_experts)] for g, by_index in groups.items()}


# ------------------------------------------------------------------------------------------------ runtime
def read_moe(llm: Any, n_layers: int) -> tuple[tuple[int, ...], int, int]:
    """(MoE layers, experts per layer, experts per token) of an opened LLM file; ((), 0, 0) for a dense file."""
    layers = llm.metadata.get(names.MOE_LAYERS)
    if layers is None:
        stray = [n for n in llm.tensors if n.endswith(names.MOE_FFN_TENSORS)]
        if stray:
            raise UserError(f"{llm.path}: tensor {stray[0]!r} is there but metadata key {names.MOE_LAYERS!r} is "
                            "missing")
        return (), 0, 0
    layers = tuple(int(i) for i in layers) if isinstance(layers, list) else layers
    if not isinstance(layers, tuple) or not layers or len(set(layers)) != len(layers) or \
            not all(0 <= i < n_layers for i in layers):
        raise UserError(f"{llm.path}: metadata key {names.MOE_LAYERS!r} is {layers!r}, expected distinct layer "
                        f"indices 0..{n_layers - 1}")
    n_expert, n_used = int(llm.require(names.EXPERT_COUNT)), int(llm.require(names.EXPERT_USED_COUNT))
    if n_expert < 1 or not 1 <= n_used <= n_expert:
        raise UserError(f"{llm.path}: metadata keys {names.EXPERT_COUNT!r} = {n_expert} and "
                        f"{names.EXPERT_USED_COUNT!r} = {n_used} do not describe a top-k of experts")
    return tuple(sorted(layers)), n_expert, n_used


def ffn_shapes(prefix: str, hidden: int, ffn: int, n_expert: int, routed: bool) -> dict[str, tuple[int, ...]]:
    """numpy-order shapes of one layer's FFN tensors (prefix 'blk.N.'): dense or routed."""
    if not routed:
        return {prefix + "ffn_up.weight": (ffn, hidden), prefix + "ffn_up.bias": (ffn,),
                prefix + "ffn_down.weight": (hidden, ffn), prefix + "ffn_down.bias": (hidden,)}
    e = n_expert
    return {prefix + "ffn_gate_inp.weight": (e, hidden), prefix + "ffn_up_exps.weight": (e, ffn, hidden),
            prefix + "ffn_up_exps.bias": (e, ffn), prefix + "ffn_down_exps.weight": (e, hidden, ffn),
            prefix + "ffn_down_exps.bias": (e, hidden)}
