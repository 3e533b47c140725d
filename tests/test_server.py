"""The OpenAI-compatible server (tinygpt.serve): the real app under uvicorn on a free port, a tiny random model behind
it (GGUF F16 and PyTorch), driven by the official `openai` client and by httpx for the raw refusals.

Covered: answers and streams equal to the engine's; settings reaching the engine (stop, seeded sampling); images as
data: URIs; boxes in pixels of the last image; the bounded queue (200 or 429, nothing lost); every bad input a 4xx
OpenAI-style error; the API key; remote and local image URLs; a client leaving mid-stream cancels its generation; an
unexpected failure is a 500 and the server stays up; the command line's errors and a real `tinygpt serve` process."""

from __future__ import annotations

import base64
import io
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tinygpt.chat import ChatEngine, GenerationSettings
from tinygpt.chat.launch import Limits
from tinygpt.serve.app import create_app
from tinygpt.cli import main as tinygpt
from tinygpt.serve.background import BackgroundServer, listen
from tinygpt.serve.errors import APIError
from tinygpt.serve.images import image_size

openai = pytest.importorskip("openai")

REPO = Path(__file__).resolve().parents[1]
NAME = "tiny"
LIMITS = Limits(max_images=4, max_image_pixels=16_000_000, max_upload_bytes=2_000_000, queue_size=4)
SETTINGS = GenerationSettings(max_new_tokens=12)


def _png(seed: int, size=(90, 130)) -> Image.Image:
    return Image.fromarray((np.random.default_rng(seed).random((*size, 3)) * 255).astype(np.uint8))


def _data_uri(image: Image.Image | bytes) -> str:
    if isinstance(image, Image.Image):
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        image = buf.getvalue()
    return "data:image/png;base64," + base64.b64encode(image).decode()


def _blank_png(width: int, height: int) -> bytes:
    """A real, tiny PNG of a huge 1-bit image (50 megapixels fit in a few kB)."""
    buf = io.BytesIO()
    Image.new("1", (width, height)).save(buf, format="PNG")
    return buf.getvalue()


def _url(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def _user(*parts) -> dict:
    """Strings are text parts, PIL images data-URI image parts, dicts parts as they are (`_url`)."""
    return {"role": "user", "content": [{"type": "text", "text": p} if isinstance(p, str) else
                                        _url(_data_uri(p)) if isinstance(p, Image.Image) else p for p in parts]}


# ------------------------------------------------------------------------------------------------ the model, served
@pytest.fixture(scope="module")
def engine(chat_model):
    from tinygpt.chat.gguf_backend import GGUFBackend

    return ChatEngine(GGUFBackend.load(chat_model[1], vision_int8=False), SETTINGS)


@pytest.fixture(scope="module")
def server(engine):
    with BackgroundServer(create_app(engine, NAME, LIMITS)) as running:
        yield running


def _client(server, key: str = "unused") -> "openai.OpenAI":
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=60)


def _post(server, body, **kw) -> httpx.Response:
    if not isinstance(body, (dict, list)):  # raw bytes, or a generator of them (sent without a Content-Length)
        return httpx.post(server.url + "/v1/chat/completions", content=body, timeout=60,
                          headers={"content-type": "application/json"}, **kw)
    return httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60, **kw)


class Wrapped:
    """An engine with some entry points replaced (slow, canned or failing answers); the rest is the real one."""

    def __init__(self, engine, chat=None, stream=None):
        self._engine, self._chat, self._stream = engine, chat, stream

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def chat(self, messages, settings=None):
        return (self._chat or self._engine.chat)(messages, settings)

    def stream(self, messages, settings=None, cancel=None):
        return (self._stream or self._engine.stream)(messages, settings, cancel)


# ------------------------------------------------------------------------------------------------ answers
def _stream_text(client, messages, **kw) -> tuple[str, list]:
    chunks = list(client.chat.completions.create(model=NAME, messages=messages, stream=True, **kw))
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), chunks


