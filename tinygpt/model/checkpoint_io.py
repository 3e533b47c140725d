"""HF-native model directories: save and load a whole model, or only its trainable tensors plus a base reference.

A directory holds ``config.json`` (``TinyGPTVConfig``: sizes, prompt template, LoRA settings), ``model.safetensors``
and the tokenizer files. A *trainable-only* directory sets ``config.base_model`` to the directory holding everything
else (relative paths are relative to the directory itself), so a stage output stays small; loading follows the chain.
Everything is written to a temporary directory first and renamed into place.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers.initialization import no_init_weights

from ..errors import UserError
from ..io_utils import atomic_dir, check_output_dir, writing
from ..paths import display_path
from ..tokenizer import load_tokenizer
from .moe import upcycle_state
from .phi_config import attention_kind
from .state import load_state
from .vision import resize_position_embedding
from .vlm import TinyGPTVForConditionalGeneration
from .vlm_config import TinyGPTVConfig

log = logging.getLogger(__name__)
WEIGHTS = "model.safetensors"
POSITION_EMBEDDING = "vision_model.embeddings.position_embedding"


def read_config(directory: Path) -> TinyGPTVConfig:
    """The ``TinyGPTVConfig`` of a model directory (UserError when it is not one), without loading weights."""
    path = directory / "config.json"
    if not path.is_file():
        raise UserError(f"{directory}: not a tinygpt model directory (no config.json)")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: not a model config (it holds a {type(raw).__name__}, not a JSON object)")
    if raw.get("model_type") != TinyGPTVConfig.model_type:
        raise UserError(f"{path}: model_type is {raw.get('model_type')!r}, expected {TinyGPTVConfig.model_type!r}")
    for key in TinyGPTVConfig.sub_configs:
        if raw.get(key) is not None and not isinstance(raw[key], dict):
            raise UserError(f"{path}: {key} must be an object, got {raw[key]!r}")
    config = TinyGPTVConfig.from_pretrained(str(directory), local_files_only=True)
    try:  # what building the language model would refuse, deep inside, with a traceback
        config.text_config.validate_shapes()
        attention_kind(config.text_config)
    except ValueError as exc:
        raise UserError(f"{path}: text_config: {exc}") from None
    return config


def _read_weights(directory: Path) -> dict[str, torch.Tensor]:
    path = directory / WEIGHTS
    if not path.is_file():
        raise UserError(f"{directory}: missing {WEIGHTS}")
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types for truncated or foreign files
        raise UserError(f"{path}: not a readable safetensors file ({exc})") from None


def _chain(directory: Path) -> list[Path]:
    """Model directories from the root (whole weights) to ``directory`` (last delta)."""
    chain, seen = [directory], {directory.resolve()}
    config = read_config(directory)
    while config.base_model:
        base = Path(config.base_model)
        base = base if base.is_absolute() else Path(display_path(chain[-1] / base))
        if base.resolve() in seen:
            raise UserError(f"{chain[-1] / 'config.json'}: base_model {config.base_model!r} makes a cycle")
        if not (base / "config.json").is_file():  # e.g. a stage directory copied without the one it builds on
            fix = ("restore it there" if Path(config.base_model).is_absolute()
                   else "copy that directory too, keeping the relative path")
            raise UserError(f"{display_path(chain[-1] / 'config.json')}: base_model {config.base_model!r} ({base}) is "
                            f"not a model directory; {fix}, or fix base_model")
        seen.add(base.resolve())
        chain.append(base)
        config = read_config(base)
    return chain[::-1]


def model_chain(directory: str | os.PathLike) -> list[Path]:
    """The model directories ``directory`` is loaded from: its base_model chain, root first, ``directory`` last."""
    return _chain(Path(directory))


def load_vlm(directory: str | os.PathLike, tokenizer=None, dtype: torch.dtype | None = None):
    """Load a model directory (whole or trainable-only), attach its tokenizer. Offline.

    The model is built without drawing random weights (``no_init_weights``: the full-size model's random init took
    83 s on a 2-core CPU, for tensors the files then overwrite). When the chain leaves a tensor unfilled (one it may
    lack, like LoRA a config names but no file holds), the model is built again with its random init and the files
    read again, so such tensors start exactly as they do in a fresh model."""
    directory = Path(directory)
    if not directory.exists():
        raise UserError(f"{directory}: model directory does not exist")
    config = read_config(directory)
    chain = _chain(directory)
    model, reports = _load_chain(chain, config, draw_random=False)
    filled = {key for report in reports for key in report.loaded}
    if any(key not in filled for key in model.state_dict()):
        del model
        model, reports = _load_chain(chain, config, draw_random=True)
    for i, report in enumerate(reports):
        # a stage directory holds only its trainable tensors: the rest comes from the parts before it, not missing
        log.info(report.summary() if i == 0 else f"{report.source}: loaded {len(report.loaded)} tensors over its base")
    if dtype is not None:
        model.to(dtype)
    model.eval()
    model.tokenizer = tokenizer if tokenizer is not None else _load_tokenizer(directory, config)
    return model


def _load_chain(chain: list[Path], config: TinyGPTVConfig, draw_random: bool):
    """(model, one LoadReport per part): the model built from ``config`` (with its random init only when
    ``draw_random``), then every part of the chain copied in, root first."""
    with contextlib.nullcontext() if draw_random else no_init_weights():
        model = TinyGPTVForConditionalGeneration(config)
    reports = []
    for i, part in enumerate(chain):
        root = i == 0
        state = _fit_image_size(_read_weights(part), config)
        upcycled = upcycle_state(state, config.text_config)  # a dense base under an MoE stage output
        ignore = (".lora_",) if upcycled.keys() == state.keys() else (".lora_", ".mlp.router.")
        report = load_state(model, upcycled, display_path(part / WEIGHTS), expect_complete=root, ignore_missing=ignore)
        if report.unexpected:
            raise UserError(f"{part / WEIGHTS}: tensors the model does not have; " + report.summary())
        reports.append(report)
    return model, reports


def _fit_image_size(state: dict[str, torch.Tensor], config: TinyGPTVConfig) -> dict[str, torch.Tensor]:
    """A base saved at another image size (stage 3 at 224 px under stage 4 at 448 px): resize its ViT position
    embeddings once, bicubic, exactly as building the larger model from it did."""
    pos = state.get(POSITION_EMBEDDING)
    vision = config.vision_config
    if pos is not None and pos.shape[1] != (int(vision.image_size) // int(vision.patch_size)) ** 2 + 1:
        state = dict(state)
        state[POSITION_EMBEDDING] = resize_position_embedding(pos, int(vision.image_size), int(vision.patch_size))
    return state


def _load_tokenizer(directory: Path, config: TinyGPTVConfig):
    if (directory / "tokenizer.json").is_file() or (directory / "tokenizer_config.json").is_file():
        return load_tokenizer(str(directory))
    return load_tokenizer(config.tokenizer_source)


def check_model_out(path: str | os.PathLike, where: str) -> Path:
    """Before any work: ``save_vlm`` can write ``path`` and destroys nothing of the user's there. It replaces the
    directory whole, so it must be missing, empty or a tinygpt model directory (config.json of model_type tinygptv)
    without folders inside; never a file, another model's directory (a Phi-2 or BLIP-2 download given as --out) or a
    directory holding checkpoints."""
    out = check_output_dir(path, where, "model directory")
    if not out.is_dir() or not any(out.iterdir()):
        return out
    replace = "the model replaces the directory whole, so choose a new or empty directory"
    config = out / "config.json"
    if not config.is_file():
        raise UserError(f"{where}: {out} is a non-empty directory that is not a model directory (no config.json); "
                        + replace)
    model_type = _model_type(config)
    if model_type != TinyGPTVConfig.model_type:
        raise UserError(f"{where}: {out} holds another model (config.json model_type {model_type!r}), not one that "
                        f"tinygpt wrote; {replace}")
    folders = sorted(p.name for p in out.iterdir() if p.is_dir())
    if folders:
        raise UserError(f"{where}: {out} holds folders ({', '.join(folders)}) that replacing the model directory "
                        "would delete; move them out or choose a new or empty directory")
    return out


def _model_type(config: Path) -> object:
    try:
        raw = json.loads(config.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return raw.get("model_type") if isinstance(raw, dict) else None


def save_vlm(model, directory: str | os.PathLike, trainable_only: bool = False, base_model: str | None = None,
             extra_files: dict[str, str] | None = None) -> Path:
    """Write a model directory atomically. ``trainable_only`` keeps only tensors with ``requires_grad``;
    ``extra_files`` (name -> text) are written into the same directory, in the same rename. A write failure raises
    one ``UserError`` naming the directory, and leaves what was there before intact."""
    directory = Path(directory)
    if trainable_only and not base_model:
        raise UserError("save: a trainable-only directory needs base_model (the directory with the other weights)")
    config = TinyGPTVConfig.from_dict(model.config.to_dict())
    config.base_model = _relative_to(base_model, directory) if trainable_only else None
    if trainable_only:
        state = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    else:
        state = {n: t.detach().cpu().contiguous() for n, t in model.state_dict().items()}
    with writing(directory, "the model directory"), atomic_dir(directory) as tmp:
        config.save_pretrained(str(tmp))
        save_file(state, str(tmp / WEIGHTS), metadata={"format": "pt"})
        if model.tokenizer is not None:
            model.tokenizer.save_pretrained(str(tmp))
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")
    return directory


def _relative_to(base: str, directory: Path) -> str:
    """The base as stored in config.json: relative to the new directory when it lies beside it or below its parent
    (``../stage1``), so a tree of stage outputs can be moved whole; absolute otherwise (a base in the cache or another
    tree: a relative ``../../..`` path would break as soon as the outputs move)."""
    base_path = Path(base).resolve()
    try:
        relative = os.path.relpath(base_path, directory.resolve())
    except ValueError:  # another drive on Windows
        return str(base_path)
    return relative if Path(relative).parts[:2].count("..") <= 1 else str(base_path)
