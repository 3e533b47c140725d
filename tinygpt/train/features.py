"""Cache the frozen ViT + Q-Former outputs of a dataset once, then train on them (dataset kind ``qformer_features``).

The ViT, ln_vision and the Q-Former are frozen in every stage, so their output for an image never changes; a stage
that sees its images many times (stage 3: 5 passes over cc_sbu_align) can skip them after the first. This module
writes the cache (it needs the model); ``tinygpt.data.formats.qformer_features`` reads it and documents its layout.

The texts are those of the dataset's epoch 0 (a random prompt choice is frozen with the features).
CLI: ``python -m tinygpt.train.features --cfg-path train_configs/stage3.yaml --out DIR [--dataset NAME]``; then
train with ``data.datasets.NAME: {kind: qformer_features, batch_size: 6, params: {root: DIR}}``.
"""

from __future__ import annotations

import argparse
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
from ..data.collate import collate_samples
from ..data.formats.qformer_features import MANIFEST
from ..errors import UserError, report_errors
from ..io_utils import atomic_dir, check_output_dir, writing
from .build import build_model, planned_image_size
from .stage import build_datasets, check_dataset_specs

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


@torch.no_grad()
def write_features(model, dataset, out: Path, dataset_name: str, model_source: str, batch_size: int = 16,
                   shard_size: int = 2048, limit: Optional[int] = None, progress: bool = True) -> Path:
    """Run the frozen towers over ``dataset`` (map-style: in index order; streaming: the first ``limit``)."""
    check_features_out(out)
    model.eval()
    streaming = not hasattr(dataset, "__len__")
    if streaming and limit is None:
        raise UserError(f"{dataset_name}: a streaming dataset needs --limit (how many samples to cache)")
    total = limit if streaming else min(len(dataset), limit or len(dataset))
    samples = iter(dataset) if streaming else (dataset[i] for i in range(total))
    device = next(model.parameters()).device
    shards, buffer, written = [], [], 0
    bar = tqdm(total=total, desc=f"features {dataset_name}", unit="sample", disable=not progress, file=sys.stderr)
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
            buffer.append(sample)
            written += 1
            bar.update(1)
            if len(buffer) >= shard_size:
                flush()
            if written >= total:
                break
        if buffer:
            flush()
        manifest = {"dataset": dataset_name, "samples": written, "shards": shards, "model": model_source,
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
    parser.add_argument("--options", nargs="+", default=[], metavar="KEY=VALUE")
    parser.add_argument("--limit", type=int, help="cache at most this many samples (required for streams)")
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    return report_errors(lambda: _features_command(args))


def _features_command(args: argparse.Namespace) -> int:
    if args.batch_size < 1 or (args.limit is not None and args.limit < 1):
        raise UserError(f"--batch-size and --limit: expected whole numbers >= 1, got {args.batch_size} and "
                        f"{args.limit}")
    cfg = load_config(args.cfg_path, args.options)
    check_features_out(Path(args.out))
    check_paths(cfg)
    check_dataset_specs(cfg)
    names = list(cfg.active_datasets())
    name = args.dataset or (names[0] if len(names) == 1 else None)
    if name not in names:
        raise UserError(f"--dataset: choose one of {', '.join(names)}")
    cfg.data.datasets = {name: cfg.data.datasets[name]}
    entry = build_datasets(cfg, planned_image_size(cfg))[0]
    model = build_model(cfg).model
    if torch.cuda.is_available():
        model.cuda()
    out = write_features(model, entry.dataset, Path(args.out), name, str(cfg.model.init_from),
                         batch_size=args.batch_size, limit=args.limit)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
