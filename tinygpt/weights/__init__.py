"""Importers of external checkpoints into ``TinyGPTVForConditionalGeneration`` (or a bare ``TinyGPTPhiForCausalLM``).

Each ``load_*`` reads its file(s) lazily (one tensor in memory at a time), renames/fuses tensors to our names, resizes
the ViT position embedding when the model's image size differs from the file's (224 -> 448 px), copies them with
``tinygpt.model.state.load_state`` and returns its ``LoadReport``. A load fails (``UserError`` naming the file) when
nothing matched, a shape differs, or a converted tensor has no place in the model; what the file did not provide within
the part it is responsible for is reported as missing, and tensors the importer does not use are reported as skipped.

    from tinygpt.weights import load_phi2, load_blip2, load_lavis, load_released, load_minigpt4_proj
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from tqdm import tqdm

from ..errors import UserError
from ..model.lora import has_lora, inject_lora, lora_settings
from ..model.state import LoadReport, load_state
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
    "TensorSource", "load_blip2", "load_lavis", "load_minigpt4_proj", "load_phi2", "load_released",
    "load_weights", "read_checkpoint",
]


def load_weights(model, tensors: TensorSource, scope: Callable[[str], bool] | None = None,
                 progress: bool = False) -> LoadReport:
    """Copy converted ``tensors`` into ``model``; log notes, skipped, unexpected and (within ``scope``) missing keys."""
    tensors = _resize_positions(model, tensors)
    if progress:
        tensors = _with_progress(tensors)
    report = load_state(model, tensors, tensors.origin)
    if report.unexpected:
        raise UserError(f"{tensors.origin}: {len(report.unexpected)} tensors have no place in this model "
                        f"({', '.join(report.unexpected[:3])}); was the model built with the same options "
                        "(extra norms, LoRA, depth)?")
    report.missing = [k for k in report.missing if scope is None or scope(k)]
    report.unexpected = list(tensors.skipped)  # reported as "unexpected": present in the file, not used
    for note in tensors.notes:
        log.info("%s: %s", tensors.origin, note)
    log.info(report.summary().replace(" unexpected [", " skipped ["))
    return report


def _resize_positions(model, tensors: TensorSource) -> TensorSource:
    if POSITIONS not in tensors or not hasattr(model, "vision_model"):
        return tensors
    pos = tensors[POSITIONS]
    want = model.vision_model.embeddings.position_embedding.shape
    if tuple(pos.shape) == tuple(want) or pos.shape[-1] != want[-1]:
        return tensors  # same grid, or a width mismatch that load_state reports
    vision = model.config.vision_config
    resized = resize_position_embedding(pos, int(vision.image_size), int(vision.patch_size))
    note = f"resized the ViT position embedding {pos.shape[1]} -> {resized.shape[1]} positions (bicubic)"
    return tensors.derived({**tensors.loaders, POSITIONS: lambda: resized}, notes=[note])


def _with_progress(tensors: TensorSource) -> TensorSource:
    bar = tqdm(total=len(tensors), desc=f"loading {tensors.origin.rsplit('/', 1)[-1]}", unit="tensor",
               leave=False, mininterval=1.0)

    def ticking(load):
        def run():
            value = load()
            bar.update(1)
            if bar.n == bar.total:
                bar.close()
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
        tensors = eva_tensors(read_checkpoint(eva), depth)
        scope = lambda k: k.startswith("vision_model.") and ".post_layernorm." not in k  # noqa: E731
        reports.append(load_weights(model, tensors, scope, progress))
    if qformer is not None:
        scope = lambda k: k.startswith(("qformer.", "query_tokens", "vision_model.post_layernorm."))  # noqa: E731
        reports.append(load_weights(model, lavis_qformer_tensors(read_checkpoint(qformer)), scope, progress))
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
    trainable_set = "lora" if rank is not None else "stage1"
    return load_weights(model, tensors, lambda k: is_trainable(k, trainable_set), progress)


def load_minigpt4_proj(model, path: str) -> LoadReport:
    """``llama_proj`` of a MiniGPT-4 (Vicuna-7B) checkpoint as ``proj1``."""
    return load_weights(model, minigpt4_proj_tensors(read_checkpoint(path)), lambda k: k.startswith("proj1."))


def vision_scope(name: str) -> bool:
    return name.startswith(("vision_model.", "qformer.", "query_tokens"))
