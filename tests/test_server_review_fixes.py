"""The server's and chat engine's answers to five findings of a review (tinygpt.serve, tinygpt.chat), each once a 500
or worse: the CORS preflight of the official openai JS SDK (its X-Stainless-* headers); a lone UTF-16 surrogate in a
message text, a completion prompt, a stop string or a data URI's media type; image bytes in a format outside the
allow-list (an EPS labelled image/png went to PIL's Ghostscript plugin); JSON nested too deeply or holding a number
too long to convert; a tiny positive temperature that overflowed the logits. Helpers: tests/server_fixtures.py."""

from __future__ import annotations

import base64
import io
import logging
import re

import pytest
from fastapi.testclient import TestClient
from PIL import EpsImagePlugin

from server_fixtures import NAME, SETTINGS, gguf_engine, image_url, png, user
from tinygpt.chat import GenerationSettings, parse_messages
from tinygpt.chat.launch import Limits
from tinygpt.chat.messages import UnreadableImage
from tinygpt.demo.uploads import check_image_file
from tinygpt.errors import UserError
from tinygpt.serve.app import create_app
from tinygpt.serve.respond import SEED_HEADER


class Stub:
    """A stand-in engine (no model): for what is refused before the engine runs; answers "hello" otherwise."""

    name = "gguf:/x (Stub)"
    context_length = 1024
    settings = SETTINGS

    class backend:
        last_stats = None

    def stream(self, messages, settings=None, cancel=None):
        yield "hello"

    def complete_stream(self, prompt, settings=None, cancel=None):
        yield "hello"

    def chat(self, messages, settings=None, cancel=None):
        return "hello"

    def complete(self, prompt, settings=None, cancel=None):
        return "hello"


def _client(engine=None, **kw) -> TestClient:
    return TestClient(create_app(engine or Stub(), NAME, Limits(max_images=4, queue_size=2), **kw),
                      raise_server_exceptions=False)


def _error(response, status: int) -> dict:
    assert response.status_code == status, response.text
    return response.json()["error"]


@pytest.fixture(scope="module")
def engine(chat_model):
    return gguf_engine(chat_model)


# ------------------------------------------------------------------------------------------------ 1: CORS
STAINLESS = ("authorization,content-type,x-stainless-arch,x-stainless-lang,x-stainless-os,"
             "x-stainless-package-version,x-stainless-retry-count,x-stainless-runtime,x-stainless-runtime-version,"
             "x-stainless-timeout")


@pytest.mark.parametrize("origins", [["http://localhost:3000"], ["*"]])
def test_cors_preflight_of_the_openai_js_sdk_is_allowed(origins):
    client = _client(allowed_origins=origins)
    preflight = {"Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": STAINLESS}
    answer = client.options("/v1/chat/completions", headers=preflight)
    assert answer.status_code == 200, answer.text
    allowed = answer.headers["access-control-allow-headers"].lower()
    assert all(h in allowed for h in STAINLESS.split(",")), allowed
    assert answer.headers["access-control-allow-origin"] in ("http://localhost:3000", "*")
    if origins != ["*"]:  # the origin is still checked
        other = client.options("/v1/chat/completions", headers={**preflight, "Origin": "http://evil.example"})
        assert other.status_code == 400 and "access-control-allow-origin" not in other.headers


# ------------------------------------------------------------------------------------------------ 2: lone surrogates
def _post_raw(client, path: str, body: str):
    return client.post(path, content=body.encode(), headers={"content-type": "application/json"})


SURROGATE_REQUESTS = [  # (path, JSON body written by hand: "\\ud83d" is the JSON escape, param, character)
    ("/v1/chat/completions", '{"model": "tiny", "messages": [{"role": "user", "content": "cut \\ud83d"}]}',
     "messages[0].content", 4),
    ("/v1/chat/completions", '{"model": "tiny", "stream": true, "messages": [{"role": "user", "content": [{"type": '
     '"text", "text": "ok"}, {"type": "text", "text": "\\ud83d!"}]}]}', "messages[0].content[1].text", 0),
    ("/v1/chat/completions", '{"model": "tiny", "messages": [{"role": "system", "content": "ab\\ude00"}, {"role": '
     '"user", "content": "hi"}]}', "messages[0].content", 2),
    ("/v1/chat/completions", '{"model": "tiny", "stop": ["x", "y\\ud83d"], "messages": [{"role": "user", "content": '
     '"hi"}]}', "stop", 1),
    ("/v1/completions", '{"model": "tiny", "prompt": "cut emoji \\ud83d"}', "prompt", 10),
    ("/v1/completions", '{"model": "tiny", "prompt": ["\\ud83d"], "stream": true}', "prompt", 0),
    ("/v1/completions", '{"model": "tiny", "prompt": "ok", "stop": "\\ud83d"}', "stop", 0),
]


