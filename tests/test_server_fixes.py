"""The server's answers to what a user audit found (tinygpt.serve), request by request: the body read as JSON whatever
its Content-Type, refused cheaply and clearly otherwise; OpenAI fields that would change the answer refused by name;
data URIs as clients write them (case, line breaks), non-image media types refused; newer client shapes (developer
role, refusals, null content); `usage: null` on the chunks of a stream that asks for usage; model names with '/';
no redirect for a trailing slash; /health without the model's path; the queue taken only by well-formed requests.
The lifecycle fixes (shutdown, clients that leave, seeds, CORS, --host) are in tests/test_server_fixes_lifecycle.py.
Helpers: tests/server_fixtures.py."""

from __future__ import annotations

import base64
import io
import json
import threading
import time

import httpx
import pytest

from server_fixtures import (
    LIMITS, NAME, SETTINGS, Wrapped, blank_png, data_uri, image_url, openai_client, png, post, user,
)
from tinygpt.chat import parse_messages
from tinygpt.chat.launch import Limits
import test_server
from tinygpt.errors import UserError
from tinygpt.serve.app import create_app
from tinygpt.serve.background import BackgroundServer


engine, server = test_server.engine, test_server.server  # the tiny GGUF engine, served (shared fixtures)


def _error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    return response.json()["error"]


# ------------------------------------------------------------------------------------------------ C: the queue
def test_a_malformed_request_is_a_400_even_when_the_queue_is_full(engine):
    started = threading.Event()

    def endless(messages, settings, cancel):
        started.set()
        while not cancel.is_set():
            time.sleep(0.01)
            yield "w "

    app = create_app(Wrapped(engine, stream=endless), NAME, Limits(max_images=4, queue_size=1))
    with BackgroundServer(app) as running:
        body = {"model": NAME, "messages": [user("go on")], "stream": True}
        with httpx.stream("POST", running.url + "/v1/chat/completions", json=body, timeout=30) as held:
            lines = held.iter_lines()  # kept: a dropped iterator closes the connection
            assert next(lines).startswith("data: ") and started.is_set()
            bad = [([{"role": "bot", "content": "x"}], "messages[0].role"),
                   ([user("x"), {"role": "assistant", "content": [image_url(data_uri(png(0)))]}, user("y")],
                    "messages[1].content"),
                   ([user(*([png(0, (8, 8))] * 5), "count")], "messages"),
                   ([user(image_url("https://example.com/cat.png"))], "messages[0].content[0].image_url.url"),
                   ([user(image_url("data:text/plain;base64,aGk="))], "messages[0].content[0].image_url.url"),
                   ([{"role": "assistant", "content": "first"}], "messages[0].role")]
            for messages, field in bad:
                assert _error(post(running, {"model": NAME, "messages": messages}), 400)["param"] == field
            assert _error(post(running, {"model": NAME, "messages": [user("fine")]}), 429)["code"] == "queue_full"


# ------------------------------------------------------------------------------------------------ D: unsupported fields
UNSUPPORTED = [
    ("logit_bias", {"logit_bias": {"50256": -100}}),
    ("tool_choice", {"tool_choice": "required"}),
    ("tool_choice", {"tool_choice": {"type": "function", "function": {"name": "f"}}}),
    ("modalities", {"modalities": ["text", "audio"]}),
    ("audio", {"audio": {"voice": "alloy", "format": "wav"}}),
    ("best_of", {"best_of": 3}),
    ("echo", {"echo": True}),
]


@pytest.mark.parametrize("field, extra", UNSUPPORTED, ids=[f"{f}={v[f]}" for f, v in UNSUPPORTED])
def test_fields_that_would_change_the_answer_are_refused_by_name(server, field, extra):
    error = _error(post(server, {"model": NAME, "messages": [user("x")], **extra}), 400)
    assert error["param"] == field and error["code"] == "unsupported_parameter" and field in error["message"]


def test_harmless_values_of_those_fields_are_accepted(server):
    harmless = {"logit_bias": {}, "tool_choice": "none", "modalities": ["text"], "audio": None, "best_of": 1,
                "echo": False, "max_tokens": 2}
    assert post(server, {"model": NAME, "messages": [user("x")], **harmless}).status_code == 200
    assert post(server, {"model": NAME, "messages": [user("x")], "tool_choice": "auto", "max_tokens": 2}).is_success


