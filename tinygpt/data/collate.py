"""Batching samples: images of all samples concatenated in order, texts kept as lists."""

from __future__ import annotations

import torch


def collate_samples(samples: list[dict]) -> dict:
    """list of samples -> ``{"images": Tensor[sum N, 3, S, S], "image_counts": [N per sample],
    "turns": [turns per sample], "dataset": [name per sample]}``.

    Text-only samples contribute no image rows. All images must share one size (one dataset, one stage).
    """
    if not samples:
        raise ValueError("collate_samples needs at least one sample")
    images = [sample["images"] for sample in samples]
    sizes = {tuple(t.shape[1:]) for t in images if t.shape[0] > 0}
    if len(sizes) > 1:
        raise ValueError(f"samples have different image sizes {sorted(sizes)}; one batch needs one size")
    return {
        "images": torch.cat(images, dim=0),
        "image_counts": [int(t.shape[0]) for t in images],
        "turns": [sample["turns"] for sample in samples],
        "dataset": [sample["dataset"] for sample in samples],
    }
