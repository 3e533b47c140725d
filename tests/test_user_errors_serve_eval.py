"""User errors of the server and the chat engine/CLI (the audit's findings): each is a 4xx JSON error naming the
field (the server stays up) or one ``error:`` line and exit status 2 (the command lines), never a 500 or a traceback.

Covered: ``stop`` bounded like OpenAI's (count and length); ``seed`` bounded to what torch and numpy take, in the
server and in GenerationSettings; strict request types (no "10"/true for integers, no "yes" for booleans, no
Infinity/NaN); a truncated image is ``invalid_image``; an image over PIL's decompression-bomb limit; ``--port``
out of range; ``--threads`` < 1; the context-length message."""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import pytest
from PIL import Image

from tinygpt.chat import ChatEngine, GenerationSettings
from tinygpt.chat.launch import Limits
from tinygpt.chat.messages import image_from_path
from tinygpt.cli import main as tinygpt
from tinygpt.errors import UserError
from tinygpt.serve.app import create_app
from tinygpt.serve.background import BackgroundServer, listen
from tinygpt.serve.schema import MAX_STOP, MAX_STOP_CHARS

NAME = "tiny"
SETTINGS = GenerationSettings(max_new_tokens=3)


def _png_bytes(seed: int = 0, size=(90, 130)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray((np.random.default_rng(seed).random((*size, 3)) * 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _user(text: str, image: bytes | None = None) -> dict:
    parts = [{"type": "text", "text": text}]
    if image is not None:
        url = "data:image/png;base64," + base64.b64encode(image).decode()
        parts.insert(0, {"type": "image_url", "image_url": {"url": url}})
    return {"role": "user", "content": parts}


@pytest.fixture(scope="module")
def engine(chat_model):
    from tinygpt.chat.gguf_backend import GGUFBackend

    return ChatEngine(GGUFBackend.load(chat_model[1], vision_int8=False), SETTINGS)


@pytest.fixture(scope="module")
def server(engine):
    limits = Limits(max_images=4, max_image_pixels=16_000_000, max_upload_bytes=2_000_000, queue_size=4)
    with BackgroundServer(create_app(engine, NAME, limits)) as running:
        yield running


def _post(server, body: dict | bytes) -> httpx.Response:
    if isinstance(body, bytes):
        return httpx.post(server.url + "/v1/chat/completions", content=body, timeout=60,
                          headers={"content-type": "application/json"})
    return httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)


def _refused(response: httpx.Response, field: str, words: str, code: str | None = None) -> None:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == field and words in error["message"], error
    if code is not None:
        assert error["code"] == code, error


def _body(**fields) -> dict:
    return {"model": NAME, "messages": [_user("Tell me a story")], "max_tokens": 2, **fields}


# ------------------------------------------------------------------------------------------------ 1. stop
@pytest.mark.parametrize("stop, words", [
    (["a", "b", "c", "d", "e"], f"at most {MAX_STOP} stop strings, got 5"),
    (["x" * 100] * 100, f"at most {MAX_STOP} stop strings, got 100"),
    ("x" * 20_000, f"at most {MAX_STOP_CHARS} characters, got one of 20000"),
    (["ok", "y" * (MAX_STOP_CHARS + 1)], f"at most {MAX_STOP_CHARS} characters, got one of {MAX_STOP_CHARS + 1}"),
    ([""], "non-empty"),
])
def test_stop_is_bounded_like_openais(server, stop, words):
    _refused(_post(server, _body(stop=stop)), "stop", words)


def test_stop_within_the_bounds_is_accepted(server):
    response = _post(server, _body(stop=["z" * MAX_STOP_CHARS, "#", "##", "###"]))
    assert response.status_code == 200, response.text


# ------------------------------------------------------------------------------------------------ 2. seed
@pytest.mark.parametrize("seed", [2**70, 2**64, -2**63 - 1, -1])
def test_a_seed_torch_cannot_take_is_a_400(server, seed):
    _refused(_post(server, _body(seed=seed, temperature=1.0)), "seed", "seed: must be an integer in 0 ..")
    assert httpx.get(server.url + "/health").status_code == 200


def test_the_largest_seed_samples(server):
    assert _post(server, _body(seed=2**64 - 1, temperature=1.0)).status_code == 200


@pytest.mark.parametrize("seed", [2**64, -1, True, 1.5])
def test_the_engine_refuses_an_out_of_range_seed(engine, seed):
    with pytest.raises(UserError, match=r"^seed: must be an integer in 0 \.\. 18446744073709551615"):
        engine.chat([_user("hi")], SETTINGS.with_(seed=seed, temperature=1.0))


# ------------------------------------------------------------------------------------------------ 4. strict types
@pytest.mark.parametrize("field, value, words", [
    ("max_tokens", "10", "valid integer"),
    ("max_tokens", True, "valid integer"),
    ("max_completion_tokens", "10", "valid integer"),
    ("stream", "yes", "valid boolean"),
    ("stream", 1, "valid boolean"),
    ("seed", "7", "valid integer"),
    ("n", True, "valid integer"),
    ("temperature", "0.5", "valid number"),
])
def test_lax_types_are_refused(server, field, value, words):
    _refused(_post(server, _body(**{field: value})), field, words, "invalid_request")


@pytest.mark.parametrize("field, literal", [("temperature", "Infinity"), ("repetition_penalty", "Infinity"),
                                            ("top_p", "NaN"), ("temperature", "-Infinity")])
def test_infinity_and_nan_are_refused(server, field, literal):
    raw = ('{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, '
           f'"{field}": {literal}}}').encode()
    _refused(_post(server, raw), field, "finite number", "invalid_request")


def test_what_the_openai_client_sends_is_still_accepted(server):
    body = _body(temperature=1, top_p=1, repetition_penalty=1, seed=3, stream=False, n=1, max_completion_tokens=None,
                 stream_options=None)
    assert _post(server, body).status_code == 200
    assert _post(server, _body(stream=True, stream_options={"include_usage": True})).status_code == 200


# ------------------------------------------------------------------------------------------------ 5. images
def test_a_truncated_image_is_invalid_image(server):
    data = _png_bytes()
    response = _post(server, {"model": NAME, "messages": [_user("What is it?", data[: len(data) // 3])]})
    _refused(response, "messages[0].content[0].image_url.url", "truncated or damaged", "invalid_image")
    assert httpx.get(server.url + "/health").status_code == 200


def test_an_image_over_pils_limit_is_a_user_error(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    Image.new("RGB", (100, 100)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 10000 pixels: over twice the limit, PIL's error
    with pytest.raises(UserError, match=r"big\.png: the image is too large to decode \(Image size \(10000 pixels\)"):
        image_from_path(path, str(path)).open()


def test_chat_with_an_image_over_pils_limit_is_one_error_line(chat_model, tmp_path, monkeypatch, capsys):
    path = tmp_path / "big.png"
    Image.new("RGB", (100, 100)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    code = tinygpt(["chat", "--gguf", str(chat_model[1]), "--image", str(path), "--prompt", "hi", "--threads", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"error: {path}: ") and "too large to decode" in err[0] and "10000 pixels" in err[0]


# ------------------------------------------------------------------------------------------------ 3, 6. flags
@pytest.mark.parametrize("port", ["99999", "-1", "65536"])
def test_a_port_out_of_range_is_one_error_line(tmp_path, capsys, port):
    assert tinygpt(["serve", "--cfg-path", str(tmp_path / "never-read.yaml"), "--port", port]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: --port: expected 1-65535 (or 0: any free port), got {port}"]


def test_listen_turns_an_overflowing_port_into_a_user_error():
    with pytest.raises(UserError, match=r"--host/--port: cannot listen on 127\.0\.0\.1:99999 \(.*0-65535"):
        listen("127.0.0.1", 99999)


@pytest.mark.parametrize("threads", ["-2", "0"])
def test_chat_threads_below_one_is_one_error_line(chat_model, capsys, threads):
    assert tinygpt(["chat", "--gguf", str(chat_model[1]), "--threads", threads, "--prompt", "hi"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: --threads: expected a number of CPU threads >= 1, got {threads}"]


# ------------------------------------------------------------------------------------------------ 11. context
def test_the_context_message_says_one_position_is_left_for_the_answer(engine):
    with pytest.raises(UserError, match=r"context holds 1024, which must leave at least one position for the answer"):
        engine.chat([_user("word " * 1100)])
