"""Random-weight GGUF pairs of the real shapes, written tensor by tensor (for benchmarks and runtime tests).

    python -m quantize random --out DIR --size full|tiny [--qtype q4_k] [--seed 0]

"full" is TinyGPT-V (Phi-2 2.78 B with the extra norms + EVA ViT-g + Q-Former), "tiny" the tiny preset. Tensor
names and shapes come from the real model class built on PyTorch's meta device (no memory, no weights), so the files
match what `export` writes for a trained model of that size. Values: Linear/embedding weights N(0, 0.02), norm
weights 1 + N(0, 0.1), biases N(0, 0.02); each tensor has its own generator seeded by (seed, tensor index), so the
output is reproducible and only one tensor is in memory at a time.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from tinygpt.errors import UserError
from tinygpt.model.presets import build_config
from tinygpt.model.vlm import TinyGPTVForConditionalGeneration
from tinygpt.tokenizer import load_tokenizer

from .export import ExportSummary, check_out_dir, order_llm, split_state_names, write_pair
from .gguf_meta import LLMHyper, PromptInfo, VisionHyper, tokenizer_metadata
from .qtypes import parse_qtype

SIZES = {"full": "tinygptv", "tiny": "tiny"}  # --size -> tinygpt.model.presets name


def random_config(size: str, extra_norms: bool = True):
    """The TinyGPTVConfig of a named size."""
    if size not in SIZES:
        raise UserError(f"--size: unknown size {size!r}; choose one of {', '.join(SIZES)}")
    return build_config(SIZES[size], extra_norms=extra_norms)


def meta_shapes(config) -> dict[str, tuple[int, ...]]:
    """State-dict names -> shapes of the model class for `config`, built on the meta device (no allocation)."""
    with torch.device("meta"):
        model = TinyGPTVForConditionalGeneration(config)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def random_tensor(gguf_name: str, shape: tuple[int, ...], seed: int, index: int) -> np.ndarray:
    rng = np.random.default_rng([seed, index])
    values = rng.standard_normal(shape, dtype=np.float32)
    if len(shape) == 1 and gguf_name.endswith(".weight"):  # a norm's scale
        return values * np.float32(0.1) + np.float32(1.0)
    return values * np.float32(0.02)


def write_random_model(
    out_dir: str | Path, size: str = "tiny", qtype: str = "q4_k", seed: int = 0, extra_norms: bool = True,
    progress: bool = True,
) -> ExportSummary:
    """Write out_dir/llm-<qtype>.gguf + vision.gguf (+ export.json) with random weights of the named size."""
    parse_qtype(qtype)
    check_out_dir(out_dir)
    config = random_config(size, extra_norms)
    shapes = meta_shapes(config)
    llm_hyper = LLMHyper.from_config(config.text_config)
    where = f"random model {size!r}"
    llm_map, vision_map = split_state_names(list(shapes), where)
    llm_order = order_llm(llm_map, llm_hyper, where)
    to_torch = {**llm_map, **vision_map}
    index = {name: i for i, name in enumerate([*llm_order, *vision_map])}
    text = config.text_config
    tok = tokenizer_metadata(load_tokenizer(None), llm_hyper.vocab_size, text.bos_token_id, text.eos_token_id,
                             text.pad_token_id)

    def produce(gguf_name: str) -> np.ndarray:
        return random_tensor(gguf_name, shapes[to_torch[gguf_name]], seed, index[gguf_name])

    return write_pair(
        out_dir, qtype, f"tinygpt-v random {size} seed {seed}", llm_hyper, VisionHyper.from_config(config),
        PromptInfo.from_config(config), tok,
        [(n, shapes[llm_map[n]]) for n in llm_order],
        [(n, shapes[t]) for n, t in vision_map.items()],
        produce, progress, model_id=random_model_id(size, seed, extra_norms, shapes),
    )


def random_model_id(size: str, seed: int, extra_norms: bool, shapes: dict[str, tuple[int, ...]]) -> str:
    """The content of a random model is a function of these, so their hash identifies it (as content_id does for
    a trained model)."""
    canonical = json.dumps({"random": size, "seed": seed, "extra_norms": extra_norms,
                            "shapes": {n: list(s) for n, s in sorted(shapes.items())}}, sort_keys=True)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()
