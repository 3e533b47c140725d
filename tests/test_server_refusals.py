"""The server's refusals (tinygpt.serve): every bad input is a 4xx OpenAI-style error naming the field, cheaply
(nothing huge decoded, nothing generated); the codes clients act on; bodies over the limit; PIL's decompression-bomb
guard; the API key; local image paths only with --allow-local-images, remote URLs never fetched. The real app runs
under uvicorn on a free port over the tiny GGUF model, as in tests/test_server.py (helpers:
tests/server_fixtures.py)."""

from __future__ import annotations

import time

import httpx
import pytest

from server_fixtures import (
    LIMITS, NAME, REPO, SETTINGS, blank_png, data_uri, gguf_engine, image_url, openai, openai_client, png, post, user,
)
from tinygpt.serve.app import create_app
from tinygpt.serve.background import BackgroundServer
from tinygpt.serve.errors import APIError
from tinygpt.serve.images import image_size


# ------------------------------------------------------------------------------------------------ the model, served
@pytest.fixture(scope="module")
def engine(chat_model):
    return gguf_engine(chat_model)


@pytest.fixture(scope="module")
def server(engine):
    with BackgroundServer(create_app(engine, NAME, LIMITS)) as running:
        yield running


# ------------------------------------------------------------------------------------------------ refusals
def _too_many_images():
    return [user(*([png(0, (8, 8))] * 100), "count them")]


BAD_REQUESTS = [  # (name, request body or raw bytes, status, field, words the message holds)
    ("invalid JSON", b'{"model": "tiny", "messages": [', 400, None, "not valid JSON"),
    ("not an object", b'[1, 2]', 400, None, "expected a JSON object (Content-Type: application/json)"),
    ("no messages", {"model": NAME}, 400, "messages", "Field required"),
    ("messages not a list", {"model": NAME, "messages": "hi"}, 400, "messages", "valid list"),
    ("max_tokens not a number", {"model": NAME, "messages": [user("x")], "max_tokens": "many"}, 400, "max_tokens",
     "valid integer"),
    ("max_tokens 0", {"model": NAME, "messages": [user("x")], "max_tokens": 0}, 400, "max_tokens", "greater than"),
    ("negative temperature", {"model": NAME, "messages": [user("x")], "temperature": -0.5}, 400, "temperature",
     "greater than or equal to 0"),
    ("top_p 0", {"model": NAME, "messages": [user("x")], "top_p": 0}, 400, "top_p", "greater than 0"),
    ("stop not text", {"model": NAME, "messages": [user("x")], "stop": 5}, 400, "stop", "a string or a list"),
    ("empty stop", {"model": NAME, "messages": [user("x")], "stop": [""]}, 400, "stop", "non-empty"),
    ("stream not a bool", {"model": NAME, "messages": [user("x")], "stream": "maybe"}, 400, "stream", "boolean"),
    ("n 2", {"model": NAME, "messages": [user("x")], "n": 2}, 400, "n", "one choice"),
    ("tools", {"model": NAME, "messages": [user("x")], "tools": [{"type": "function"}]}, 400, "tools",
     "not supported"),
    ("unknown role", {"model": NAME, "messages": [{"role": "bot", "content": "x"}]}, 400, "messages[0].role", "bot"),
    ("image from the assistant", {"model": NAME, "messages": [
        user("x"), {"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": data_uri(png(0))}}]},
        user("y")]}, 400, "messages[1].content", "images are only allowed in user messages"),
    ("not an image", {"model": NAME, "messages": [user(image_url(data_uri(b"hello, I am text")), "x")]}, 400,
     "messages[0].content[0].image_url.url", "not a readable image"),
    ("malformed data URI", {"model": NAME, "messages": [user(image_url("data:image/png;base64,@@@@"), "x")]}, 400,
     "messages[0].content[0].image_url.url", "not valid base64"),
    ("data URI without base64", {"model": NAME, "messages": [user(image_url("data:image/png,abc"), "x")]}, 400,
     "messages[0].content[0].image_url.url", "must look like data:image/png;base64"),
    ("image URL not a string", {"model": NAME, "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": 7}}]}]}, 400,
     "messages[0].content[0].image_url.url", "URL string"),
    ("remote URL", {"model": NAME, "messages": [user(image_url("https://example.com/cat.png"), "x")]}, 400,
     "messages[0].content[0].image_url.url", "remote image URLs (https://) are not fetched"),
    ("local path without the flag", {"model": NAME, "messages": [user(image_url(str(REPO / "README.md")), "x")]}, 400,
     "messages[0].content[0].image_url.url", "--allow-local-images"),
    ("local path as an image part", {"model": NAME, "messages": [
        {"role": "user", "content": [{"type": "image", "image": "/etc/hostname"}]}]}, 400,
     "messages[0].content[0].image", "--allow-local-images"),
    ("100 images", {"model": NAME, "messages": _too_many_images()}, 400, "messages",
     "holds 100 images; this server takes at most 4"),
    ("50 megapixels", {"model": NAME, "messages": [user(image_url(data_uri(blank_png(10_000, 5_000))), "x")]}, 413,
     "messages[0].content[0].image_url.url", "10000 x 5000 = 50000000 pixels"),
    ("prompt too long", {"model": NAME, "messages": [user("word " * 1100)]}, 400, None,
     "prompt too long: the conversation needs"),
    ("prompt too long, streamed", {"model": NAME, "messages": [user("word " * 1100)], "stream": True}, 400, None,
     "holds 1024"),
    ("unknown model", {"model": "gpt-4o", "messages": [user("x")]}, 404, "model", "'gpt-4o' does not exist"),
]


