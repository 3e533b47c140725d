"""The OpenAI-compatible server (tinygpt.serve): the real app under uvicorn on a free port, a tiny random model behind
it (GGUF F16 and PyTorch), driven by the official `openai` client and by httpx.

Covered: answers and streams equal to the engine's; settings reaching the engine (stop, seeded sampling); images as
data: URIs; boxes in pixels of the last image; the bounded queue (200 or 429, nothing lost); a client leaving
mid-stream cancels its generation; an unexpected failure is a 500 and the server stays up; the command line's errors,
its log line and a real `tinygpt serve` process. The refusals (every bad input a 4xx OpenAI-style error, the API key,
remote and local image URLs) are in tests/test_server_refusals.py; the shared helpers in tests/server_fixtures.py."""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from server_fixtures import (
    LIMITS, NAME, REPO, SETTINGS, Wrapped, data_uri, gguf_engine, image_url, openai, openai_client, png, post,
    stream_text, user,
)
from tinygpt.chat import ChatEngine
from tinygpt.chat.launch import Limits
from tinygpt.cli import main as tinygpt
from tinygpt.serve.app import create_app
from tinygpt.serve.background import BackgroundServer, listen
from tinygpt.paths import display_path


# ------------------------------------------------------------------------------------------------ the model, served
@pytest.fixture(scope="module")
def engine(chat_model):
    return gguf_engine(chat_model)


@pytest.fixture(scope="module")
def server(engine):
    with BackgroundServer(create_app(engine, NAME, LIMITS)) as running:
        yield running


# ------------------------------------------------------------------------------------------------ answers
def test_answers_and_streams_equal_the_engines(server, engine):
    client = openai_client(server)
    conversations = [[user("Hello there")], [user(png(0), "What is in the picture?")],
                     [user(png(1, (64, 64)), "compare", png(0)), {"role": "assistant", "content": "the same"},
                      user("and now?")]]
    answers = []
    for messages in conversations:
        want = engine.chat(messages, SETTINGS)
        answers.append(want)
        reply = client.chat.completions.create(model=NAME, messages=messages, max_tokens=12)
        choice = reply.choices[0]
        assert (choice.message.role, choice.message.content) == ("assistant", want)
        assert choice.finish_reason in ("stop", "length") and choice.message.boxes == []
        assert reply.object == "chat.completion" and reply.model == NAME and reply.id.startswith("chatcmpl-")
        n_images = sum(part["type"] == "image_url" for m in messages if m["role"] == "user" for part in m["content"])
        assert 0 < reply.usage.completion_tokens <= 12 and reply.usage.prompt_tokens > 32 * n_images
        text, chunks = stream_text(client, messages, max_tokens=12, stream_options={"include_usage": True})
        assert text == want
        assert chunks[0].choices[0].delta.role == "assistant"
        assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
        last = chunks[-2].choices[0]
        assert last.finish_reason == choice.finish_reason and last.delta.boxes == []
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == reply.usage.completion_tokens
    assert any(answers)


