"""Fixes from a review of the training code (loop, mixing, schedule, optimizer, progress)."""

from __future__ import annotations

from types import SimpleNamespace

import torch


class TwoProcesses:
    """The parts of an Accelerator that ``samples_over_processes`` uses, as process 0 of two sees them: ``reduce``
    sums this process's tensor with the other process's (``other``)."""

    num_processes = 2
    device = torch.device("cpu")

    def __init__(self, other: list[int]):
        self.other = other

    def reduce(self, tensor, reduction="sum"):
        assert reduction == "sum"
        return tensor + torch.tensor(self.other, dtype=tensor.dtype)


def test_samples_per_step_are_summed_over_processes_not_multiplied():
    """Each process draws its own dataset for each micro-batch, with that dataset's batch size (stage 4: 1 to 3), so
    a step's samples are the sum over processes. The loop counted ``this process's samples * processes``: a
    2-process tiny stage 4 (torchrun, batch sizes 2/4/6) logged 4, 12, 4, 4 samples for steps that read 2+4, 6+6,
    2+2 and 2+6, so samples/s (bar, log, TensorBoard, train_summary.json) was wrong."""
    from tinygpt.train.loop import samples_over_processes

    assert samples_over_processes(TwoProcesses([4]), 2) == 6  # was 2 * 2 = 4
    assert samples_over_processes(TwoProcesses([6]), 2) == 8
    assert samples_over_processes(SimpleNamespace(num_processes=1), 5) == 5  # one process: no collective
