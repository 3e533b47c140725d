"""8-bit and 4-bit LLM weights (bitsandbytes) in the PyTorch chat backend, on the CPU.

bitsandbytes (>= 0.49) quantizes Int8Params / Params4bit on the CPU as well as on CUDA, so the same load path that a
GPU user takes (`ChatEngine.from_model_dir(dir, bits=8|4)`, `model.bits` in a launch config) is exercised here: the
language model's Linear layers (not the LM head) become Linear8bitLt / Linear4bit with int8 / packed NF4 storage, the
answers and scores come out, and the logits stay close to the float model's (int8: ~2% of the logit scale;
NF4: ~22%, on this random model)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from tinygpt.chat import ChatEngine, GenerationSettings
from tinygpt.errors import UserError

bnb = pytest.importorskip("bitsandbytes")


def _messages(seed: int = 0) -> list[dict]:
    image = Image.fromarray((np.random.default_rng(seed).random((64, 64, 3)) * 255).astype(np.uint8))
    return [{"role": "user", "content": [{"type": "image", "image": image},
                                         {"type": "text", "text": "[vqa] what shape is it?"}]}]


def _logits(engine: ChatEngine) -> torch.Tensor:
    lm = engine.backend.model.language_model
    ids = torch.arange(5, 45)[None]
    with torch.no_grad():
        return lm(input_ids=ids, use_cache=False).logits[0].float()


@pytest.fixture(scope="module")
def float_engine(chat_model):
    return ChatEngine.from_model_dir(chat_model[0], device="cpu")


@pytest.mark.parametrize("bits, layer, storage, tolerance", [
    (8, "Linear8bitLt", torch.int8, 0.05),   # measured 0.021 of the logit scale
    (4, "Linear4bit", torch.uint8, 0.4),     # measured 0.22
])
def test_quantized_llm_on_cpu_answers_and_stays_close(chat_model, float_engine, bits, layer, storage, tolerance):
    engine = ChatEngine.from_model_dir(chat_model[0], device="cpu", bits=bits)
    assert engine.name == f"torch:cpu:int{bits}"
    lm = engine.backend.model.language_model
    swapped = {name: type(m).__name__ for name, m in lm.named_modules() if type(m).__name__ == layer}
    linears = [name for name, m in lm.named_modules() if type(m) is torch.nn.Linear]
    assert swapped and linears == ["lm_head"]  # every Linear but the head went to bitsandbytes
    assert all(getattr(lm.get_submodule(name), "weight").dtype == storage for name in swapped)

    reference, got = _logits(float_engine), _logits(engine)
    scale = reference.abs().max()
    error = (got - reference).abs().max() / scale
    assert 1e-4 < error < tolerance  # quantized (not the float weights), yet close

    answer = engine.chat(_messages(), GenerationSettings(max_new_tokens=6))
    assert isinstance(answer, str)
    scores = engine.score(_messages(), ["circle", "square"])
    assert len(scores) == 2 and all(math.isfinite(s) and s <= 0 for s in scores)


def test_bits_other_than_8_or_4_are_refused(chat_model):
    with pytest.raises(UserError, match="bits: expected 8, 4 or none"):
        ChatEngine.from_model_dir(chat_model[0], device="cpu", bits=3)


def test_lora_adapters_stay_float_and_only_base_layers_are_quantized():
    # quantizing LoRA's A and B as well multiplied the error of every adapted layer: on the tiny stage-4 model
    # (LoRA on qkv, dense, fc1, fc2) NF4 answers became garbage (0 of 300 held-out answers as the float model's);
    # with the adapters kept in float, as QLoRA keeps them, 82% agree (8-bit: 97%)
    from tinygpt.chat.torch_backend import quantize_llm_linears
    from tinygpt.model import TinyGPTVForConditionalGeneration, build_config

    torch.manual_seed(0)
    model = TinyGPTVForConditionalGeneration(build_config("tiny", lora={"r": 4})).eval()
    quantize_llm_linears(model, 4, compute_dtype=torch.float32)
    model.to("cpu")
    kinds = {name: type(m).__name__ for name, m in model.language_model.named_modules()
             if isinstance(m, (torch.nn.Linear, bnb.nn.Linear4bit))}
    adapters = {n: k for n, k in kinds.items() if ".lora_" in n}
    bases = {n: k for n, k in kinds.items() if n.endswith("base_layer")}
    assert adapters and set(adapters.values()) == {"Linear"}
    assert bases and set(bases.values()) == {"Linear4bit"}
