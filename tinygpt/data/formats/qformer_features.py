"""Dataset kind ``qformer_features``: the frozen ViT + Q-Former outputs of a dataset, cached once on disk.

The cache is written by ``python -m tinygpt.train.features`` (``tinygpt.train.features.write_features``, which needs
the model); this module only reads it. Layout::

    DIR/manifest.json                 model, image size, query count and width, sample count, shard list
    DIR/features-00000.safetensors    "features" [sum N, Q, D] and "offsets" [n + 1] (sample i: rows offsets[i]..[i+1])
    DIR/samples-00000.jsonl           one line per sample: {"turns": [...], "dataset": name}

Samples: ``{"images": empty [0, 3, S, S], "image_features": [N, Q, D], "turns", "dataset"}``; batch them with
:func:`tinygpt.data.collate.collate_features`. The shared registry arguments (``image_size``, ``seed``,
``bad_records``) are accepted and unused: the cache fixes its image size and texts when it is written.

The manifest's ``model`` is the writer's ``model.init_from`` as its config gave it (``builtin:tiny``, a path, or null
for random weights) and ``model_dir`` the absolute model directory it was loaded from (caches written before
``model_dir`` existed lack it). A stage compares them, ``image_size``, ``hidden_size`` (the Q-Former width) and
``num_query_tokens`` with its own model before it loads (``tinygpt.train.features.check_feature_cache``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
from safetensors import safe_open
from torch.utils.data import Dataset

from tinygpt.data.bad_records import BadRecordPolicy
from tinygpt.errors import UserError

MANIFEST = "manifest.json"
REBUILD = "rebuild the cache with python -m tinygpt.train.features"
REQUIRED = ("dataset", "samples", "shards", "model", "image_size", "num_query_tokens", "hidden_size")


def read_manifest(root: str | Path) -> dict:
    """The manifest of the feature cache ``root``; a UserError when it is missing, unreadable or lacks a field."""
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise UserError(f"{root}: not a feature cache (no {MANIFEST}; write one with python -m tinygpt.train.features)")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: not a readable feature-cache manifest ({exc}); rebuild the cache with "
                        "python -m tinygpt.train.features") from None
    missing = [key for key in REQUIRED if not isinstance(manifest, dict) or key not in manifest]
    if missing:
        raise UserError(f"{path}: not a feature-cache manifest (no {missing[0]!r}); rebuild the cache with "
                        "python -m tinygpt.train.features")
    return manifest


def _read_samples(path: Path) -> list[dict]:
    """The sample texts of one shard, one JSON object per line; a missing or damaged file is a UserError."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read the feature cache's samples ({getattr(exc, 'strerror', None) or exc}); "
                        f"{REBUILD}") from None
    texts = []
    for line_no, line in enumerate(lines, start=1):
        try:
            text = json.loads(line)
        except ValueError as exc:
            raise UserError(f"{path}:{line_no}: not valid JSON ({exc}); {REBUILD}") from None
        if not isinstance(text, dict) or not isinstance(text.get("turns"), list):
            raise UserError(f"{path}:{line_no}: expected an object with a 'turns' list; {REBUILD}")
        texts.append(text)
    return texts


class FeatureDataset(Dataset):
    """Samples ``{"images": empty, "image_features": [N, Q, D], "turns", "dataset"}`` from a feature cache."""

    def __init__(self, root: str, name: Optional[str] = None, *, image_size: Optional[int] = None, seed: int = 0,
                 bad_records: Optional[BadRecordPolicy] = None):
        self.root = Path(root)
        self.manifest = read_manifest(self.root)
        self.name = name or self.manifest["dataset"]
        self.index: list[tuple[int, int]] = []       # (shard, row in shard) per sample
        self.texts: list[dict] = []
        shards = self.manifest["shards"]
        if not isinstance(shards, list) or not all(
                isinstance(files, dict) and all(isinstance(files.get(k), str) for k in ("features", "samples"))
                for files in shards):
            raise UserError(f"{self.root / MANIFEST}: 'shards' must be a list of {{\"features\", \"samples\"}} file "
                            f"names; {REBUILD}")
        for shard, files in enumerate(shards):
            texts = _read_samples(self.root / files["samples"])
            if not (self.root / files["features"]).is_file():
                raise UserError(f"{self.root / files['features']}: feature shard does not exist; {REBUILD}")
            self.texts.extend(texts)
            self.index.extend((shard, row) for row in range(len(texts)))
        self._open: tuple[int, dict] | None = None
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.index)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _shard(self, shard: int) -> dict:
        if self._open is None or self._open[0] != shard:
            path = self.root / self.manifest["shards"][shard]["features"]
            with safe_open(str(path), framework="pt") as f:
                self._open = (shard, {"features": f.get_tensor("features"), "offsets": f.get_tensor("offsets")})
        return self._open[1]

    def __getitem__(self, i: int) -> dict:
        shard, row = self.index[i]
        data = self._shard(shard)
        start, end = int(data["offsets"][row]), int(data["offsets"][row + 1])
        size = int(self.manifest["image_size"])
        return {"images": torch.zeros(0, 3, size, size), "image_features": data["features"][start:end],
                "turns": self.texts[i]["turns"], "dataset": self.name}