@pytest.mark.parametrize("path, body, param, at", SURROGATE_REQUESTS,
                         ids=[f"{'chat' if 'chat' in p else 'text'}-{param}-{i}" for i, (p, _, param, _) in
                              enumerate(SURROGATE_REQUESTS)])
def test_a_lone_surrogate_is_a_400_naming_the_field(path, body, param, at):
    error = _error(_post_raw(_client(), path, body), 400)
    assert error["param"] == param, error
    assert re.search(rf": text holds an unpaired UTF-16 surrogate \(\\u[0-9a-f]{{4}}\) at character {at}$",
                     error["message"]), error


def test_a_surrogate_in_a_data_uri_media_type_is_a_400():
    body = ('{"model": "tiny", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": '
            '{"url": "data:\\ud83d;base64,AAAA"}}]}]}')
    error = _error(_post_raw(_client(), "/v1/chat/completions", body), 400)
    assert error["param"] == "messages[0].content[0].image_url.url"
    assert "media type \\ud83d is not an image" in error["message"], error


def test_a_lone_surrogate_never_reaches_the_tokenizer(engine, caplog):
    client = _client(engine)
    with caplog.at_level(logging.ERROR, logger="tinygpt.serve"):
        for path, body, param, _ in SURROGATE_REQUESTS:
            assert _error(_post_raw(client, path, body), 400)["param"] == param
    assert "unexpected error" not in caplog.text
    # the Python API refuses it with the same UserError
    with pytest.raises(UserError, match=r"^messages\[0\]\.content\[0\]\.text: text holds an unpaired UTF-16 "
                                        r"surrogate "
                                        r"\(\\ud83d\) at character 4$"):
        engine.chat([user("cut \ud83d")])
    with pytest.raises(UserError, match=r"^messages\[0\]\.content\[0\]\.text: text holds an unpaired"):
        engine.stream([user("\udc00")])
    for complete in (engine.complete, engine.complete_stream):
        with pytest.raises(UserError, match=r"^prompt: text holds an unpaired UTF-16 surrogate \(\\ud83d\) at "
                                            r"character 2$"):
            complete("ab\ud83d")
    with pytest.raises(UserError, match=r"^stop\[1\]: text holds an unpaired UTF-16 surrogate"):
        GenerationSettings(stop=("ok", "\ud83d"))
    assert engine.complete("ab \U0001F600", SETTINGS.with_(max_new_tokens=2)) is not None  # a whole pair is fine


# ------------------------------------------------------------------------------------------------ 3: image formats
EPS = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n%%EndComments\n"
       b"newpath 0 0 moveto 10 10 lineto stroke\n%%EOF\n")


def _encoded(fmt: str) -> bytes:
    buf = io.BytesIO()
    png(3, (12, 10)).save(buf, format=fmt)
    return buf.getvalue()


def _eps_never_opened(monkeypatch) -> list:
    opened = []
    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", lambda self: opened.append(self) or 1 / 0)
    return opened


