"""Importers of external checkpoints into ``TinyGPTVForConditionalGeneration`` (or a bare ``TinyGPTPhiForCausalLM``).

Each ``load_*`` reads its file(s) lazily (one tensor in memory at a time), renames/fuses tensors to our names, resizes
the ViT position embedding when the model's image size differs from the file's (224 -> 448 px), copies them with
``tinygpt.model.state.load_state`` and returns its ``LoadReport``. A load fails (``UserError`` naming the file) when
nothing matched or a converted tensor has no place in the model (both checked from the names, before any tensor is
read), when two file tensors convert to the same model tensor (two layouts or prefixes), or when a shape differs, a
tensor is not floating point (a quantized file) or a value would become inf in the model's dtype; what the file did not
provide within the part it is responsible for is reported as missing (with ``required=True``, as the build uses it for
Phi-2 and the vision sources, that is an error unless the tensor may start fresh: TinyGPT-V's extra norms, LoRA, the
projections; with ``required="all"``, for a file whose whole content is its part, a released TinyGPT-V stage or
MiniGPT-4's projection, it is an error for every tensor), and tensors the importer does not use are reported as skipped.
``load_released`` and ``load_minigpt4_proj`` load with ``required="all"``: a file lacking part of what it must hold is
an error, never a model with that part left fresh (random) or from the base model.

    from tinygpt.weights import load_phi2, load_blip2, load_lavis, load_released, load_minigpt4_proj
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable

import torch
from tqdm import tqdm

from ..errors import UserError
from ..model.lora import has_lora, inject_lora, lora_settings
from ..model.state import LoadReport, load_state, match_names, nothing_matched
from ..model.trainable import is_trainable
from ..model.vision import resize_position_embedding
from .blip2_hf import open_blip2, read_blip2
from .lavis import eva_tensors, lavis_qformer_tensors
from .minigpt4 import minigpt4_proj_tensors
from .phi2 import open_phi2, read_phi2
from .released import released_lora_rank, released_tensors
from .torch_file import TensorSource, read_checkpoint

log = logging.getLogger("tinygpt.weights")
POSITIONS = "vision_model.embeddings.position_embedding"

__all__ = [
    "TensorSource", "check_source", "load_blip2", "load_lavis", "load_minigpt4_proj", "load_phi2", "load_released",
    "load_weights", "read_checkpoint",
]


def load_weights(model, tensors: TensorSource, scope: Callable[[str], bool] | None = None,
                 progress: bool = False, required: bool | str = False) -> LoadReport:
    """Copy converted ``tensors`` into ``model``; log notes, skipped and (within ``scope``) missing keys.

    Before any tensor is read, ``check_source``: a source with no tensor for the model, or with tensors that have no
    place in it, is an error; with ``required``, so is one that lacks a tensor within ``scope`` that cannot start
    fresh, and with ``required="all"`` one that lacks any tensor within ``scope``.
    """
    targets = check_source(model, tensors, scope, required)
    tensors = _checked_values(model, _resize_positions(model, tensors), targets)
    bar = _progress_bar(tensors) if progress else None
    try:
        report = load_state(model, _ticking(tensors, bar) if bar else tensors, tensors.origin)
    finally:
        if bar is not None and not bar.disable:
            bar.leave = bar.n < bar.total  # an error mid-file: keep the bar's line, so the error starts a new line
            bar.close()
    report.missing = [k for k in report.missing if scope is None or scope(k)]
    report.unexpected = list(tensors.skipped)  # reported as "unexpected": present in the file, not used
    for note in tensors.notes:
        log.info("%s: %s", tensors.origin, note)
    log.info(_summary(report))
    return report


def check_source(model, tensors: TensorSource, scope: Callable[[str], bool] | None = None,
                 required: bool | str = False) -> dict[str, str | None]:
    """The model tensor each of ``tensors`` fills, checked from the names alone (nothing is read): see
    ``load_weights``. ``required``: False, True (every tensor within ``scope`` but those that may start fresh) or
    "all" (every tensor within ``scope``)."""
    if required not in (False, True, "all"):
        raise ValueError(f"required={required!r}: expected False, True or 'all'")
    own = list(model.state_dict())
    targets = match_names(own, tensors)
    wanted = [k for k in own if scope is None or scope(k)]
    if not any(targets.values()):
        raise nothing_matched(tensors.origin, tensors.file_keys, wanted)
    unexpected = [k for k, target in targets.items() if target is None]
    if unexpected:
        raise UserError(f"{tensors.origin}: {len(unexpected)} tensors have no place in this model "
                        f"({', '.join(unexpected[:3])}); was the model built with the same options "
                        "(extra norms, LoRA, depth)?")
    provided = set(targets.values())
    gaps = [k for k in wanted if k not in provided and (required == "all" or not starts_fresh(k))]
    if required and gaps:
        why = ("a partial checkpoint, or one of another kind" if required == "all"
               else "or a file for a smaller model")
        first = ", ".join(gaps[:3]) + (" ..." if len(gaps) > 3 else "")
        raise UserError(f"{tensors.origin}: lacks {len(gaps)} tensor(s) the model needs, first {first} (renamed or "
                        f"missing in the file{': ' if required == 'all' else ', '}{why})")
    return targets


def _summary(report: LoadReport) -> str:
    """The report's line, tensors that start fresh by design (extra norms, LoRA, projections) named apart."""
    fresh = [k for k in report.missing if starts_fresh(k)]
    line = LoadReport(report.source, report.loaded, [k for k in report.missing if k not in fresh],
                      report.unexpected).summary().replace(" unexpected [", " skipped [")
    if fresh:
        kinds = sorted({_FRESH_KINDS[_fresh_kind(k)] for k in fresh})
        line += f"; {len(fresh)} not in this source by design ({', '.join(kinds)}: fresh unless another file has them)"
    return line


