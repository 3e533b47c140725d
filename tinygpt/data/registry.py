"""The one place configs name a dataset kind: ``build_dataset(kind, image_size=..., seed=..., **params)``.

Each kind is a loader class plus the params it fixes (e.g. ``invrefcocog`` = RefCOCO with dataset "refcocog" and
``inverse=True``). A kind's params are the loader's constructor arguments minus the shared ones (``image_size``,
``seed``, ``bad_records``) and the fixed ones; an unknown kind or param, or a missing required one, is a UserError
naming it and the closest valid name. Every kind accepts ``name`` (the label in samples and per-dataset counts;
default: the kind). :func:`check_params` is the one validator of a kind's params (``build_dataset`` and the stage's
config check both call it); its :class:`DatasetSpecError` says which kind of problem, so a caller can name the YAML key.
:func:`missing_input` names a file a kind builds from its params (RefCOCO's ``refs(unc).p`` under ``ann_root``, ...)
that is missing, for the same check; it only tests existence and readability.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Optional

from tinygpt.data.bad_records import BadRecordPolicy
from tinygpt.data.formats.captions import COCOCaption, TextCaps
from tinygpt.data.formats.cc_sbu_align import CCSBUAlign
from tinygpt.data.formats.flickr import FlickrGrounding
from tinygpt.data.formats.generic_jsonl import GenericJsonl
from tinygpt.data.formats.llava import LlavaDataset
from tinygpt.data.formats.qformer_features import MANIFEST, FeatureDataset
from tinygpt.data.formats.refcoco import RefCOCO, refcoco_files
from tinygpt.data.formats.unnatural import UnnaturalInstructions
from tinygpt.data.formats.visual_genome import IMAGES_FILE, REGIONS_FILE, VisualGenomeRefer
from tinygpt.data.formats.vqa import VQADataset
from tinygpt.data.formats.webdataset_pairs import WebDatasetPairs
from tinygpt.errors import UserError, did_you_mean

SHARED_PARAMS = ("image_size", "seed", "bad_records")

Need = tuple[str, Path, str]
"""An input a loader builds from its params: (the param it comes from, its path, "file" or "folder")."""


def _refcoco_needs(params: dict) -> list[Need]:
    return [("ann_root", path, "file") for path in refcoco_files(params["ann_root"], params["dataset"],
                                                                 params["split_by"])]


def _cc_sbu_align_needs(params: dict) -> list[Need]:
    root = Path(params["root"])
    return [("root", root / params["ann_file"], "file"), ("root", root / params["image_dir"], "folder")]


def _refvg_needs(params: dict) -> list[Need]:
    return [("root", Path(params["root"]) / name, "file") for name in (REGIONS_FILE, IMAGES_FILE)]


def _features_needs(params: dict) -> list[Need]:
    return [("root", Path(params["root"]) / MANIFEST, "file")]


@dataclass(frozen=True)
class Kind:
    loader: Callable
    fixed: dict = field(default_factory=dict)
    summary: str = ""
    needs: Optional[Callable[[dict], list[Need]]] = None  # files and folders built from the params, for checks

    def signature(self) -> dict[str, inspect.Parameter]:
        params = inspect.signature(self.loader).parameters
        return {n: p for n, p in params.items() if n not in SHARED_PARAMS and n not in self.fixed and n != "self"}


def _refcoco(dataset: str, inverse: bool) -> Kind:
    task = "identify (box -> sentence)" if inverse else "refer (sentence -> box)"
    return Kind(RefCOCO, {"dataset": dataset, "inverse": inverse}, f"{dataset} {task}", _refcoco_needs)


KINDS: dict[str, Kind] = {
    "webdataset_pairs": Kind(WebDatasetPairs, summary="img2dataset tar shards, jpg + json caption (stages 1-2)"),
    "cc_sbu_align": Kind(CCSBUAlign, summary="filter_cap.json + image/ (stage 3)", needs=_cc_sbu_align_needs),
    "llava_detail": Kind(LlavaDataset, {"multi_turn": False}, "LLaVA detail_23k.json, first turn"),
    "llava_reason": Kind(LlavaDataset, {"multi_turn": False}, "LLaVA complex_reasoning_77k.json, first turn"),
    "llava_conversation": Kind(LlavaDataset, {"multi_turn": True}, "LLaVA conversation_58k.json, all turns"),
    "multitask_conversation": Kind(LlavaDataset, {"multi_turn": True}, "MiniGPT-v2 multitask conversation"),
    "refcoco": _refcoco("refcoco", False),
    "refcocop": _refcoco("refcoco+", False),
    "refcocog": _refcoco("refcocog", False),
    "invrefcoco": _refcoco("refcoco", True),
    "invrefcocop": _refcoco("refcoco+", True),
    "invrefcocog": _refcoco("refcocog", True),
    "refvg": Kind(VisualGenomeRefer, summary="Visual Genome region descriptions as [refer]", needs=_refvg_needs),
    "flickr_grounded_caption": Kind(FlickrGrounding, {"task": "grounded_caption"}, "groundedcaption.json"),
    "flickr_caption_to_phrase": Kind(FlickrGrounding, {"task": "caption_to_phrase"}, "captiontobbox.json"),
    "flickr_object_to_phrase": Kind(FlickrGrounding, {"task": "object_to_phrase"}, "phrasetobbox.json"),
    "textcaps_caption": Kind(TextCaps, summary="TextCaps_0.1_train.json as [caption]"),
    "coco_caption": Kind(COCOCaption, summary="LAVIS coco_karpathy_train.json as [caption]"),
    "coco_vqa": Kind(VQADataset, {"variant": "coco_vqa"}, "LAVIS vqa_train.json / vqa_val.json"),
    "ok_vqa": Kind(VQADataset, {"variant": "ok_vqa"}, "LAVIS okvqa_train.json"),
    "aok_vqa": Kind(VQADataset, {"variant": "aok_vqa"}, "aokvqa_v1p0_train.json"),
    "gqa": Kind(VQADataset, {"variant": "gqa"}, "LAVIS train_balanced_questions.json"),
    "unnatural_instruction": Kind(UnnaturalInstructions, summary="text only, JSON list or JSONL"),
    "generic_jsonl": Kind(GenericJsonl, summary="tinygpt JSONL: images + multi-turn conversations"),
    "qformer_features": Kind(FeatureDataset, summary="ViT + Q-Former outputs cached by tinygpt.train.features",
                             needs=_features_needs),
}


class DatasetSpecError(UserError):
    """A dataset spec :func:`check_params` rejects. ``problem``: "kind" (unknown kind), "unknown" (unknown param),
    "missing" (required param absent) or "value" (wrong type); ``name``: the kind or param at fault; ``valid``: the
    known kinds, or the kind's params."""

    def __init__(self, message: str, problem: str, name: str, valid: list[str]):
        super().__init__(message)
        self.problem, self.name, self.valid = problem, name, valid


