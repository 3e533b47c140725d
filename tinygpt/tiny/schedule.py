"""The learning rate of both tiny backbone pretrainings: linear warm-up to ``lr``, then cosine decay to 5% of it.

(The stages use ``tinygpt.train.schedule.WarmupCosine``; this shorter form is kept separate because the cached tiny
backbones were measured with exactly these values.)
"""

from __future__ import annotations

import math


def pretrain_lr(step: int, lr: float, warmup: int, steps: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))
