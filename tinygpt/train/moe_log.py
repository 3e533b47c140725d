"""Per-expert load statistics of an MoE stage for the training log (``model.moe``; nothing for a dense model).

After each micro-batch the loop adds every MoE layer's assignment counts (top-k choices per expert, padding tokens
included) and auxiliary loss; at ``run.log_every`` a line gives each layer's load share per expert since the last line
and the mean auxiliary loss, e.g. ``moe layer 1 load 0.27 0.23 0.26 0.24 | layer 3 load ... | aux loss 0.0201``
(1 / num_experts each is perfect balance). The run summary keeps the shares over the whole run. Counts are this
process's.
"""

from __future__ import annotations

import torch

from ..model.moe import moe_modules


class MoELoad:
    def __init__(self, model):
        self.modules = moe_modules(model)
        self.total = {i: torch.zeros(m.num_experts, dtype=torch.long) for i, m in self.modules}
        self.reset()

    def __bool__(self) -> bool:
        return bool(self.modules)

    def reset(self) -> None:
        self.window = {i: torch.zeros(m.num_experts, dtype=torch.long) for i, m in self.modules}
        self.aux_sum, self.forwards = 0.0, 0

    def add(self) -> None:
        """Record the last forward of every MoE layer."""
        aux = 0.0
        for i, m in self.modules:
            if m.last_counts is None:
                continue
            counts = m.last_counts.cpu()
            self.window[i] += counts
            self.total[i] += counts
            aux += float(m.last_aux_loss.detach())
        self.aux_sum += aux
        self.forwards += 1

    @staticmethod
    def shares(counts: dict) -> dict[int, list[float]]:
        return {i: (c.double() / max(1, int(c.sum()))).tolist() for i, c in counts.items()}

    def line(self) -> str:
        parts = [f"layer {i} load " + " ".join(f"{s:.2f}" for s in share)
                 for i, share in self.shares(self.window).items()]
        return "moe " + " | ".join(parts) + f" | aux loss {self.aux_loss():.4f}"

    def aux_loss(self) -> float:
        return self.aux_sum / max(1, self.forwards)

    def metrics(self) -> dict[str, float]:
        out = {"moe/aux_loss": self.aux_loss()}
        for i, share in self.shares(self.window).items():
            out.update({f"moe/layer{i}/expert{e}": s for e, s in enumerate(share)})
        return out

    def summary(self) -> dict[str, list[float]]:
        return {str(i): [round(s, 4) for s in share] for i, share in self.shares(self.total).items()}
