"""Counts and stop strings agreeing between the PyTorch backend and the GGUF runtime, on conftest's decisive tiny
model (`chat_model`) and its F16 export: the same ids generated, the same prompt positions and the same reason to
stop (`last_stats`, hence the server's ``usage`` and ``finish_reason``), and a caller's stop string keeping the
text before it exactly, trailing space included, streamed or not."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from tinygpt.chat import ChatEngine, GenerationSettings
from tinygpt.serve.usage import measure


@pytest.fixture(scope="module")
def engines(chat_model):
    from tinygpt.chat.gguf_backend import GGUFBackend
    from tinygpt.chat.torch_backend import TorchBackend
    from tinygpt.model import load_vlm

    model_dir, gguf_dir = chat_model
    return ChatEngine(TorchBackend(load_vlm(model_dir))), ChatEngine(GGUFBackend.load(gguf_dir, vision_int8=False))


def _user(*parts):
    return {"role": "user", "content": [{"type": "text", "text": p} if isinstance(p, str) else
                                        {"type": "image", "image": p} for p in parts]}


IMAGE = Image.fromarray((np.random.default_rng(0).random((90, 130, 3)) * 255).astype(np.uint8))
CONVERSATIONS = [[_user("Tell me a story")], [_user(IMAGE, "What is in the picture?")]]


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_both_backends_count_the_same(engines, messages):
    torch_engine, gguf_engine = engines
    for settings in (GenerationSettings(max_new_tokens=7), GenerationSettings(max_new_tokens=30)):
        stats, measured = [], []
        for engine in engines:
            answer = engine.chat(messages, settings)
            stats.append(engine.backend.last_stats)
            measured.append(measure(engine, engine._conversation(messages), answer, settings))
            streamed = "".join(engine.stream(messages, settings))
            assert streamed == answer and engine.backend.last_stats == stats[-1]
        assert stats[0] == stats[1]
        assert measured[0] == measured[1]
        assert measured[0][0].completion_tokens == stats[0].generated_tokens <= settings.max_new_tokens


def _stop_after_a_space(text: str) -> tuple[str, str] | None:
    """(stop string, the text before it) for a stop string that first occurs right after a space, or None."""
    for i, char in enumerate(text[:-3]):
        stop = text[i + 1: i + 4]
        if char == " " and i > 0 and text.index(stop) == i + 1 and stop.strip() == stop:
            return stop, text[: i + 1]
    return None


def test_a_callers_stop_string_cuts_exactly_on_both_backends(engines):
    for engine in engines:
        found = None
        for messages in CONVERSATIONS:
            full = engine.chat(messages, GenerationSettings(max_new_tokens=40))
            found = _stop_after_a_space(full)
            if found:
                break
        assert found, "the random model answers with words separated by spaces"
        stop, before = found
        settings = GenerationSettings(max_new_tokens=40, stop=(stop,))
        assert before.endswith(" ")
        assert engine.chat(messages, settings) == before
        assert "".join(engine.stream(messages, settings)) == before
        assert measure(engine, engine._conversation(messages), before, settings)[1] == "stop"