def test_answers_and_streams_equal_the_engines(server, engine):
    client = _client(server)
    conversations = [[_user("Hello there")], [_user(_png(0), "What is in the picture?")],
                     [_user(_png(1, (64, 64)), "compare", _png(0)), {"role": "assistant", "content": "the same"},
                      _user("and now?")]]
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
        text, chunks = _stream_text(client, messages, max_tokens=12, stream_options={"include_usage": True})
        assert text == want
        assert chunks[0].choices[0].delta.role == "assistant"
        assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
        last = chunks[-2].choices[0]
        assert last.finish_reason == choice.finish_reason and last.delta.boxes == []
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == reply.usage.completion_tokens
    assert any(answers)


def test_sse_wire_format_ends_with_done(server):
    body = {"model": NAME, "messages": [_user("Hello there")], "max_tokens": 4, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"


def test_settings_reach_the_engine(server, engine):
    client = _client(server)
    messages = [_user("Tell me a story")]
    full = engine.chat(messages, SETTINGS)
    assert len(full) >= 6, "the random model answers this prompt with some text"
    stop = full[3:5]
    cut = client.chat.completions.create(model=NAME, messages=messages, max_tokens=12, stop=[stop])
    assert cut.choices[0].message.content == engine.chat(messages, SETTINGS.with_(stop=(stop,))) != full
    assert cut.choices[0].finish_reason == "stop"
    hot = {"temperature": 1.5, "top_p": 1.0, "seed": 7, "max_completion_tokens": 8}
    first = client.chat.completions.create(model=NAME, messages=messages, **hot).choices[0].message.content
    assert first == engine.chat(messages, SETTINGS.with_(temperature=1.5, top_p=1.0, seed=7, max_new_tokens=8))
    assert _stream_text(client, messages, **hot)[0] == first
    one = client.chat.completions.create(model=NAME, messages=messages, max_tokens=1)
    assert one.usage.completion_tokens == 1 and one.choices[0].finish_reason == "length"


def test_what_harnesses_send_is_accepted(server, engine):
    """lmms-eval's and VLMEvalKit's payloads: nulls, fields this server ignores, an image_url with `detail`."""
    image = _url(_data_uri(_png(0)))
    image["image_url"]["detail"] = "low"
    messages = [{"role": "system", "content": "Answer briefly."}, _user(image, "What is in the picture?")]
    body = {"model": NAME, "messages": messages, "max_tokens": 8, "temperature": 0, "n": None, "stream": None,
            "seed": None, "stop": None, "user": "eval", "presence_penalty": 0, "frequency_penalty": 0,
            "response_format": {"type": "text"}}
    response = _post(server, body)
    assert response.status_code == 200, response.text
    want = engine.chat(messages, SETTINGS.with_(max_new_tokens=8))  # the engine ignores `detail` too
    assert response.json()["choices"][0]["message"]["content"] == want
    # lmms-eval asks for up to 4096 new tokens: cut to the room the context has left, not refused
    nearly_full = [_user("word " * 1000)]
    reply = _client(server).chat.completions.create(model=NAME, messages=nearly_full, max_tokens=4096)
    assert reply.usage.prompt_tokens + reply.usage.completion_tokens <= engine.context_length


def test_pytorch_backend_through_the_server(chat_model):
    from tinygpt.chat.torch_backend import TorchBackend
    from tinygpt.model import load_vlm

    torch_engine = ChatEngine(TorchBackend(load_vlm(chat_model[0])), SETTINGS)
    messages = [_user(_png(0), "What is in the picture?")]
    want = torch_engine.chat(messages, SETTINGS.with_(max_new_tokens=6))
    with BackgroundServer(create_app(torch_engine, NAME, LIMITS)) as running:
        client = _client(running)
        reply = client.chat.completions.create(model=NAME, messages=messages, max_tokens=6)
        assert reply.choices[0].message.content == want
        assert _stream_text(client, messages, max_tokens=6)[0] == want
        assert reply.usage.prompt_tokens > 32 and reply.usage.completion_tokens <= 6
        assert httpx.get(running.url + "/health").json()["backend"] == "torch:cpu"


def test_boxes_come_back_in_pixels_of_the_last_image(engine):
    answer = "<p>the cat</p> {<10><20><50><60>}"

    def pieces(messages, settings, cancel):
        yield from (answer[:9], answer[9:])

    canned = Wrapped(engine, chat=lambda messages, settings: answer, stream=pieces)
    messages = [_user(_png(0, (64, 64)), "and", _png(1, (100, 200)), "[refer] the cat")]  # the last is 200 x 100
    want = [{"phrase": "the cat", "box": [20.0, 20.0, 100.0, 60.0]}]
    with BackgroundServer(create_app(canned, NAME, LIMITS)) as running:
        client = _client(running)
        message = client.chat.completions.create(model=NAME, messages=messages).choices[0].message
        assert message.content == answer and message.boxes == want
        text, chunks = _stream_text(client, messages)
        assert text == answer and chunks[-1].choices[0].delta.boxes == want
        no_image = client.chat.completions.create(model=NAME, messages=[_user("[refer] the cat")])
        assert no_image.choices[0].message.boxes == []


def test_models_and_health(server, engine):
    client = _client(server)
    assert [m.id for m in client.models.list()] == [NAME]
    assert client.models.retrieve(NAME).id == NAME
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")
    health = httpx.get(server.url + "/health").json()
    assert health == {"status": "ok", "model": NAME, "backend": engine.name, "context_length": engine.context_length,
                      "queue": {"depth": 0, "size": LIMITS.queue_size}}


# ------------------------------------------------------------------------------------------------ load
def test_a_full_queue_refuses_at_once_and_loses_nothing(engine):
    def slow_chat(messages, settings):
        time.sleep(1.0)
        return engine.chat(messages, settings)

    app = create_app(Wrapped(engine, chat=slow_chat), NAME, Limits(queue_size=2))
    outcomes: list = []
    start = threading.Barrier(10)

    def ask(k: int):
        client = _client(running)
        start.wait()
        t0 = time.monotonic()
        try:
            reply = client.chat.completions.create(model=NAME, messages=[_user(f"question {k}")], max_tokens=3)
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
        assert _client(running).chat.completions.create(model=NAME, messages=[_user("again")], max_tokens=2)


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
        body = {"model": NAME, "messages": [_user("go on")], "stream": True}
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
            response = _post(running, {"model": NAME, "messages": [_user("hi")], "stream": stream})
            assert response.status_code == 500
            error = response.json()["error"]
            assert error["type"] == "server_error" and error["code"] == "internal_error"
            assert "secret" not in response.text and "Traceback" not in response.text
        assert httpx.get(running.url + "/health").json()["queue"]["depth"] == 0
    assert "secret internals" in caplog.text  # logged on the server


# ------------------------------------------------------------------------------------------------ refusals
def _too_many_images():
    return [_user(*([_png(0, (8, 8))] * 100), "count them")]


BAD_REQUESTS = [  # (name, request body or raw bytes, status, field, words the message holds)
    ("invalid JSON", b'{"model": "tiny", "messages": [', 400, None, "not valid JSON"),
    ("not an object", b'[1, 2]', 400, None, "valid dictionary"),
    ("no messages", {"model": NAME}, 400, "messages", "Field required"),
    ("messages not a list", {"model": NAME, "messages": "hi"}, 400, "messages", "valid list"),
    ("max_tokens not a number", {"model": NAME, "messages": [_user("x")], "max_tokens": "many"}, 400, "max_tokens",
     "valid integer"),
    ("max_tokens 0", {"model": NAME, "messages": [_user("x")], "max_tokens": 0}, 400, "max_tokens", "greater than"),
    ("negative temperature", {"model": NAME, "messages": [_user("x")], "temperature": -0.5}, 400, "temperature",
     "greater than or equal to 0"),
    ("top_p 0", {"model": NAME, "messages": [_user("x")], "top_p": 0}, 400, "top_p", "greater than 0"),
    ("stop not text", {"model": NAME, "messages": [_user("x")], "stop": 5}, 400, "stop", "a string or a list"),
    ("empty stop", {"model": NAME, "messages": [_user("x")], "stop": [""]}, 400, "stop", "non-empty"),
    ("stream not a bool", {"model": NAME, "messages": [_user("x")], "stream": "maybe"}, 400, "stream", "boolean"),
    ("n 2", {"model": NAME, "messages": [_user("x")], "n": 2}, 400, "n", "one choice"),
    ("tools", {"model": NAME, "messages": [_user("x")], "tools": [{"type": "function"}]}, 400, "tools",
     "not supported"),
    ("unknown role", {"model": NAME, "messages": [{"role": "bot", "content": "x"}]}, 400, "messages[0].role", "bot"),
    ("image from the assistant", {"model": NAME, "messages": [
        _user("x"), {"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": _data_uri(_png(0))}}]},
        _user("y")]}, 400, "messages[1].content", "images are only allowed in user messages"),
    ("not an image", {"model": NAME, "messages": [_user(_url(_data_uri(b"hello, I am text")), "x")]}, 400,
     "messages[0].content[0].image_url.url", "not a readable image"),
    ("malformed data URI", {"model": NAME, "messages": [_user(_url("data:image/png;base64,@@@@"), "x")]}, 400,
     "messages[0].content[0].image_url.url", "not valid base64"),
    ("data URI without base64", {"model": NAME, "messages": [_user(_url("data:image/png,abc"), "x")]}, 400,
     "messages[0].content[0].image_url.url", "must look like data:image/png;base64"),
    ("image URL not a string", {"model": NAME, "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": 7}}]}]}, 400,
     "messages[0].content[0].image_url.url", "URL string"),
    ("remote URL", {"model": NAME, "messages": [_user(_url("https://example.com/cat.png"), "x")]}, 400,
     "messages[0].content[0].image_url.url", "remote image URLs (https://) are not fetched"),
    ("local path without the flag", {"model": NAME, "messages": [_user(_url(str(REPO / "README.md")), "x")]}, 400,
     "messages[0].content[0].image_url.url", "--allow-local-images"),
    ("local path as an image part", {"model": NAME, "messages": [
        {"role": "user", "content": [{"type": "image", "image": "/etc/hostname"}]}]}, 400,
     "messages[0].content[0].image", "--allow-local-images"),
    ("100 images", {"model": NAME, "messages": _too_many_images()}, 400, "messages",
     "holds 100 images; this server takes at most 4"),
    ("50 megapixels", {"model": NAME, "messages": [_user(_url(_data_uri(_blank_png(10_000, 5_000))), "x")]}, 413,
     "messages[0].content[0].image_url.url", "10000 x 5000 = 50000000 pixels"),
    ("prompt too long", {"model": NAME, "messages": [_user("word " * 1100)]}, 400, None,
     "prompt too long: the conversation needs"),
    ("prompt too long, streamed", {"model": NAME, "messages": [_user("word " * 1100)], "stream": True}, 400, None,
     "holds 1024"),
    ("unknown model", {"model": "gpt-4o", "messages": [_user("x")]}, 404, "model", "'gpt-4o' does not exist"),
]