@pytest.mark.parametrize("name, body, status, field, words", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_a_bad_request_is_a_4xx_openai_error(server, name, body, status, field, words):
    t0 = time.monotonic()
    response = post(server, body)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert words in error["message"] and error["param"] == field, error
    assert time.monotonic() - t0 < 5  # refused cheaply: nothing huge decoded, nothing generated


def test_codes_of_the_refusals_clients_act_on(server):
    too_long = post(server, {"model": NAME, "messages": [user("word " * 1100)]}).json()["error"]
    assert too_long["code"] == "context_length_exceeded" and "1024" in too_long["message"]
    assert post(server, {"model": "x", "messages": [user("x")]}).json()["error"]["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError, match="remote image URLs"):
        bad_url = [user(image_url("http://127.0.0.1:1/x.png"), "x")]
        openai_client(server).chat.completions.create(model=NAME, messages=bad_url)


def test_a_body_over_the_limit_is_413_unread(server):
    big = {"model": NAME, "messages": [user("x" * (LIMITS.max_upload_bytes + 10))]}
    response = post(server, big)
    assert response.status_code == 413
    assert "at most 2000000 bytes" in response.json()["error"]["message"]

    def chunks():  # no Content-Length: counted as it arrives
        yield b'{"model": "tiny", "messages": [{"role": "user", "content": "'
        for _ in range(30):
            yield b"x" * 100_000
        yield b'"}]}'

    response = post(server, chunks())
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"
    assert httpx.get(server.url + "/nope").json()["error"]["message"] == "no such endpoint: GET /nope"
    assert httpx.get(server.url + "/v1/chat/completions").status_code == 405


def test_pils_decompression_bomb_guard_is_a_413():
    bomb = blank_png(20_000, 10_000)  # 200 megapixels: over PIL's own limit, refused from the header
    with pytest.raises(APIError) as err:
        image_size(bomb, "image", 10**12)
    assert err.value.status == 413 and "more pixels than this server decodes" in err.value.message


def test_api_key(engine):
    with BackgroundServer(create_app(engine, NAME, LIMITS, api_key="sekret")) as running:
        messages = [user("Hello there")]
        for key in ("wrong", ""):
            with pytest.raises(openai.AuthenticationError, match="API key"):
                openai_client(running, key or "-").chat.completions.create(model=NAME, messages=messages)
        response = post(running, {"model": NAME, "messages": messages})
        assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(running.url + "/v1/models").status_code == 401
        assert httpx.get(running.url + "/health").status_code == 200
        reply = openai_client(running, "sekret").chat.completions.create(model=NAME, messages=messages, max_tokens=3)
        assert reply.choices[0].message.content == engine.chat(messages, SETTINGS.with_(max_new_tokens=3))


def test_local_images_only_with_the_flag(engine, tmp_path):
    image = png(3)
    image.save(tmp_path / "cat.png")
    want = engine.chat([user(image, "What is it?")], SETTINGS)
    with BackgroundServer(create_app(engine, NAME, LIMITS, allow_local_images=True)) as running:
        client = openai_client(running)
        for url in (str(tmp_path / "cat.png"), (tmp_path / "cat.png").as_uri()):
            reply = client.chat.completions.create(model=NAME, messages=[user(image_url(url), "What is it?")])
            assert reply.choices[0].message.content == want
        missing = post(running, {"model": NAME, "messages": [user(image_url(str(tmp_path / "dog.png")), "x")]})
        assert missing.status_code == 400 and "image file not found" in missing.json()["error"]["message"]
        remote = post(running, {"model": NAME, "messages": [user(image_url("https://example.com/cat.png"), "x")]})
        assert remote.status_code == 400 and "not fetched" in remote.json()["error"]["message"]

