"""The server's lifecycle fixes (tinygpt.serve): SIGTERM and Ctrl+C end every admitted request at once and exit 0 (a
real `python -m tinygpt.serve` process over a slow stand-in engine); a client that leaves frees the engine (a
non-streamed generation is cancelled) and a queued request's slot at once; a sampled request without a seed samples
afresh (and says with which seed); CORS with --allowed-origins; --host that does not resolve. Request-level fixes are
in tests/test_server_fixes.py; helpers in tests/server_fixtures.py."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from server_fixtures import LIMITS, NAME, REPO, Wrapped, gguf_engine, post, user, wait_for
from tinygpt.chat.launch import listen
from tinygpt.cli import main as tinygpt
from tinygpt.errors import UserError
from tinygpt.serve.app import create_app
from tinygpt.serve.background import BackgroundServer


@pytest.fixture(scope="module")
def engine(chat_model):
    return gguf_engine(chat_model)


def _depth(server_url: str) -> int:
    return httpx.get(server_url + "/health").json()["queue"]["depth"]


# ------------------------------------------------------------------------------------------------ A: shutdown
SLOW_SERVER = '''
import sys, time
import tinygpt.chat.launch as launch
from tinygpt.chat import GenerationSettings


class Slow:  # 30 s per answer, streamed or not; a stream stops when cancelled, `chat` never does
    name, context_length, backend, settings = "slow", 1024, None, GenerationSettings(max_new_tokens=600)

    def stream(self, conversation, settings, cancel=None):
        for k in range(600):
            if cancel is not None and cancel.is_set():
                return
            time.sleep(0.05)
            yield f"w{k} "

    def chat(self, conversation, settings):
        time.sleep(30)
        return "late"


launch.open_engine = lambda cfg: Slow()
from tinygpt.serve.cli import main
sys.exit(main(sys.argv[1:]))
'''


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_ends_every_admitted_request_and_exits_0(tmp_path, sig):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "llm-f16.gguf").write_bytes(b"")  # the config check wants one; the engine is the stand-in
    (tmp_path / "slow.yaml").write_text(f"model:\n  backend: gguf\n  path: {tmp_path / 'model'}\n")
    (tmp_path / "slow_server.py").write_text(SLOW_SERVER)
    command = [sys.executable, str(tmp_path / "slow_server.py"), "--cfg-path", str(tmp_path / "slow.yaml"),
               "--port", "0"]
    proc = subprocess.Popen(command, env=dict(os.environ, PYTHONPATH=str(REPO)), stderr=subprocess.PIPE, text=True,
                            cwd=tmp_path)
    rest: list[str] = []
    outcomes: dict[int, tuple] = {}

    def ask(k: int, stream: bool):
        body = {"model": "slow", "messages": [user(f"question {k}")], "stream": stream}
        try:
            with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=120) as response:
                lines = [line for line in response.iter_lines() if line]
            outcomes[k] = (response.status_code, lines)
        except httpx.HTTPError as err:
            outcomes[k] = (None, repr(err))

    try:
        line = ""
        for line in proc.stderr:
            if "serving 'slow'" in line:
                break
        url = re.search(r"http://\S+(?=/v1)", line).group(0)
        threading.Thread(target=lambda: rest.extend(proc.stderr), daemon=True).start()
        assert wait_for(lambda: _depth(url) == 0, 30)
        askers = [threading.Thread(target=ask, args=(0, True))]
        askers[0].start()
        assert wait_for(lambda: _depth(url) == 1)
        askers += [threading.Thread(target=ask, args=(k, k % 2 == 0)) for k in range(1, 5)]
        for t in askers[1:]:
            t.start()
        assert wait_for(lambda: _depth(url) == 5), "the five requests were not all admitted"
        time.sleep(0.3)  # the running stream has sent some pieces
        proc.send_signal(sig)
        status = proc.wait(timeout=60)
        for t in askers:
            t.join(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert status == 0, "".join(rest)
    assert "Traceback" not in "".join(rest), rest
    running_status, running_lines = outcomes[0]
    assert running_status == 200 and running_lines[0].startswith("data: ")
    last = json.loads(running_lines[-1].removeprefix("data: "))
    assert last["error"]["code"] == "server_shutting_down", running_lines[-3:]
    for k in range(1, 5):  # the queued ones, streamed or not: a 503 each, never run
        code, lines = outcomes[k]
        assert code == 503 and json.loads(lines[0])["error"]["code"] == "server_shutting_down", outcomes[k]


# ------------------------------------------------------------------------------------------------ B: clients that leave
def _endless(cancels: list):
    def stream(messages, settings, cancel):
        cancels.append(cancel)
        for k in range(3000):
            if cancel.is_set():
                return
            time.sleep(0.01)
            yield f"w{k} "

    return stream


def _slow_chat(messages, settings):  # what the server ran for a non-streamed answer: it cannot be stopped
    time.sleep(8)
    return "late"


def _leave(server, body) -> None:
    """Send a request and give up on it after a second (the connection closes)."""
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/chat/completions", json=body, timeout=1.0)


def test_a_client_that_leaves_a_non_streamed_request_frees_the_engine(engine):
    cancels: list = []
    app = create_app(Wrapped(engine, chat=_slow_chat, stream=_endless(cancels)), NAME, LIMITS)
    with BackgroundServer(app) as running:
        _leave(running, {"model": NAME, "messages": [user("go on")]})
        assert wait_for(lambda: _depth(running.url) == 0, 4), "the generation still holds the engine"
        assert cancels and cancels[0].is_set()


def test_a_queued_request_whose_client_leaves_frees_its_slot_at_once(engine):
    cancels: list = []
    app = create_app(Wrapped(engine, chat=_slow_chat, stream=_endless(cancels)), NAME, LIMITS)
    with BackgroundServer(app) as running:
        body = {"model": NAME, "messages": [user("go on")], "stream": True}
        with httpx.stream("POST", running.url + "/v1/chat/completions", json=body, timeout=30) as held:
            lines = held.iter_lines()  # kept: a dropped iterator closes the connection
            assert next(lines).startswith("data: ")
            leaver = threading.Thread(target=_leave, args=(running, {"model": NAME, "messages": [user("me too")],
                                                                     "stream": True}))
            leaver.start()
            assert wait_for(lambda: _depth(running.url) == 2)
            leaver.join()
            assert wait_for(lambda: _depth(running.url) == 1, 3), "the abandoned request still counts"
            assert len(cancels) == 1 and not cancels[0].is_set()  # the running one goes on, the other never ran
        assert wait_for(lambda: _depth(running.url) == 0)


# ------------------------------------------------------------------------------------------------ I: seeds
def test_sampling_without_a_seed_draws_a_fresh_one(engine):
    seen: list[int | None] = []

    def recording(messages, settings, cancel=None):
        seen.append(settings.seed)
        return engine.stream(messages, settings, cancel)

    with BackgroundServer(create_app(Wrapped(engine, stream=recording), NAME, LIMITS)) as running:
        hot = {"model": NAME, "messages": [user("Tell me a story")], "temperature": 1.2, "max_tokens": 6}
        replies = [post(running, hot) for _ in range(3)]
        streamed = post(running, {**hot, "stream": True})
        headers = [int(r.headers["x-tinygpt-seed"]) for r in (*replies, streamed)]
        assert headers == seen and len(set(seen)) == 4 and all(0 <= s < 2**53 for s in seen)
        again = post(running, {**hot, "seed": headers[0]})  # the header's seed repeats that answer
        assert again.json()["choices"][0]["message"]["content"] == replies[0].json()["choices"][0]["message"]["content"]
        assert seen[-1] == headers[0] and again.headers["x-tinygpt-seed"] == str(headers[0])
        greedy = post(running, {**hot, "temperature": 0})
        assert greedy.status_code == 200 and "x-tinygpt-seed" not in greedy.headers


# ------------------------------------------------------------------------------------------------ K: CORS
def test_cors_only_for_the_allowed_origins(engine):
    preflight = {"Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type"}
    with BackgroundServer(create_app(engine, NAME, LIMITS, api_key="k",
                                     allowed_origins=["http://localhost:3000"])) as running:
        answer = httpx.options(running.url + "/v1/chat/completions", headers=preflight)
        assert answer.status_code == 200 and answer.headers["access-control-allow-origin"] == "http://localhost:3000"
        refused = httpx.get(running.url + "/v1/models", headers={"Origin": "http://localhost:3000"})
        assert refused.status_code == 401 and refused.headers["access-control-allow-origin"] == "http://localhost:3000"
        other = httpx.get(running.url + "/health", headers={"Origin": "http://evil.example"})
        assert "access-control-allow-origin" not in other.headers
    with BackgroundServer(create_app(engine, NAME, LIMITS)) as running:  # the default: no CORS at all
        answer = httpx.options(running.url + "/v1/chat/completions", headers=preflight)
        assert answer.status_code == 405 and "access-control-allow-origin" not in answer.headers


def test_allowed_origins_on_the_command_line():
    from tinygpt.serve.cli import allowed_origins

    assert allowed_origins(["http://a.example:3000, https://b.example/", "*"]) == [
        "http://a.example:3000", "https://b.example", "*"]
    for bad in ("localhost:3000", "http://a.example/app", "ftp://a.example"):
        with pytest.raises(UserError, match=f"--allowed-origins: '{re.escape(bad)}' is not an origin"):
            allowed_origins([bad])


# ------------------------------------------------------------------------------------------------ N: --host
def test_a_host_that_does_not_resolve_is_named(chat_model, tmp_path, capsys):
    with pytest.raises(UserError, match=r"^--host: cannot resolve host 999\.1\.1\.1 \("):
        listen("999.1.1.1", 0)
    (tmp_path / "good.yaml").write_text(f"model:\n  backend: gguf\n  path: {chat_model[1]}\n")
    assert tinygpt(["serve", "--cfg-path", str(tmp_path / "good.yaml"), "--host", "no-such-host.invalid"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --host: cannot resolve host no-such-host.invalid"), err