@pytest.mark.parametrize("name, body, status, field, words", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_a_bad_request_is_a_4xx_openai_error(server, name, body, status, field, words):
    t0 = time.monotonic()
    response = _post(server, body)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert words in error["message"] and error["param"] == field, error
    assert time.monotonic() - t0 < 5  # refused cheaply: nothing huge decoded, nothing generated


def test_codes_of_the_refusals_clients_act_on(server):
    too_long = _post(server, {"model": NAME, "messages": [_user("word " * 1100)]}).json()["error"]
    assert too_long["code"] == "context_length_exceeded" and "1024" in too_long["message"]
    assert _post(server, {"model": "x", "messages": [_user("x")]}).json()["error"]["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError, match="remote image URLs"):
        _client(server).chat.completions.create(model=NAME, messages=[_user(_url("http://127.0.0.1:1/x.png"), "x")])


def test_a_body_over_the_limit_is_413_unread(server):
    big = {"model": NAME, "messages": [_user("x" * (LIMITS.max_upload_bytes + 10))]}
    response = _post(server, big)
    assert response.status_code == 413
    assert "at most 2000000 bytes" in response.json()["error"]["message"]

    def chunks():  # no Content-Length: counted as it arrives
        yield b'{"model": "tiny", "messages": [{"role": "user", "content": "'
        for _ in range(30):
            yield b"x" * 100_000
        yield b'"}]}'

    response = _post(server, chunks())
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"
    assert httpx.get(server.url + "/nope").json()["error"]["message"] == "no such endpoint: GET /nope"
    assert httpx.get(server.url + "/v1/chat/completions").status_code == 405


def test_pils_decompression_bomb_guard_is_a_413():
    bomb = _blank_png(20_000, 10_000)  # 200 megapixels: over PIL's own limit, refused from the header
    with pytest.raises(APIError) as err:
        image_size(bomb, "image", 10**12)
    assert err.value.status == 413 and "more pixels than this server decodes" in err.value.message


def test_api_key(engine):
    with BackgroundServer(create_app(engine, NAME, LIMITS, api_key="sekret")) as running:
        messages = [_user("Hello there")]
        for key in ("wrong", ""):
            with pytest.raises(openai.AuthenticationError, match="API key"):
                _client(running, key or "-").chat.completions.create(model=NAME, messages=messages)
        response = _post(running, {"model": NAME, "messages": messages})
        assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(running.url + "/v1/models").status_code == 401
        assert httpx.get(running.url + "/health").status_code == 200
        reply = _client(running, "sekret").chat.completions.create(model=NAME, messages=messages, max_tokens=3)
        assert reply.choices[0].message.content == engine.chat(messages, SETTINGS.with_(max_new_tokens=3))


def test_local_images_only_with_the_flag(engine, tmp_path):
    image = _png(3)
    image.save(tmp_path / "cat.png")
    want = engine.chat([_user(image, "What is it?")], SETTINGS)
    with BackgroundServer(create_app(engine, NAME, LIMITS, allow_local_images=True)) as running:
        client = _client(running)
        for url in (str(tmp_path / "cat.png"), (tmp_path / "cat.png").as_uri()):
            reply = client.chat.completions.create(model=NAME, messages=[_user(_url(url), "What is it?")])
            assert reply.choices[0].message.content == want
        missing = _post(running, {"model": NAME, "messages": [_user(_url(str(tmp_path / "dog.png")), "x")]})
        assert missing.status_code == 400 and "image file not found" in missing.json()["error"]["message"]
        remote = _post(running, {"model": NAME, "messages": [_user(_url("https://example.com/cat.png"), "x")]})
        assert remote.status_code == 400 and "not fetched" in remote.json()["error"]["message"]


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
        reply = client.chat.completions.create(model="served", messages=[_user("Hello there")])
        assert reply.usage.completion_tokens <= 5
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url, api_key="nope", max_retries=0).models.list()
    finally:
        proc.send_signal(signal.SIGINT)  # Ctrl+C: a graceful stop, exit status 0, no traceback
        status = proc.wait(timeout=30)
    drain.join(timeout=10)
    assert status == 0 and "Traceback" not in "".join(rest), rest