def test_sse_wire_format_ends_with_done(server):
    body = {"model": NAME, "messages": [user("Hello there")], "max_tokens": 4, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"


def test_settings_reach_the_engine(server, engine):
    client = openai_client(server)
    messages = [user("Tell me a story")]
    full = engine.chat(messages, SETTINGS)
    assert len(full) >= 6, "the random model answers this prompt with some text"
    stop = full[3:5]
    cut = client.chat.completions.create(model=NAME, messages=messages, max_tokens=12, stop=[stop])
    assert cut.choices[0].message.content == engine.chat(messages, SETTINGS.with_(stop=(stop,))) != full
    assert cut.choices[0].finish_reason == "stop"
    hot = {"temperature": 1.5, "top_p": 1.0, "seed": 7, "max_completion_tokens": 8}
    first = client.chat.completions.create(model=NAME, messages=messages, **hot).choices[0].message.content
    assert first == engine.chat(messages, SETTINGS.with_(temperature=1.5, top_p=1.0, seed=7, max_new_tokens=8))
    assert stream_text(client, messages, **hot)[0] == first
    one = client.chat.completions.create(model=NAME, messages=messages, max_tokens=1)
    assert one.usage.completion_tokens == 1 and one.choices[0].finish_reason == "length"


def test_what_harnesses_send_is_accepted(server, engine):
    """lmms-eval's and VLMEvalKit's payloads: nulls, fields this server ignores, an image_url with `detail`."""
    image = image_url(data_uri(png(0)))
    image["image_url"]["detail"] = "low"
    messages = [{"role": "system", "content": "Answer briefly."}, user(image, "What is in the picture?")]
    body = {"model": NAME, "messages": messages, "max_tokens": 8, "temperature": 0, "n": None, "stream": None,
            "seed": None, "stop": None, "user": "eval", "presence_penalty": 0, "frequency_penalty": 0,
            "response_format": {"type": "text"}}
    response = post(server, body)
    assert response.status_code == 200, response.text
    want = engine.chat(messages, SETTINGS.with_(max_new_tokens=8))  # the engine ignores `detail` too
    assert response.json()["choices"][0]["message"]["content"] == want
    # lmms-eval asks for up to 4096 new tokens: cut to the room the context has left, not refused
    nearly_full = [user("word " * 1000)]
    reply = openai_client(server).chat.completions.create(model=NAME, messages=nearly_full, max_tokens=4096)
    assert reply.usage.prompt_tokens + reply.usage.completion_tokens <= engine.context_length


def test_pytorch_backend_through_the_server(chat_model):
    from tinygpt.chat.torch_backend import TorchBackend
    from tinygpt.model import load_vlm

    torch_engine = ChatEngine(TorchBackend(load_vlm(chat_model[0])), SETTINGS)
    messages = [user(png(0), "What is in the picture?")]
    want = torch_engine.chat(messages, SETTINGS.with_(max_new_tokens=6))
    with BackgroundServer(create_app(torch_engine, NAME, LIMITS)) as running:
        client = openai_client(running)
        reply = client.chat.completions.create(model=NAME, messages=messages, max_tokens=6)
        assert reply.choices[0].message.content == want
        assert stream_text(client, messages, max_tokens=6)[0] == want
        assert reply.usage.prompt_tokens > 32 and reply.usage.completion_tokens <= 6
        assert httpx.get(running.url + "/health").json()["backend"] == "torch:cpu"


def test_boxes_come_back_in_pixels_of_the_last_image(engine):
    answer = "<p>the cat</p> {<10><20><50><60>}"

    def pieces(messages, settings, cancel):
        yield from (answer[:9], answer[9:])

    canned = Wrapped(engine, chat=lambda messages, settings: answer, stream=pieces)
    messages = [user(png(0, (64, 64)), "and", png(1, (100, 200)), "[refer] the cat")]  # the last is 200 x 100
    want = [{"phrase": "the cat", "box": [20.0, 20.0, 100.0, 60.0]}]
    with BackgroundServer(create_app(canned, NAME, LIMITS)) as running:
        client = openai_client(running)
        message = client.chat.completions.create(model=NAME, messages=messages).choices[0].message
        assert message.content == answer and message.boxes == want
        text, chunks = stream_text(client, messages)
        assert text == answer and chunks[-1].choices[0].delta.boxes == want
        no_image = client.chat.completions.create(model=NAME, messages=[user("[refer] the cat")])
        assert no_image.choices[0].message.boxes == []


def test_models_and_health(server, engine):
    client = openai_client(server)
    assert [m.id for m in client.models.list()] == [NAME]
    assert client.models.retrieve(NAME).id == NAME
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")
    health = httpx.get(server.url + "/health").json()
    assert health == {"status": "ok", "model": NAME, "backend": "gguf", "context_length": engine.context_length,
                      "queue": {"depth": 0, "size": LIMITS.queue_size}}


# ------------------------------------------------------------------------------------------------ load
def test_a_full_queue_refuses_at_once_and_loses_nothing(engine):
    def slow_chat(messages, settings):
        time.sleep(1.0)
        return engine.chat(messages, settings)

    def slow_stream(messages, settings, cancel):  # what the server runs for a non-streamed answer too
        time.sleep(1.0)
        return engine.stream(messages, settings, cancel)

    app = create_app(Wrapped(engine, chat=slow_chat, stream=slow_stream), NAME, Limits(queue_size=2))
    outcomes: list = []
    start = threading.Barrier(10)

    def ask(k: int):
        client = openai_client(running)
        start.wait()
        t0 = time.monotonic()
        try:
            reply = client.chat.completions.create(model=NAME, messages=[user(f"question {k}")], max_tokens=3)
            outcomes.append((200, reply.choices[0].message.content, time.monotonic() - t0))
        except openai.RateLimitError as err:
            outcomes.append((429, err.body, time.monotonic() - t0))
        except Exception as err:  # recorded, so that the assertion below shows it
            outcomes.append((None, repr(err), time.monotonic() - t0))

    with BackgroundServer(app) as running:
        threads = [threading.Thread(target=ask, args=(k,)) for k in range(10)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert not any(t.is_alive() for t in threads), "a request hung"
        statuses = [o[0] for o in outcomes]
        assert len(outcomes) == 10 and set(statuses) == {200, 429}, outcomes
        refused = [o for o in outcomes if o[0] == 429]
        assert all(o[1]["code"] == "queue_full" and "queue_size = 2" in o[1]["message"] for o in refused)
        assert all(o[2] < 0.9 for o in refused), "a refusal waited for the engine"
        health = httpx.get(running.url + "/health").json()
        assert health["status"] == "ok" and health["queue"] == {"depth": 0, "size": 2}
        assert openai_client(running).chat.completions.create(model=NAME, messages=[user("again")], max_tokens=2)


def test_a_client_that_leaves_cancels_its_stream(engine):
    produced = []
    cancels: list[threading.Event] = []

    def endless(messages, settings, cancel):
        cancels.append(cancel)
        for k in range(2000):
            if cancel.is_set():
                return
            time.sleep(0.01)
            produced.append(k)
            yield f"w{k} "

    with BackgroundServer(create_app(Wrapped(engine, stream=endless), NAME, LIMITS)) as running:
        body = {"model": NAME, "messages": [user("go on")], "stream": True}
        with httpx.stream("POST", running.url + "/v1/chat/completions", json=body, timeout=30) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")
        deadline = time.monotonic() + 10
        while httpx.get(running.url + "/health").json()["queue"]["depth"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert cancels and cancels[0].is_set(), "the generation was not cancelled"
        assert len(produced) < 1000
        assert httpx.get(running.url + "/health").json()["queue"]["depth"] == 0


def test_an_unexpected_failure_is_a_500_and_the_server_stays_up(engine, caplog):
    def broken(*args):
        raise RuntimeError("secret internals")

    with BackgroundServer(create_app(Wrapped(engine, chat=broken, stream=broken), NAME, LIMITS)) as running:
        for stream in (False, True):
            response = post(running, {"model": NAME, "messages": [user("hi")], "stream": stream})
            assert response.status_code == 500
            error = response.json()["error"]
            assert error["type"] == "server_error" and error["code"] == "internal_error"
            assert "secret" not in response.text and "Traceback" not in response.text
        assert httpx.get(running.url + "/health").json()["queue"]["depth"] == 0
    assert "secret internals" in caplog.text  # logged on the server


# ------------------------------------------------------------------------------------------------ the command
def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_bad_configs_and_a_busy_port_are_one_error_line(chat_model, tmp_path, capsys):
    assert tinygpt(["serve", "--cfg-path", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml: launch config does not exist" in _one_error_line(capsys)
    (tmp_path / "bad.yaml").write_text("model:\n  backend: gguf\n  path: /no/such/dir\nlimits:\n  queue_sise: 3\n")
    assert tinygpt(["serve", "--cfg-path", str(tmp_path / "bad.yaml")]) == 2
    assert "unknown key limits.queue_sise (did you mean 'queue_size'?)" in _one_error_line(capsys)
    (tmp_path / "empty.yaml").write_text("model:\n  backend: gguf\n  path: /no/such/dir\n")
    assert tinygpt(["serve", "--cfg-path", str(tmp_path / "empty.yaml")]) == 2
    assert "model.path /no/such/dir does not exist; export one first" in _one_error_line(capsys)
    (tmp_path / "good.yaml").write_text(f"model:\n  backend: gguf\n  path: {chat_model[1]}\n")
    taken = listen("127.0.0.1", 0)
    try:
        assert tinygpt(["serve", "--cfg-path", str(tmp_path / "good.yaml"), "--port", str(taken.getsockname()[1])]) == 2
        assert "cannot listen on 127.0.0.1:" in _one_error_line(capsys)
    finally:
        taken.close()


def test_the_log_line_shows_a_clean_model_path(chat_model, tmp_path, monkeypatch, caplog):
    """A model path written as ../../.. from a deep working directory is logged absolute, resolved; one under the
    working directory stays relative when that is shorter."""
    import uvicorn

    deep = tmp_path / "a" / "b"
    deep.mkdir(parents=True)
    monkeypatch.chdir(deep)
    relative = os.path.relpath(chat_model[1])
    assert relative.startswith("../../")
    (tmp_path / "far.yaml").write_text(f"model:\n  backend: gguf\n  path: {relative}\n  threads: 1\n")
    taken: list = []
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets: taken.extend(sockets))  # log, do not serve
    caplog.set_level(logging.INFO, logger="tinygpt.serve")
    try:
        assert tinygpt(["serve", "--cfg-path", "../../far.yaml", "--port", "0"]) == 0
    finally:
        for sock in taken:
            sock.close()
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("serving 'far'"))
    assert f"serving 'far' (gguf:{chat_model[1].resolve()} (" in line and "../" not in line, line
    shown = display_path("../b/model"), display_path(deep / "m"), display_path("..")
    assert shown == ("model", "m", str(deep.parent.resolve()))


@pytest.mark.slow
def test_tinygpt_serve_runs_the_launch_config(chat_model, tmp_path):
    cfg = tmp_path / "served.yaml"
    cfg.write_text(f"model:\n  backend: gguf\n  path: {chat_model[1]}\n  threads: 1\n"
                   "generation:\n  max_new_tokens: 5\nlimits:\n  queue_size: 2\n")
    env = dict(os.environ, TINYGPT_API_KEY="k3y", PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-m", "tinygpt.serve", "--cfg-path", str(cfg), "--port", "0",
                             "--model-name", "served"], env=env, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        url = None
        for line in proc.stderr:
            if "serving 'served'" in line:
                url = re.search(r"http://\S+/v1", line).group(0)
                break
        assert url and "(API key required)" in line, "the server did not start"
        rest: list[str] = []
        drain = threading.Thread(target=lambda: rest.extend(proc.stderr), daemon=True)  # keep the pipe drained
        drain.start()
        deadline = time.monotonic() + 30
        while True:
            try:
                assert httpx.get(url.removesuffix("/v1") + "/health").json()["queue"] == {"depth": 0, "size": 2}
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline
                time.sleep(0.1)
        client = openai.OpenAI(base_url=url, api_key="k3y", max_retries=0, timeout=60)
        reply = client.chat.completions.create(model="served", messages=[user("Hello there")])
        assert reply.usage.completion_tokens <= 5
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url, api_key="nope", max_retries=0).models.list()
    finally:
        proc.send_signal(signal.SIGINT)  # Ctrl+C: a graceful stop, exit status 0, no traceback
        status = proc.wait(timeout=30)
    drain.join(timeout=10)
    assert status == 0 and "Traceback" not in "".join(rest), rest