def test_stream_options_need_a_stream(server):
    for stream in (False, None):
        error = _error(post(server, {"model": NAME, "messages": [user("x")], "stream": stream,
                                     "stream_options": {"include_usage": True}}), 400)
        assert error["param"] == "stream_options" and "only allowed with stream: true" in error["message"]


# ------------------------------------------------------------------------------------------------ E: data URIs
def _png_bytes(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def test_data_uris_as_clients_write_them(server, engine):
    raw = _png_bytes(png(5, (40, 60)))
    b64 = base64.b64encode(raw).decode()
    wrapped = "\r\n".join(b64[i:i + 76] for i in range(0, len(b64), 76))  # `base64` without -w0, MIME's lines
    want = engine.chat([user(image_url(data_uri(raw)), "What is it?")], SETTINGS)
    for url in ("DATA:image/png;BASE64," + b64, "data:IMAGE/PNG;base64," + b64, "data:image/png;base64," + wrapped,
                "data:image/png;name=cat.png;base64,  " + b64 + "\n", "Data:image/png; base64," + b64):
        response = post(server, {"model": NAME, "messages": [user(image_url(url), "What is it?")]})
        assert response.status_code == 200, (url[:40], response.text)
        assert response.json()["choices"][0]["message"]["content"] == want


@pytest.mark.parametrize("url, words", [
    ("data:text/plain;base64,aGVsbG8=", "media type text/plain is not an image"),
    ("data:application/pdf;base64,aGVsbG8=", "media type application/pdf is not an image"),
    ("data:;base64,aGVsbG8=", "the data URI names no media type"),
    ("data:image/png,hello", "must look like data:image/png;base64,<data>"),
    ("data:image/png;base64,aGVs*G8=", "not valid base64"),
])
def test_data_uris_that_are_not_images_are_refused_clearly(server, url, words):
    error = _error(post(server, {"model": NAME, "messages": [user(image_url(url), "x")]}), 400)
    assert words in error["message"] and error["param"] == "messages[0].content[0].image_url.url", error


def test_bytes_that_are_not_an_image_name_no_exception_class(server):
    for data in (b"hello, I am text", _png_bytes(png(1))[:40]):
        error = _error(post(server, {"model": NAME, "messages": [user(image_url(data_uri(data)), "x")]}), 400)
        assert "not a readable image" in error["message"] and error["code"] == "invalid_image"
        assert "Error" not in error["message"] and "(OSError" not in error["message"], error["message"]


def test_the_chat_engine_reads_data_uris_with_the_same_rules():
    raw = blank_png(3, 2)
    b64 = base64.b64encode(raw).decode()
    conversation = parse_messages([user(image_url("DATA:image/png;BASE64," + b64[:10] + "\n" + b64[10:]), "hi")])
    assert conversation.images[0].open().size == (3, 2)
    with pytest.raises(UserError, match=r"messages\[0\]\.content\[0\]\.image_url\.url: media type text/plain is not"):
        parse_messages([user(image_url("data:text/plain;base64," + b64))])


# ------------------------------------------------------------------------------------------------ G: the body
def test_a_body_that_is_not_json_says_so(server):
    url = server.url + "/v1/chat/completions"
    body = json.dumps({"model": NAME, "messages": [user("Hello there")], "max_tokens": 3}).encode()
    error = _error(httpx.post(url, content=b'{"model": "tiny\xff\xfe", "messages": []}',
                              headers={"content-type": "application/json"}), 400)
    assert error["code"] == "invalid_request" and "the request body is not valid JSON" in error["message"]
    assert "not UTF-8" in error["message"] and "0xff" in error["message"]
    # curl -d without -H: JSON labelled as a form, read as JSON (as llama.cpp does)
    form = httpx.post(url, content=body, headers={"content-type": "application/x-www-form-urlencoded"}, timeout=60)
    assert form.status_code == 200, form.text
    assert httpx.post(url, content=body, headers={"content-type": "text/plain"}, timeout=60).status_code == 200
    for content, words in ((b"model=tiny&max_tokens=3", "the request body is not valid JSON"),
                           (b"", "the request body is empty"), (b'"just a string"', "got a string"),
                           (b"[1, 2]", "got an array")):
        error = _error(httpx.post(url, content=content, headers={"content-type": "application/x-www-form-urlencoded"}),
                       400)
        assert words in error["message"] and "expected a JSON object (Content-Type: application/json)" in \
            error["message"] and error["code"] == "invalid_request", error


def test_the_request_schema_is_still_documented(server):
    schema = httpx.get(server.url + "/openapi.json").json()
    body = schema["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    if "$ref" in body:  # FastAPI's own way, when it reads the body itself
        body = schema["components"]["schemas"][body["$ref"].rsplit("/", 1)[-1]]
    assert {"model", "messages", "stream_options", "seed"} <= set(body["properties"])


# ------------------------------------------------------------------------------------------------ H, F: paths
def test_a_trailing_slash_is_a_json_404_not_a_redirect(server):
    response = httpx.post(server.url + "/v1/chat/completions/", json={"model": NAME, "messages": [user("x")]})
    error = _error(response, 404)
    assert "no such endpoint: POST /v1/chat/completions/" in error["message"]
    assert "without the trailing slash: /v1/chat/completions" in error["message"]


def test_a_model_name_with_a_slash(engine):
    name = "my/model:latest"
    with BackgroundServer(create_app(engine, name, LIMITS)) as running:
        assert httpx.get(running.url + f"/v1/models/{name}").json()["id"] == name
        client = openai_client(running)
        assert client.models.retrieve(name).id == name
        assert client.chat.completions.create(model=name, messages=[user("hi")], max_tokens=2).model == name
        error = _error(httpx.get(running.url + "/v1/models/my/other"), 404)
        assert error["code"] == "model_not_found" and "'my/other' does not exist" in error["message"]


# ------------------------------------------------------------------------------------------------ J: client shapes
def test_newer_openai_message_shapes(server, engine):
    system = [{"role": "system", "content": "Answer briefly."}, user("Hello there")]
    developer = [{"role": "developer", "content": [{"type": "text", "text": "Answer briefly."}]}, user("Hello there")]
    assert parse_messages(developer) == parse_messages(system)
    want = engine.chat(system, SETTINGS)
    reply = post(server, {"model": NAME, "messages": developer})
    assert reply.status_code == 200 and reply.json()["choices"][0]["message"]["content"] == want
    empty = [user("Hello"), {"role": "assistant", "content": ""}, user("again")]
    for assistant in ({"role": "assistant", "content": None, "refusal": "I can't help with that."},
                      {"role": "assistant", "content": [{"type": "refusal", "refusal": "I can't help with that."}]},
                      {"role": "assistant", "tool_calls": []}):
        messages = [user("Hello"), assistant, user("again")]
        assert parse_messages(messages) == parse_messages(empty)
        assert post(server, {"model": NAME, "messages": messages, "max_tokens": 2}).status_code == 200
    with pytest.raises(UserError, match=r"messages\[1\]\.role: a developer message may only come first"):
        parse_messages([user("x"), {"role": "developer", "content": "late"}, user("y")])
    with pytest.raises(UserError, match=r"messages\[0\]\.content\[0\]\.type: expected 'text', 'image_url'"):
        parse_messages([{"role": "user", "content": [{"type": "refusal", "refusal": "no"}]}])


# ------------------------------------------------------------------------------------------------ L: usage null
def test_chunks_say_usage_null_when_the_stream_asks_for_usage(server):
    def chunks(**options) -> list[dict]:
        body = {"model": NAME, "messages": [user("Hello there")], "max_tokens": 5, "stream": True, **options}
        with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as response:
            lines = [line.removeprefix("data: ") for line in response.iter_lines() if line]
        assert lines[-1] == "[DONE]"
        return [json.loads(line) for line in lines[:-1]]

    with_usage = chunks(stream_options={"include_usage": True})
    assert all("usage" in c and c["usage"] is None for c in with_usage[:-1]), with_usage
    assert with_usage[-1]["choices"] == [] and with_usage[-1]["usage"]["completion_tokens"] >= 1
    assert all("usage" not in c for c in chunks())


# ------------------------------------------------------------------------------------------------ M: /health
def test_health_shows_the_backend_kind_not_the_models_path(server, engine, chat_model):
    health = httpx.get(server.url + "/health")
    assert health.json()["backend"] == "gguf" and str(chat_model[1]) in engine.name
    assert str(chat_model[1]) not in health.text and str(chat_model[1].parent) not in health.text
