"""Cost of ``model.attention: mmca``: the tiny LLM's training step (forward + backward), causal vs mmca, on this
machine's CPU. Batch 8 x 96 positions, 32 of them image positions, 16 supervised answer tokens per row.

    python experiments/mmca_cost.py

Prints the median over 10 interleaved pairs (causal step, then mmca step) of the mmca / causal time ratio.
"""
from __future__ import annotations

import statistics
import time

import torch

from tinygpt.model import TinyGPTPhiForCausalLM, build_config
from tinygpt.model.phi_config import set_attention_kind


def main() -> None:
    torch.set_num_threads(2)
    torch.manual_seed(0)
    lm = TinyGPTPhiForCausalLM(build_config("tiny").text_config).train()
    x = torch.randn(8, 96, lm.config.hidden_size)
    images = torch.zeros(8, 96, dtype=torch.bool)
    images[:, 10:42] = True
    labels = torch.randint(0, 1000, (8, 96))
    labels[:, :80] = -100

    def step(kind: str) -> float:
        set_attention_kind(lm.config, kind)
        start = time.perf_counter()
        lm(inputs_embeds=x, image_mask=images, labels=labels, use_cache=False, loss_only=True).loss.backward()
        return time.perf_counter() - start

    for _ in range(3):
        step("causal"), step("mmca")
    pairs = [(step("causal"), step("mmca")) for _ in range(10)]
    ratios = [m / c for c, m in pairs]
    print(f"causal {statistics.median(c for c, _ in pairs) * 1e3:.0f} ms, mmca "
          f"{statistics.median(m for _, m in pairs) * 1e3:.0f} ms per step; mmca/causal median "
          f"{statistics.median(ratios):.2f} (min {min(ratios):.2f}, max {max(ratios):.2f})")


if __name__ == "__main__":
    main()
