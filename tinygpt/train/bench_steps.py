"""What the training bench measures with (``bench.py``, ``bench_switches.py``): synthetic batches of the data
contract, timed optimizer steps, the model FLOPs a step needs and the GPU's peak."""

from __future__ import annotations

import time
from typing import Optional

import torch

from .loop import compute_loss, to_device

# dense bf16 peak of common training GPUs (TFLOP/s), for the utilisation figure
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "4090": 165.0,
               "3090": 71.0, "V100": 125.0, "T4": 65.0}
PROMPT_TOKENS = 16  # about what the synthetic prompt's text adds (BOS, template, <Img></Img>, instruction)


def answer_lengths(batch_size: int, text_tokens: int, lengths: str) -> list[int]:
    """Answer tokens per sample: ``fixed`` all ``text_tokens``; ``mixed`` spread evenly up to it
    (``text_tokens * (i + 1) / batch_size``), as real answers vary and leave padding in a batch."""
    if lengths == "fixed":
        return [text_tokens] * batch_size
    return [max(1, round(text_tokens * (i + 1) / batch_size)) for i in range(batch_size)]


def synthetic_batch(model, batch_size: int, text_tokens: int, image_size: int, features: bool,
                    lengths: str = "fixed") -> dict:
    """One batch of the data contract: one image per sample, answers of about ``answer_lengths`` tokens."""
    turns = [[{"user": "<Img><ImageHere></Img> Describe this image in detail.", "assistant": " ".join(["shape"] * n)}]
             for n in answer_lengths(batch_size, text_tokens, lengths)]
    batch = {"turns": turns, "image_counts": [1] * batch_size, "dataset": ["bench"] * batch_size,
             "images": torch.randn(batch_size, 3, image_size, image_size)}
    if features:
        q, d = model.config.num_query_tokens, model.config.qformer_config.hidden_size
        batch["image_features"] = torch.randn(batch_size, q, d)
    return batch


def model_flops(model, llm_tokens: int, images: int) -> float:
    """FLOPs of ``llm_tokens`` LLM tokens and ``images`` images (attention scores left out): the LLM's frozen
    matrices 4 x params x tokens (forward, and the backward's gradient with respect to their inputs; their weight
    gradients are never computed), its trainable ones (LoRA, norms) 6 x params x tokens, the frozen ViT and Q-Former
    forward only, 2 x params x tokens."""
    cfg = model.config
    named = [(n, p) for n, p in model.language_model.named_parameters() if "embed_tokens" not in n]
    frozen_llm = sum(p.numel() for _, p in named if not p.requires_grad)
    trainable_llm = sum(p.numel() for _, p in named if p.requires_grad)
    vit = sum(p.numel() for p in model.vision_model.parameters())
    qformer = sum(p.numel() for p in model.qformer.parameters())
    patches = (cfg.image_size // int(cfg.vision_config.patch_size)) ** 2 + 1
    return ((4.0 * frozen_llm + 6.0 * trainable_llm) * llm_tokens
            + images * (2.0 * vit * patches + 2.0 * qformer * cfg.num_query_tokens))


def model_flops_per_sample(model, text_tokens: int) -> float:
    """:func:`model_flops` of one synthetic sample: BOS, the image's query tokens, the answer and the prompt."""
    return model_flops(model, 1 + model.config.num_query_tokens + text_tokens + PROMPT_TOKENS, 1)


def peak_tflops() -> Optional[float]:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def time_steps(cfg, accelerator, model, optimizer, batch: dict, steps: int, warmup: int = 1) -> float:
    """Mean seconds of ``steps`` optimizer steps after ``warmup`` untimed ones (allocations, kernels, compilation)."""
    batch = to_device(batch, accelerator.device)
    durations = []
    for _ in range(steps + warmup):
        if accelerator.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with accelerator.autocast():
            loss = compute_loss(model, batch, cfg.model)
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if accelerator.device.type == "cuda":
            torch.cuda.synchronize()
        durations.append(time.perf_counter() - start)
    return sum(durations[warmup:]) / max(1, steps)