_EXTRA_NORM = re.compile(r"model\.layers\.\d+\.(self_attn\.[qk]_layernorm\.(weight|bias)|post_layernorm\.weight)$")
_FRESH_KINDS = {"norm": "TinyGPT-V's q/k LayerNorms and post-attention RMSNorm", "lora": "LoRA",
                "proj": "the projections"}


def _fresh_kind(name: str) -> str | None:
    if _EXTRA_NORM.search(name):
        return "norm"
    if ".lora_A." in name or ".lora_B." in name:
        return "lora"
    if name.startswith(("proj1.", "proj2.")):
        return "proj"
    return None


def starts_fresh(name: str) -> bool:
    """Whether the model tensor ``name`` may start fresh when no file provides it (extra norms, LoRA, projections)."""
    return _fresh_kind(name) is not None


def is_extra_norm(name: str) -> bool:
    """TinyGPT-V's q/k LayerNorms and post-attention RMSNorm (weight 1, bias 0 when fresh)."""
    return _fresh_kind(name) == "norm"


def _resize_positions(model, tensors: TensorSource) -> TensorSource:
    if POSITIONS not in tensors or not hasattr(model, "vision_model"):
        return tensors
    pos = tensors[POSITIONS]
    want = model.vision_model.embeddings.position_embedding.shape
    if tuple(pos.shape) == tuple(want) or pos.ndim != len(want) or pos.shape[-1] != want[-1]:
        return tensors  # same grid, or a width or rank mismatch that load_state reports
    vision = model.config.vision_config
    try:
        resized = resize_position_embedding(pos, int(vision.image_size), int(vision.patch_size))
    except UserError as exc:
        raise UserError(f"{tensors.origin}: tensor {POSITIONS} (shape {list(pos.shape)}): {exc}") from None
    note = f"resized the ViT position embedding {pos.shape[1]} -> {resized.shape[1]} positions (bicubic)"
    return tensors.derived({**tensors.loaders, POSITIONS: lambda: resized}, notes=[note])


def _checked_values(model, tensors: TensorSource, targets: dict[str, str | None]) -> TensorSource:
    """Each tensor checked as it is read, cast to its model tensor's dtype: an integer / bool / complex tensor (a
    quantized or damaged file) is refused instead of being cast to a meaningless float, and so is a finite value that
    the model's narrower dtype would turn into inf (fp32 / bf16 weights beyond fp16's range)."""
    own = model.state_dict(keep_vars=True)

    def checked(name, load):
        def run():
            value, param = load(), own.get(targets.get(name))
            if param is None or not param.is_floating_point() or value.dtype == param.dtype:  # None: not loaded
                return value
            if not value.is_floating_point():
                raise UserError(f"{tensors.origin}: tensor {name} is {str(value.dtype).removeprefix('torch.')}, "
                                "not floating point (a quantized or damaged checkpoint?); expected fp32/fp16/bf16 "
                                "weights")
            cast = value.to(param.dtype)
            narrower = torch.finfo(param.dtype).max < torch.finfo(value.dtype).max
            if narrower and not torch.isfinite(cast).all() and torch.isfinite(value).all():
                kind = str(param.dtype).removeprefix("torch.")
                raise UserError(f"{tensors.origin}: tensor {name} holds values up to {value.abs().max().item():.4g}, "
                                f"beyond the range of {kind} (they would become inf); load it in bf16 or fp32 "
                                "(--dtype)")
            return cast
        return run

    return tensors.derived({k: checked(k, f) for k, f in tensors.loaders.items()})


