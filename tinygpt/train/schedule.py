"""Learning rate per optimizer step: linear warm-up, then cosine decay to ``min_lr`` at the last step.

Warm-up counts GLOBAL optimizer steps: ``warmup_lr -> init_lr`` over ``warmup_steps`` (the original used the
within-epoch index, so every epoch restarted its warm-up). The cosine then runs from ``init_lr`` at the end of warm-up
to ``min_lr`` at ``total_steps`` (continuous at the join; the original's cosine spanned the whole budget, which made
a small jump at the end of warm-up). ``min_lr`` above ``init_lr`` is refused (the original stage 4 had that).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import UserError


@dataclass(frozen=True)
class WarmupCosine:
    init_lr: float
    min_lr: float
    warmup_lr: float
    warmup_steps: int
    total_steps: int

    def __post_init__(self) -> None:
        if self.min_lr > self.init_lr:
            raise UserError(f"schedule.min_lr {self.min_lr:g} is above schedule.init_lr {self.init_lr:g}")
        if self.total_steps < 1 or not 0 <= self.warmup_steps <= self.total_steps:
            raise UserError(f"schedule: need 0 <= warmup_steps ({self.warmup_steps}) <= total_steps "
                            f"({self.total_steps}) and total_steps >= 1")

    @classmethod
    def from_config(cls, schedule) -> "WarmupCosine":
        return cls(schedule.init_lr, schedule.min_lr, schedule.warmup_lr, schedule.warmup_steps, schedule.total_steps)

    def lr_at(self, step: int) -> float:
        """Learning rate of optimizer step ``step`` (0-based)."""
        if step < self.warmup_steps:
            return self.warmup_lr + (self.init_lr - self.warmup_lr) * step / self.warmup_steps
        span = self.total_steps - 1 - self.warmup_steps
        progress = 1.0 if span <= 0 else min(1.0, (step - self.warmup_steps) / span)
        return self.min_lr + (self.init_lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def apply(self, optimizer, step: int) -> float:
        lr = self.lr_at(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        return lr

    def state_dict(self) -> dict:
        return {"init_lr": self.init_lr, "min_lr": self.min_lr, "warmup_lr": self.warmup_lr,
                "warmup_steps": self.warmup_steps, "total_steps": self.total_steps}
