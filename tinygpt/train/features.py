"""Cache the frozen ViT + Q-Former outputs of a dataset once, then train on them (dataset kind ``qformer_features``).

The ViT, ln_vision and the Q-Former are frozen in every stage, so their output for an image never changes; a stage
that sees its images many times (stage 3: 5 passes over cc_sbu_align) can skip them after the first. This module
writes the cache (it needs the model); ``tinygpt.data.formats.qformer_features`` reads it and documents its layout.

The texts are those of the dataset's epoch 0 (a random prompt choice is frozen with the features).
CLI: ``python -m tinygpt.train.features --cfg-path train_configs/stage3.yaml --out DIR [--dataset NAME]``; then
train with ``data.datasets.NAME: {kind: qformer_features, batch_size: 6, params: {root: DIR}}``.

A cache holds the outputs of one model at one image size: :func:`check_feature_cache` (the stage's config check, in
``train.py --check`` too) refuses a cache made from another model directory, at another image size, or with another
Q-Former width or query count than the stage's model takes, before the model loads. The cache is built in
``.<out name>.<pid>.<random>.tmp`` next to ``--out``; a later build removes those of builds that are no longer
running (``tinygpt.io_utils.remove_stale_temporaries``).
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
import re
import sys
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ..config import check_paths, load_config
from ..config.options import add_options_argument
from ..config.schema import BUILTIN_PREFIX, RunConfig
from ..data.collate import collate_samples
from ..data.formats.qformer_features import MANIFEST, read_manifest
from ..errors import UserError, report_errors
from ..io_utils import atomic_dir, check_output_dir, remove_stale_temporaries, writing
from ..model import build_config
from ..model.checkpoint_io import read_config
from .build import build_model, planned_config, planned_image_size

log = logging.getLogger("tinygpt.train")


def check_features_out(out: Path) -> None:
    """--out can be written and holds nothing of the user's (the cache replaces it whole): it is missing, empty, or an
    earlier cache, i.e. a cache's manifest and nothing but the files a cache writes. A dataset folder that has a
    manifest.json of its own (the synthetic data's folders do) is refused, never replaced."""
    out = check_output_dir(out, "--out", "feature cache")
    if not out.is_dir() or not any(out.iterdir()):
        return
    replace = "the cache replaces it whole, so choose a new or empty directory"
    if not _is_feature_manifest(out / MANIFEST):
        raise UserError(f"--out: {out} is a non-empty directory that is not a feature cache (no feature-cache "
                        f"{MANIFEST}); {replace}")
    foreign = sorted(p.name for p in out.iterdir() if p.name != MANIFEST and not _CACHE_FILE.match(p.name))
    if foreign:
        raise UserError(f"--out: {out} holds files a feature cache does not write ({', '.join(foreign[:3])}"
                        f"{' ...' if len(foreign) > 3 else ''}); {replace}")


_CACHE_FILE = re.compile(r"^(features-\d{5}\.safetensors|samples-\d{5}\.jsonl)$")


def _is_feature_manifest(path: Path) -> bool:
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and {"shards", "samples", "num_query_tokens"} <= manifest.keys()


BUILTIN_PRESETS = {"builtin:tiny": "tiny"}  # the built-in models' sizes (tinygpt.tiny.backbones: build_config("tiny"))


def stage_features(cfg: RunConfig) -> dict:
    """The image size, Q-Former width and query count of the features the stage's model takes, from the config.json
    of ``model.init_from`` or the preset (no weights are read)."""
    init = cfg.model.init_from
    if init in BUILTIN_PRESETS:
        config = build_config(BUILTIN_PRESETS[init], image_size=cfg.model.image_size)
    else:
        config = planned_config(cfg)
        if config is None:  # a folder without config.json: read_config says so
            config = read_config(Path(init))
    return {"image_size": cfg.model.image_size or config.image_size, "hidden_size": config.qformer_config.hidden_size,
            "num_query_tokens": config.num_query_tokens}


RANDOM = "null (random weights)"


def _model_mismatch(manifest: dict, init: Optional[str]) -> Optional[tuple[str, str, str]]:
    """(manifest field, its value, the stage's model) when the cache was made from another model than ``init``
    (``model.init_from``: null, ``builtin:tiny`` before the entry point resolves it, or a directory); None when it is
    the same. Directories are compared resolved: ``model_dir`` (absolute), or for a cache written before that field
    existed its ``model``, the path its config gave, relative to the working directory."""
    cached = None if manifest["model"] in (None, "None") else str(manifest["model"])
    field = "model_dir" if manifest.get("model_dir") else "model"
    recorded = RANDOM if cached is None else str(manifest[field])
    if init is None or cached is None:  # random weights match only random weights
        return None if init is None and cached is None else (field, recorded, init or RANDOM)
    if init.startswith(BUILTIN_PREFIX):  # train.py --check: compared by name, by directory once resolved
        return None if cached == init else ("model", cached, init)
    wanted = Path(init).resolve()
    if Path(recorded).resolve() == wanted:
        return None
    told = f"{recorded} ({cached})" if field == "model_dir" and cached.startswith(BUILTIN_PREFIX) else recorded
    return field, told, str(wanted)


FITS = {"image_size": "this stage trains at {} px", "hidden_size": "its model takes Q-Former outputs {} wide",
        "num_query_tokens": "its model takes {} query tokens"}


def check_feature_cache(cfg: RunConfig, name: str) -> None:
    """Dataset ``name`` (kind qformer_features) was cached from this stage's model (the same ``model.init_from``
    directory), at its image size, with its Q-Former width and query count; else one UserError naming the YAML key,
    the cache, the manifest field, both values and the command that rebuilds it."""
    root = str(cfg.data.datasets[name].params["root"])
    key = f"data.datasets.{name}.params.root"
    where = f"{cfg.origin(key)}: {key}"
    try:
        manifest = read_manifest(root)
    except UserError as exc:
        raise UserError(f"{where}: {exc}") from None
    overrides = [f"{k}={v}" for k, v in (("model.init_from", cfg.model.init_from),
                                         ("model.image_size", cfg.model.image_size)) if cfg.origin(k) == "--options"]
    rebuild = (f"rebuild it with python -m tinygpt.train.features --cfg-path {cfg.source} --dataset {name} --out "
               f"{root}" + (f" --options {' '.join(overrides)}" if overrides else ""))
    model = _model_mismatch(manifest, cfg.model.init_from)
    if model is not None:
        field, cached, wanted = model
        raise UserError(f"{where}: the feature cache {root} was made from another model: {MANIFEST} {field} is "
                        f"{cached}, this stage's model.init_from is {wanted}; {rebuild}")
    wanted = stage_features(cfg)
    for field, fits in FITS.items():
        if manifest[field] != wanted[field]:
            raise UserError(f"{where}: the feature cache {root} does not fit this stage: {MANIFEST} {field} is "
                            f"{manifest[field]}, {fits.format(wanted[field])}; {rebuild}")


def _model_dir(model_source: Optional[str], model_dir: Optional[str]) -> Optional[str]:
    """The absolute directory the cached model was loaded from (None: random weights or not a directory)."""
    directory = model_dir if model_dir is not None else model_source
    if directory is None or not Path(directory).is_dir():
        return None
    return str(Path(directory).resolve())


@torch.no_grad()
def write_features(model, dataset, out: Path, dataset_name: str, model_source: Optional[str], batch_size: int = 16,
                   shard_size: int = 2048, limit: Optional[int] = None, progress: bool = True,
                   model_dir: Optional[str] = None) -> Path:
    """Run the frozen towers over ``dataset`` (map-style: in index order; streaming: the first ``limit``).
    ``model_source``: the config's ``model.init_from`` (``builtin:tiny``, a path, None); ``model_dir``: the directory
    it was loaded from, when that is not ``model_source`` itself (``builtin:tiny`` resolved)."""
    check_features_out(out)
    model.eval()
    streaming = not hasattr(dataset, "__len__")
    if streaming and limit is None:
        raise UserError(f"{dataset_name}: a streaming dataset needs --limit (how many samples to cache)")
    total = limit if streaming else min(len(dataset), limit or len(dataset))
    if streaming:
        samples = iter(dataset)
    else:  # each record once: a bad one is left out (counted), not stood in for by the next one as in training
        samples = map(getattr(dataset, "sample_at", dataset.__getitem__), range(total))  # None: a bad record
    device = next(model.parameters()).device
    shards, buffer, written = [], [], 0
    bar = tqdm(total=total, desc=f"features {dataset_name}", unit="sample", disable=not progress, file=sys.stderr)
    with writing(out, "the feature cache"):
        for stale in remove_stale_temporaries(Path(out).parent, [glob.escape(Path(out).name)]):
            log.info("removed %s (a temporary of a feature-cache build that is no longer running)", stale)
    with writing(out, "the feature cache"), atomic_dir(out) as tmp:
        def flush():
            feats, offsets, lines = [], [0], []
            for start in range(0, len(buffer), batch_size):
                batch = collate_samples(buffer[start:start + batch_size])
                if batch["images"].shape[0]:
                    feats.append(model.qformer_features(batch["images"].to(device)).float().cpu())
            for sample in buffer:
                offsets.append(offsets[-1] + int(sample["images"].shape[0]))
                lines.append(json.dumps({"turns": sample["turns"], "dataset": sample["dataset"]}))
            q, d = model.config.num_query_tokens, model.config.qformer_config.hidden_size
            tensor = torch.cat(feats) if feats else torch.zeros(0, q, d)
            names = {"features": f"features-{len(shards):05d}.safetensors",
                     "samples": f"samples-{len(shards):05d}.jsonl"}
            save_file({"features": tensor.contiguous(), "offsets": torch.tensor(offsets, dtype=torch.int64)},
                      str(tmp / names["features"]))
            (tmp / names["samples"]).write_text("\n".join(lines) + "\n")
            shards.append(names)
            buffer.clear()

        for sample in samples:
            bar.update(1)
            if sample is None:
                continue
            buffer.append(sample)
            written += 1
            if len(buffer) >= shard_size:
                flush()
            if written >= total:
                break
        if buffer:
            flush()
        manifest = {"dataset": dataset_name, "samples": written, "shards": shards, "model": model_source,
                    "model_dir": _model_dir(model_source, model_dir),
                    "image_size": model.config.image_size, "num_query_tokens": model.config.num_query_tokens,
                    "hidden_size": model.config.qformer_config.hidden_size}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    bar.close()
    return out


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tinygpt.train.features",
                                     description="Cache the frozen ViT + Q-Former outputs of a stage's dataset.")
    parser.add_argument("--cfg-path", required=True, help="stage YAML (its init_from model and datasets)")
    parser.add_argument("--out", required=True, help="output directory of the cache")
    parser.add_argument("--dataset", help="which dataset of the config (default: the only one)")
    add_options_argument(parser, example="model.init_from=outputs/stage2")
    parser.add_argument("--limit", type=int, help="cache at most this many samples (required for streams)")
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    return report_errors(lambda: _features_command(args))