def _progress_bar(tensors: TensorSource) -> tqdm:
    """A bar on a terminal only (``disable=None``): a redirected stderr gets no carriage-return lines."""
    return tqdm(total=len(tensors), desc=f"loading {tensors.origin.rsplit('/', 1)[-1]}", unit="tensor",
                leave=False, mininterval=1.0, disable=None)


def _ticking(tensors: TensorSource, bar: tqdm) -> TensorSource:
    def ticking(load):
        def run():
            value = load()
            bar.update(1)
            return value
        return run

    return tensors.derived({k: ticking(f) for k, f in tensors.loaders.items()})


def _is_vlm(model) -> bool:
    return hasattr(model, "language_model") and hasattr(model, "vision_model")


def load_phi2(model, source: str, progress: bool = False) -> LoadReport:
    """Phi-2 weights (hub id such as ``microsoft/phi-2`` or a directory) into the language model."""
    directory, _ = open_phi2(source)
    llm = model.language_model if _is_vlm(model) else model
    tensors = read_phi2(directory, llm.config.num_attention_heads)
    if _is_vlm(model):
        tensors = tensors.with_prefix("language_model.")
        return load_weights(model, tensors, lambda k: k.startswith("language_model."), progress)
    return load_weights(model, tensors, None, progress)


def load_blip2(model, source: str, progress: bool = False) -> LoadReport:
    """ViT, ln_vision, Q-Former and query tokens from a Hugging Face BLIP-2 (hub id or directory)."""
    directory, _ = open_blip2(source)
    return load_weights(model, read_blip2(directory), vision_scope, progress)


def load_lavis(model, eva: str | None = None, qformer: str | None = None, progress: bool = False) -> list[LoadReport]:
    """LAVIS ``eva_vit_g.pth`` (ViT) and/or ``blip2_pretrained_flant5xxl.pth`` (Q-Former, queries, ln_vision)."""
    reports = []
    if eva is not None:
        depth = model.config.vision_config.num_hidden_layers
        reports.append(load_weights(model, eva_tensors(read_checkpoint(eva), depth), eva_scope, progress))
    if qformer is not None:
        tensors = lavis_qformer_tensors(read_checkpoint(qformer))
        reports.append(load_weights(model, tensors, lavis_qformer_scope, progress))
    return reports


def load_released(model, path: str, progress: bool = False) -> LoadReport:
    """A released ``TinyGPT-V_for_Stage{1..4}.pth``; injects LoRA (rank from the file) when the model has none."""
    raw = read_checkpoint(path)
    rank = released_lora_rank(raw)
    if rank is not None and not has_lora(model.language_model):
        settings = lora_settings({"r": rank})
        inject_lora(model.language_model, settings)
        model.train(model.training)  # the new LoRA dropouts follow the model's train/eval mode
        model.config.lora = settings
        log.info("%s: added LoRA r=%d alpha=%s to the model for this stage-2..4 checkpoint", path, rank,
                 settings["alpha"])
    text = model.config.text_config
    tensors = released_tensors(raw, text.num_attention_heads, model.config.vision_config.num_hidden_layers)
    return load_weights(model, tensors, released_scope(rank), progress, required="all")


def released_scope(rank: int | None) -> Callable[[str], bool]:
    """What a released file must hold, all of it: the trainable set of its stage (stage 1: the projections and the
    norm weights; a file with LoRA, stages 2-4: also every LoRA A/B)."""
    trainable_set = "lora" if rank is not None else "stage1"
    return lambda k: is_trainable(k, trainable_set)


def load_minigpt4_proj(model, path: str) -> LoadReport:
    """``llama_proj`` of a MiniGPT-4 (Vicuna-7B) checkpoint as ``proj1`` (weight and bias, both required)."""
    return load_weights(model, minigpt4_proj_tensors(read_checkpoint(path)), proj1_scope, required="all")


def proj1_scope(name: str) -> bool:
    """What MiniGPT-4's ``llama_proj`` provides: ``proj1``."""
    return name.startswith("proj1.")


def vision_scope(name: str) -> bool:
    """What a BLIP-2 model provides: the ViT (with ln_vision), the Q-Former and the query tokens."""
    return name.startswith(("vision_model.", "qformer.", "query_tokens"))


def eva_scope(name: str) -> bool:
    """What LAVIS ``eva_vit_g.pth`` provides: the ViT without ln_vision."""
    return name.startswith("vision_model.") and ".post_layernorm." not in name


def lavis_qformer_scope(name: str) -> bool:
    """What LAVIS ``blip2_pretrained_*.pth`` provides: the Q-Former, the query tokens and ln_vision."""
    return name.startswith(("qformer.", "query_tokens", "vision_model.post_layernorm."))