def _closest(name: str, options) -> str:
    return did_you_mean(name, options, cutoff=0.5, form="; did you mean {!r}?")


def kind_params(kind: str) -> dict[str, Any]:
    """Param name -> default (``inspect.Parameter.empty`` when required) of a kind, for docs and config checks."""
    if kind not in KINDS:
        raise DatasetSpecError(f"unknown dataset kind {kind!r}{_closest(kind, KINDS)} (known: {', '.join(KINDS)})",
                               "kind", kind, list(KINDS))
    params = {name: p.default for name, p in KINDS[kind].signature().items()}
    params["name"] = kind
    return params


def _policy(bad_records: Any) -> Optional[BadRecordPolicy]:
    if bad_records is None or isinstance(bad_records, BadRecordPolicy):
        return bad_records
    if isinstance(bad_records, dict):
        valid = [f.name for f in fields(BadRecordPolicy)]
        for key in bad_records:
            if key not in valid:
                raise UserError(f"bad_records: unknown field {key!r}{_closest(key, valid)} (valid: {', '.join(valid)})")
        return BadRecordPolicy(**bad_records)
    raise UserError(f"bad_records must be a mapping or BadRecordPolicy, got {type(bad_records).__name__}")


def check_params(kind: str, params: dict[str, Any]) -> dict[str, Any]:
    """The kind is known and ``params`` are its params: none unknown, none required missing, booleans and integers
    of the right type, strings where the loader takes strings (in that order). Returns :func:`kind_params`; raises
    :class:`DatasetSpecError`."""
    accepted = kind_params(kind)
    annotations = {n: str(p.annotation) for n, p in KINDS[kind].signature().items()}
    valid = list(accepted)
    for name in params:
        if name not in accepted:
            raise DatasetSpecError(f"dataset kind {kind!r}: unknown param {name!r}{_closest(name, accepted)} "
                                   f"(valid: {', '.join(accepted)})", "unknown", name, valid)
    missing = [name for name, default in accepted.items() if default is inspect.Parameter.empty and
               params.get(name) is None]
    if missing:
        raise DatasetSpecError(f"dataset kind {kind!r}: missing param {missing[0]!r} (required: "
                               f"{', '.join(n for n, d in accepted.items() if d is inspect.Parameter.empty)})",
                               "missing", missing[0], valid)
    for name, value in params.items():
        default = accepted[name]
        optional_bool = annotations[name] == "Optional[bool]" and value is not None  # None: the loader's own rule
        if (isinstance(default, bool) or optional_bool) and not isinstance(value, bool):
            raise DatasetSpecError(f"dataset kind {kind!r}: param {name!r} must be true or false, got {value!r}",
                                   "value", name, valid)
        if isinstance(default, int) and not isinstance(default, bool) and (
                not isinstance(value, int) or isinstance(value, bool)):
            raise DatasetSpecError(f"dataset kind {kind!r}: param {name!r} must be an integer, got {value!r}",
                                   "value", name, valid)
        _check_text_param(kind, name, value, annotations[name], valid)
    return accepted


