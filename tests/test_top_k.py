"""top_k: sample among the k likeliest tokens only, 0 off, on every front end (settings, the GGUF sampler, the PyTorch
backend, the server's extension field, lmms-eval's gen_kwargs, the chat commands). The PyTorch backend used to leave
it out, so transformers applied its default of 50 while the GGUF sampler applied none: sampled answers of the two
backends came from different distributions."""

from __future__ import annotations

import numpy as np
import pytest

from server_fixtures import LIMITS, NAME, Wrapped, post, user
from test_chat_engine import _talkative, engines  # noqa: F401  (the module fixture: PyTorch and GGUF engines)
from tinygpt.chat.settings import GenerationSettings
from tinygpt.errors import UserError
from tinygpt.evaluation.lmms_model import generation_settings
from quantize.sampler import Sampler, SamplingParams


def _draws(params: SamplingParams, logits, n: int = 400) -> set[int]:
    sampler = Sampler(params)
    return {sampler(np.asarray(logits, dtype=np.float64)) for _ in range(n)}


def test_the_sampler_draws_only_among_the_k_likeliest():
    logits = [0.0, 3.0, 2.9, 2.8, 1.0, 2.7]
    assert _draws(SamplingParams(temperature=5.0, top_p=1.0), logits) == set(range(6))
    assert _draws(SamplingParams(temperature=5.0, top_p=1.0, top_k=3), logits) == {1, 2, 3}
    assert _draws(SamplingParams(temperature=5.0, top_p=1.0, top_k=1), logits) == {1}
    assert _draws(SamplingParams(temperature=5.0, top_p=1.0, top_k=99), logits) == set(range(6))
    # top_p works on what top_k kept (transformers' order): of three nearly equal tokens, 0.5 keeps two
    assert _draws(SamplingParams(temperature=100.0, top_p=0.5, top_k=3), logits) == {1, 2}


@pytest.mark.parametrize("bad", [-1, 1.5, True, "3"])
def test_a_bad_top_k_is_refused(bad):
    with pytest.raises(UserError, match=r"--top-k must be an integer >= 0 \(0: off\)"):
        SamplingParams(temperature=1.0, top_k=bad).validate()
    with pytest.raises(UserError, match=r"^top_k: must be an integer >= 0 \(0: off\)"):
        GenerationSettings(top_k=bad)


def test_pytorch_sampling_applies_no_top_k_unless_asked(engines, monkeypatch):  # noqa: F811
    from transformers.generation import logits_process

    made = []
    real = logits_process.TopKLogitsWarper.__init__

    def recording(self, top_k, *args, **kwargs):
        made.append(top_k)
        real(self, top_k, *args, **kwargs)

    monkeypatch.setattr(logits_process.TopKLogitsWarper, "__init__", recording)
    torch_engine = engines[0]
    messages = _talkative(torch_engine)
    hot = GenerationSettings(max_new_tokens=4, temperature=1.5, top_p=1.0, seed=3)
    torch_engine.chat(messages, hot)
    assert made == []  # transformers' default top_k 50 was applied here before
    torch_engine.chat(messages, hot.with_(top_k=5))
    assert made == [5]


def test_top_k_1_samples_the_greedy_answer_on_both_backends(engines):  # noqa: F811
    for engine in engines:
        messages = _talkative(engine)
        greedy = GenerationSettings(max_new_tokens=10)
        want = engine.chat(messages, greedy)
        for seed in (1, 2, 3):
            assert engine.chat(messages, greedy.with_(temperature=2.0, top_p=1.0, top_k=1, seed=seed)) == want


@pytest.mark.parametrize("sent, want", [(5, 5), (0, 0), (-1, 0)])
def test_the_server_takes_top_k_as_vllm_and_llama_cpp_do(engines, sent, want):  # noqa: F811
    from tinygpt.serve.app import create_app
    from tinygpt.serve.background import BackgroundServer

    seen = []

    def recording(messages, settings, cancel=None):
        seen.append(settings.top_k)
        return engines[1].stream(messages, settings, cancel)

    with BackgroundServer(create_app(Wrapped(engines[1], stream=recording), NAME, LIMITS)) as running:
        body = {"model": NAME, "messages": [user("Hello")], "temperature": 1.0, "max_tokens": 3, "top_k": sent}
        assert post(running, body).status_code == 200
        assert seen == [want]


@pytest.mark.parametrize("sent", [-2, "5", True, 2.5])
def test_a_bad_top_k_is_a_400_naming_the_field(engines, sent):  # noqa: F811
    from tinygpt.serve.app import create_app
    from tinygpt.serve.background import BackgroundServer

    with BackgroundServer(create_app(engines[1], NAME, LIMITS)) as running:
        reply = post(running, {"model": NAME, "messages": [user("Hello")], "top_k": sent})
        assert reply.status_code == 400
        assert reply.json()["error"]["param"] == "top_k"


def test_lmms_eval_gen_kwargs_top_k_applies_when_sampling():
    base = GenerationSettings()
    assert generation_settings({"temperature": 0.7, "top_k": 5}, base) == GenerationSettings(temperature=0.7, top_k=5)
    assert generation_settings({"top_k": 5}, base) == base  # greedy: top_k means nothing
    assert generation_settings({"do_sample": True, "top_k": 1}, base) == base  # top_k 1 is greedy
    hot = GenerationSettings(temperature=0.7)
    assert generation_settings({"temperature": 0.7, "top_k": -1}, base) == hot  # vLLM's "off"
    assert generation_settings({"temperature": 0.7, "top_k": 50.0}, base) == hot.with_(top_k=50)
    with pytest.raises(UserError, match=r"^gen_kwargs\.top_k: must be an integer >= 0"):
        generation_settings({"temperature": 0.7, "top_k": 2.5}, base)


def test_the_demo_takes_a_config_s_top_p_below_the_slider_s_usual_floor(tmp_path):
    from test_demo import Scripted, demo_config
    from tinygpt.demo.handlers import Handlers

    cfg = demo_config()
    cfg = type(cfg)(cfg.source, cfg.model, cfg.generation.with_(top_p=0.01), cfg.limits)
    handlers = Handlers(Scripted("fine"), cfg, tmp_path)  # type: ignore[arg-type]
    assert handlers.ranges["top_p"] == (0.01, 1.0)
    assert handlers.generation_settings(10, 0.7, 0.01, 1.0, 0).top_p == 0.01  # the untouched slider's value


def test_the_chat_commands_take_top_k():
    import argparse

    from quantize.chat import add_arguments
    from tinygpt.chat.cli import SETTING_FLAGS, build_parser

    assert build_parser().parse_args(["--gguf", "g", "--top-k", "7"]).top_k == 7 and "top_k" in SETTING_FLAGS
    quantize_chat = argparse.ArgumentParser()
    add_arguments(quantize_chat)
    assert quantize_chat.parse_args(["--gguf", "g", "--top-k", "7"]).top_k == 7