def test_image_bytes_outside_the_allow_list_are_refused_by_name(monkeypatch):
    opened = _eps_never_opened(monkeypatch)
    client = _client()
    for data, fmt in ((EPS, "EPS"), (_encoded("TIFF"), "TIFF")):
        uri = "data:image/png;base64," + base64.b64encode(data).decode()
        error = _error(client.post("/v1/chat/completions", json={
            "model": NAME, "messages": [user(image_url(uri), "what is it?")]}), 400)
        assert error["code"] == "invalid_image" and error["param"] == "messages[0].content[0].image_url.url"
        assert f"{fmt} images are not accepted" in error["message"], error
        with pytest.raises(UnreadableImage, match=f"^messages\\[0\\]\\.content\\[0\\]\\.image_url\\.url: {fmt} "
                                                  "images are not accepted"):
            parse_messages([user(image_url(uri))]).images[0].open()  # the Python API
    for fmt in ("PNG", "JPEG", "WEBP", "GIF", "BMP"):  # every format the docs promise still works
        uri = f"data:image/{fmt.lower()};base64," + base64.b64encode(_encoded(fmt)).decode()
        answer = client.post("/v1/chat/completions", json={"model": NAME, "messages": [user(image_url(uri), "x")]})
        assert answer.status_code == 200, (fmt, answer.text)
        assert parse_messages([user(image_url(uri))]).images[0].open().size == (10, 12)
    assert opened == []


def test_the_demo_opens_uploads_with_the_same_allow_list(tmp_path, monkeypatch):
    opened = _eps_never_opened(monkeypatch)
    (tmp_path / "drawing.png").write_bytes(EPS)
    with pytest.raises(UserError, match=r"^drawing\.png: EPS images are not accepted; attach a PNG, JPEG, WebP, GIF "
                                        r"or BMP picture$"):
        check_image_file(tmp_path / "drawing.png", Limits())
    from tinygpt.demo.handlers import _open  # the image view opens an attached file before the upload check

    assert _open(str(tmp_path / "drawing.png"), Limits().max_image_pixels) is None
    assert opened == []
    (tmp_path / "scene.gif").write_bytes(_encoded("GIF"))
    assert check_image_file(tmp_path / "scene.gif", Limits()) == (10, 12)


# ------------------------------------------------------------------------------------------------ 4: JSON limits
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_json_nested_too_deeply_or_with_a_huge_number_is_a_400(path):
    client = _client()
    deep = b"[" * 100_000 + b"]" * 100_000
    for body, why in ((b"[" * 100_000, "nested too deeply"),
                      (b'{"model": "tiny", "messages": ' + deep + b"}", "nested too deeply"),
                      (b'{"model": "tiny", "max_tokens": ' + b"9" * 5000 + b', "prompt": "x"}',
                       "a number is too long")):
        error = _error(client.post(path, content=body, headers={"content-type": "application/json"}), 400)
        assert error["code"] == "invalid_request" and error["type"] == "invalid_request_error"
        assert error["message"].startswith(f"the request body is not valid JSON ({why})"), error


# ------------------------------------------------------------------------------------------------ 5: temperature
def test_a_tiny_temperature_is_greedy():
    for tiny in (1e-310, 1e-40, 5e-324, 9.99e-6):
        settings = GenerationSettings(temperature=tiny)
        assert settings.temperature == 0.0 and settings.greedy
        assert SETTINGS.with_(temperature=tiny).greedy
    assert GenerationSettings(temperature=1e-5).temperature == 1e-5
    for bad in (float("nan"), float("inf")):
        with pytest.raises(UserError, match="^temperature: must be a finite number"):
            GenerationSettings(temperature=bad)


def test_a_tiny_temperature_answers_greedily_on_both_backends(engine, chat_model):
    from tinygpt.chat import ChatEngine
    from tinygpt.chat.torch_backend import TorchBackend
    from tinygpt.model import load_vlm

    client = _client(engine)
    body = {"model": NAME, "max_tokens": 4, "messages": [user("hello")]}
    greedy = client.post("/v1/chat/completions", json=body)
    assert greedy.status_code == 200
    for temperature in (1e-310, 1e-40):
        answer = client.post("/v1/chat/completions", json={**body, "temperature": temperature, "seed": 1})
        assert answer.status_code == 200, answer.text
        assert answer.json()["choices"][0]["message"] == greedy.json()["choices"][0]["message"]
        assert SEED_HEADER not in answer.headers  # not sampled
    torch_engine = ChatEngine(TorchBackend(load_vlm(chat_model[0])), SETTINGS.with_(max_new_tokens=4))
    want = torch_engine.chat([user("hello")])
    assert torch_engine.chat([user("hello")], torch_engine.settings.with_(temperature=1e-40, seed=1)) == want
