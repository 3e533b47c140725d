"""Batching samples: images of all samples concatenated in order, texts kept as lists.

:func:`collate_batch` is the one collate of training: :func:`collate_features` for samples of cached Q-Former
features (kind ``qformer_features``, they carry ``image_features``), :func:`collate_samples` for all others.
"""

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


def collate_features(samples: list[dict]) -> dict:
    """Samples of cached features -> :func:`collate_samples`' batch plus ``"image_features": Tensor[sum N, Q, D]``."""
    feats = [s["image_features"] for s in samples]
    return {"images": torch.cat([s["images"] for s in samples]), "image_features": torch.cat(feats),
            "image_counts": [int(f.shape[0]) for f in feats], "turns": [s["turns"] for s in samples],
            "dataset": [s["dataset"] for s in samples]}


def collate_batch(samples: list[dict]) -> dict:
    """The collate of every dataset kind: stacked cached features when the samples carry them, else pixels."""
    if samples and "image_features" in samples[0]:
        return collate_features(samples)
    return collate_samples(samples)