def _check_text_param(kind: str, name: str, value: Any, annotation: str, valid: list[str]) -> None:
    """A param annotated str (a path, a name, a template) holds a string; ``str | list[str]`` one or a list of them."""
    if value is None and annotation.startswith("Optional["):
        return
    if annotation in ("str", "Optional[str]") and not isinstance(value, str):
        raise DatasetSpecError(f"dataset kind {kind!r}: param {name!r} must be a string, got {value!r}",
                               "value", name, valid)
    if annotation == "str | list[str]" and not (
            isinstance(value, str) or (isinstance(value, list) and value and all(isinstance(v, str) for v in value))):
        raise DatasetSpecError(f"dataset kind {kind!r}: param {name!r} must be a string or a non-empty list of "
                               f"strings, got {value!r}", "value", name, valid)


def missing_input(kind: str, params: dict[str, Any]) -> Optional[tuple[str, Path, str]]:
    """(param, path, what is wrong) of the first file or folder that ``kind`` builds from ``params`` (already passed
    by :func:`check_params`) and that does not exist or cannot be read; None when all are there. Nothing is parsed."""
    spec = KINDS[kind]
    if spec.needs is None:
        return None
    merged = {**kind_params(kind), **params, **spec.fixed}
    for param, path, what in spec.needs(merged):
        if not path.exists():
            return param, path, "does not exist"
        if (what == "file" and not path.is_file()) or (what == "folder" and not path.is_dir()):
            return param, path, f"is not a {what}"
        if not os.access(path, os.R_OK | (os.X_OK if what == "folder" else 0)):
            return param, path, "cannot be read (permission denied)"
    return None


def build_dataset(kind: str, *, image_size: int, seed: int, bad_records: BadRecordPolicy | dict | None = None,
                  **params: Any):
    """Build the dataset of ``kind`` from its params (paths etc.); see ``KINDS`` and :func:`kind_params`."""
    check_params(kind, params)
    if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 1:
        raise UserError(f"dataset kind {kind!r}: image_size must be a positive integer, got {image_size!r}")
    spec = KINDS[kind]
    params.setdefault("name", kind)
    return spec.loader(**params, **spec.fixed, image_size=image_size, seed=seed, bad_records=_policy(bad_records))