def _features_command(args: argparse.Namespace) -> int:
    if args.batch_size < 1 or (args.limit is not None and args.limit < 1):
        raise UserError(f"--batch-size and --limit: expected whole numbers >= 1, got {args.batch_size} and "
                        f"{args.limit}")
    from .stage import build_datasets, check_dataset_specs  # here: stage imports check_feature_cache from this module

    cfg = load_config(args.cfg_path, args.options)
    check_features_out(Path(args.out))
    check_paths(cfg)
    names = list(cfg.active_datasets())
    name = args.dataset or (names[0] if len(names) == 1 else None)
    if name not in names:
        raise UserError(f"--dataset: choose one of {', '.join(names)}")
    if cfg.data.datasets[name].kind == "qformer_features":
        raise UserError(f"--dataset: {name} is a feature cache already (kind qformer_features in "
                        f"{cfg.origin(f'data.datasets.{name}.kind')}); cache the dataset of its images")
    cfg.data.datasets = {name: cfg.data.datasets[name]}
    check_dataset_specs(cfg)
    source = cfg.model.init_from
    _resolve_builtin(cfg)
    entry = build_datasets(cfg, planned_image_size(cfg))[0]
    model = build_model(cfg).model
    if torch.cuda.is_available():
        model.cuda()
    out = write_features(model, entry.dataset, Path(args.out), name, source, batch_size=args.batch_size,
                         limit=args.limit, model_dir=cfg.model.init_from)
    print(f"wrote {out}")
    return 0


def _resolve_builtin(cfg: RunConfig) -> None:
    """``model.init_from: builtin:tiny`` -> the cached tiny backbones (built the first time). This module is an entry
    point like train.py, so it may reach the twin above training (pyproject's import-linter ignore_imports)."""
    if cfg.model.init_from is not None and cfg.model.init_from.startswith(BUILTIN_PREFIX):
        from ..tiny.backbones import resolve_builtin

        resolve_builtin(cfg)


if __name__ == "__main__":
    sys.exit(main())
