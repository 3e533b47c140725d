"""Per-expert load statistics of an MoE stage for the training log (``model.moe``; nothing for a dense model).

After each micro-batch the loop adds every MoE layer's assignment counts (top-k choices per expert, real tokens
only) and auxiliary loss; at ``run.log_every`` a line gives each layer's load share per expert since the last line
and the mean auxiliary loss, e.g. ``moe layer 1 load 0.27 0.23 0.26 0.24 | layer 3 load ... | aux loss 0.0201``
(1 / num_experts each is perfect balance). The run summary keeps the shares over the whole run (``moe_load_share``):
each resume checkpoint holds the counts so far (``state()``, in its state.json), and a resume continues them
(``resume``). A checkpoint written before the counts were saved resumes too: the shares then cover only the steps
since the resume, which the log says and the summary records as ``moe_load_share_from_step``. Counts are this
process's (the main process's are the ones saved and summarised).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..errors import UserError
from ..model.moe import moe_modules

log = logging.getLogger("tinygpt.train")


class MoELoad:
    def __init__(self, model):
        self.modules = moe_modules(model)
        self.total = {i: torch.zeros(m.num_experts, dtype=torch.long) for i, m in self.modules}
        self.from_step = 0  # the counts cover the steps after this one: 0, or a checkpoint's step without counts
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

    def summary(self) -> dict:
        """``moe_load_share``: layer -> per-expert share of the top-k choices over the run (from ``from_step`` when a
        resume had no counts to continue, then also ``moe_load_share_from_step``)."""
        out: dict = {"moe_load_share": {str(i): [round(s, 4) for s in share]
                                        for i, share in self.shares(self.total).items()}}
        if self.from_step:
            out["moe_load_share_from_step"] = self.from_step
        return out

    def state(self) -> dict[str, list[int]]:
        """The whole-run counts (layer -> per-expert top-k choices), for a resume checkpoint's state.json."""
        return {str(i): counts.tolist() for i, counts in self.total.items()}

    def resume(self, saved, checkpoint: Path, step: int) -> None:
        """Continue the counts ``state()`` saved in ``checkpoint`` (of ``step``); without them (a checkpoint written
        before they were saved) the shares cover the steps after ``step`` only, as the log and the summary say."""
        if saved is None:
            self.from_step = step
            log.warning("%s holds no MoE load counts (written by an older tinygpt): the summary's moe_load_share "
                        "covers only the steps after step %d", checkpoint, step)
            return
        wanted = {key: len(counts) for key, counts in self.state().items()}
        if not (isinstance(saved, dict) and set(saved) == set(wanted) and all(
                isinstance(v, list) and len(v) == wanted[k] and all(isinstance(c, int) for c in v)
                for k, v in saved.items())):
            raise UserError(f"{checkpoint / 'state.json'}: moe_load does not match this model's MoE layers "
                            f"(layer -> experts {wanted}); resume with the same config")
        for i in self.total:
            self.total[i] += torch.tensor(saved[str(i)], dtype=torch.long)
