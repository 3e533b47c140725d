"""``POST /v1/completions`` (tinygpt.serve.completions) and the chat engine's raw-prompt path under it
(`ChatEngine.complete`): the real app under uvicorn over the tiny GGUF model (and once the PyTorch one), driven by
the official `openai` client and httpx.

Covered: plain and streamed answers equal the engine's raw path, both backends agreeing on it; ``usage`` and
``finish_reason`` from the ids generated; a stop string cuts the text exactly; seeded sampling; the unsupported
parameters and malformed prompts refused by name; the queue shared with chat (429); a cancelled raw stream ends
early on both backends. Helpers: tests/server_fixtures.py."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from server_fixtures import LIMITS, NAME, SETTINGS, Wrapped, gguf_engine, openai, openai_client, user
from tinygpt.chat import ChatEngine
from tinygpt.chat.launch import Limits
from tinygpt.serve.app import create_app
from tinygpt.serve.background import BackgroundServer

PROMPT = "The red circle is"


@pytest.fixture(scope="module")
def engine(chat_model):
    return gguf_engine(chat_model)


@pytest.fixture(scope="module")
def torch_engine(chat_model):
    from tinygpt.chat.torch_backend import TorchBackend
    from tinygpt.model import load_vlm

    return ChatEngine(TorchBackend(load_vlm(chat_model[0])), SETTINGS)


@pytest.fixture(scope="module")
def server(engine):
    with BackgroundServer(create_app(engine, NAME, LIMITS)) as running:
        yield running


def _post(server, body) -> httpx.Response:
    return httpx.post(server.url + "/v1/completions", json=body, timeout=60)


def _error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    return response.json()["error"]


# ------------------------------------------------------------------------------------------------ answers
def test_the_engines_raw_path_is_the_prompt_continued_as_it_is(engine, torch_engine):
    settings = SETTINGS.with_(max_new_tokens=10)
    want = torch_engine.complete(PROMPT, settings)
    stats = torch_engine.backend.last_stats
    ids = torch_engine.backend.tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    assert (stats.prompt_tokens, stats.generated_tokens) == (1 + len(ids), 10)  # [BOS] + the prompt, no template
    assert engine.complete(PROMPT, settings) == want and engine.backend.last_stats == stats
    for each in (engine, torch_engine):
        assert "".join(each.complete_stream(PROMPT, settings)) == want
    assert want.strip() and want != want.strip()  # the text exactly as generated: this one starts with a space


def test_completions_plain_and_streamed_equal_the_engines(server, engine):
    client = openai_client(server)
    want = engine.complete(PROMPT, SETTINGS)
    stats = engine.backend.last_stats
    reply = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=12, user="someone")
    assert reply.object == "text_completion" and reply.id.startswith("cmpl-") and reply.model == NAME
    choice = reply.choices[0]
    assert (choice.index, choice.text, choice.finish_reason) == (0, want, stats.finish_reason)
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (stats.prompt_tokens, stats.generated_tokens)
    assert reply.usage.total_tokens == stats.prompt_tokens + stats.generated_tokens
    assert client.completions.create(model=NAME, prompt=[PROMPT], max_tokens=12).choices[0].text == want
    chunks = list(client.completions.create(model=NAME, prompt=PROMPT, max_tokens=12, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want
    assert all(c.object == "text_completion" and c.id == chunks[0].id for c in chunks)
    assert chunks[-2].choices[0].finish_reason == stats.finish_reason and chunks[-2].choices[0].text == ""
    assert all(c.choices[0].finish_reason is None for c in chunks[:-2])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == stats.generated_tokens
    one = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=1)
    assert one.usage.completion_tokens == 1 and one.choices[0].finish_reason == "length"


def test_the_stream_on_the_wire(server):
    body = {"model": NAME, "prompt": PROMPT, "max_tokens": 4, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    assert all("usage" not in json.loads(line.removeprefix("data: ")) for line in lines[:-1])


def test_stop_and_seeded_sampling_reach_the_engine(server, engine):
    client = openai_client(server)
    full = engine.complete(PROMPT, SETTINGS)
    stop = full[4:6]
    assert stop.strip() and full.index(stop) > 0
    cut = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=12, stop=[stop])
    assert cut.choices[0].text == full[:full.index(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=12, stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == full[:full.index(stop)]
    hot = {"temperature": 1.5, "top_p": 1.0, "seed": 7, "max_tokens": 8}
    response = _post(server, {"model": NAME, "prompt": PROMPT, **hot})
    want = engine.complete(PROMPT, SETTINGS.with_(temperature=1.5, top_p=1.0, seed=7, max_new_tokens=8))
    assert response.json()["choices"][0]["text"] == want and response.headers["x-tinygpt-seed"] == "7"


def test_the_pytorch_backend_through_the_server(torch_engine):
    want = torch_engine.complete(PROMPT, SETTINGS.with_(max_new_tokens=6))
    with BackgroundServer(create_app(torch_engine, NAME, LIMITS)) as running:
        client = openai_client(running)
        reply = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=6)
        assert reply.choices[0].text == want and reply.usage.completion_tokens == 6
        streamed = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=6, stream=True)
        assert "".join(c.choices[0].text for c in streamed) == want


# ------------------------------------------------------------------------------------------------ refusals
UNSUPPORTED = [("n", {"n": 2}, None), ("echo", {"echo": True}, "unsupported_parameter"),
               ("logprobs", {"logprobs": 2}, "unsupported_parameter"),
               ("logprobs", {"logprobs": 0}, "unsupported_parameter"),  # 0: the chosen tokens' log-probabilities
               ("best_of", {"best_of": 3}, "unsupported_parameter"),
               ("suffix", {"suffix": " the end."}, "unsupported_parameter")]


@pytest.mark.parametrize("field, extra, code", UNSUPPORTED,
                         ids=[f"{f[0]}={list(f[1].values())[0]}" for f in UNSUPPORTED])
def test_unsupported_parameters_are_refused_by_name(server, field, extra, code):
    error = _error(_post(server, {"model": NAME, "prompt": PROMPT, **extra}), 400)
    assert error["param"] == field and error["code"] == code and field in error["message"], error
    with pytest.raises(openai.BadRequestError):  # what the client raises
        openai_client(server).completions.create(model=NAME, prompt=PROMPT, **extra)


def test_harmless_values_of_those_parameters_are_accepted(server):
    harmless = {"n": 1, "echo": False, "best_of": 1, "logprobs": None, "suffix": None, "user": "me", "max_tokens": 2}
    assert _post(server, {"model": NAME, "prompt": PROMPT, **harmless}).status_code == 200


@pytest.mark.parametrize("prompt, words", [
    (5, "got a number"), (None, "got null"), ({"text": "x"}, "got an object"), ([], "got an empty list"),
    (["a", "b"], "got 2 prompts"), ([7, 8], "got token ids"), ([[1, 2]], "got token ids"),
    (["a", None], "got a list holding a string and null"),
])
def test_a_prompt_that_is_not_one_string_is_refused(server, prompt, words):
    error = _error(_post(server, {"model": NAME, "prompt": prompt}), 400)
    assert error["param"] == "prompt" and "expected a string or a list holding one string" in error["message"]
    assert words in error["message"], error


def test_other_refusals_are_chats(server, engine):
    assert _error(_post(server, {"model": NAME}), 400)["param"] == "prompt"  # "Field required"
    assert _error(_post(server, {"model": "gpt-3.5-turbo-instruct", "prompt": "x"}), 404)["code"] == "model_not_found"
    assert _error(_post(server, {"model": NAME, "prompt": "x", "max_tokens": "9"}), 400)["param"] == "max_tokens"
    too_long = _error(_post(server, {"model": NAME, "prompt": "word " * engine.context_length}), 400)
    assert too_long["code"] == "context_length_exceeded" and "the prompt needs" in too_long["message"]
    streamed = _post(server, {"model": NAME, "prompt": "word " * engine.context_length, "stream": True})
    assert _error(streamed, 400)["code"] == "context_length_exceeded"
    assert httpx.get(server.url + "/health").json()["queue"]["depth"] == 0


# ------------------------------------------------------------------------------------------------ the queue, cancelling
def test_completions_share_the_queue_with_chat(engine):
    started = threading.Event()

    def endless(messages, settings, cancel):
        started.set()
        while not cancel.is_set():
            time.sleep(0.01)
            yield "w "

    app = create_app(Wrapped(engine, stream=endless), NAME, Limits(queue_size=1))
    with BackgroundServer(app) as running:
        body = {"model": NAME, "messages": [user("go on")], "stream": True}
        with httpx.stream("POST", running.url + "/v1/chat/completions", json=body, timeout=30) as held:
            lines = held.iter_lines()  # kept: a dropped iterator closes the connection
            assert next(lines).startswith("data: ") and started.is_set()
            refused = _post(running, {"model": NAME, "prompt": PROMPT, "max_tokens": 2})
            assert _error(refused, 429)["code"] == "queue_full" and refused.headers["retry-after"] == "1"
        deadline = time.monotonic() + 10
        while httpx.get(running.url + "/health").json()["queue"]["depth"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _post(running, {"model": NAME, "prompt": PROMPT, "max_tokens": 2}).status_code == 200


def test_a_cancelled_raw_stream_ends_early_on_both_backends(engine, torch_engine):
    long = SETTINGS.with_(max_new_tokens=60)
    for each in (engine, torch_engine):
        cancel = threading.Event()
        stream = each.complete_stream(PROMPT, long, cancel=cancel)
        next(stream)
        cancel.set()
        list(stream)
        stats = each.backend.last_stats
        assert stats.generated_tokens < 60 and stats.stopped_by == "cancelled", (each.name, stats)
        assert each.complete(PROMPT, SETTINGS.with_(max_new_tokens=2))  # the engine is free again
