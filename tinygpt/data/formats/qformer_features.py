"""Dataset kind ``qformer_features``: the frozen ViT + Q-Former outputs of a dataset, cached once on disk.

The cache is written by ``python -m tinygpt.train.features`` (``tinygpt.train.features.write_features``, which needs
the model); this module only reads it. Layout::

    DIR/manifest.json                 model, image size, query count and width, sample count, shard list
    DIR/features-00000.safetensors    "features" [sum N, Q, D] and "offsets" [n + 1] (sample i: rows offsets[i]..[i+1])
    DIR/samples-00000.jsonl           one line per sample: {"turns": [...], "dataset": name}

Samples: ``{"images": empty [0, 3, S, S], "image_features": [N, Q, D], "turns", "dataset"}``; batch them with
:func:`tinygpt.data.collate.collate_features`. The shared registry arguments (``image_size``, ``seed``,
``bad_records``) are accepted and unused: the cache fixes its image size and texts when it is written.
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


class FeatureDataset(Dataset):
    """Samples ``{"images": empty, "image_features": [N, Q, D], "turns", "dataset"}`` from a feature cache."""

    def __init__(self, root: str, name: Optional[str] = None, *, image_size: Optional[int] = None, seed: int = 0,
                 bad_records: Optional[BadRecordPolicy] = None):
        self.root = Path(root)
        manifest_path = self.root / MANIFEST
        if not manifest_path.is_file():
            raise UserError(f"{self.root}: not a feature cache (no {MANIFEST}; write one with "
                            "python -m tinygpt.train.features)")
        self.manifest = json.loads(manifest_path.read_text())
        self.name = name or self.manifest["dataset"]
        self.index: list[tuple[int, int]] = []       # (shard, row in shard) per sample
        self.texts: list[dict] = []
        for shard, files in enumerate(self.manifest["shards"]):
            lines = (self.root / files["samples"]).read_text().splitlines()
            self.texts.extend(json.loads(line) for line in lines)
            self.index.extend((shard, row) for row in range(len(lines)))
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
