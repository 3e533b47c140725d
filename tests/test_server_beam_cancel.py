"""Beam search (``num_beams`` > 1, the PyTorch backend) stops when its job is cancelled (tinygpt.serve.runner): the
engine's `chat` / `complete` take the cancel event, a client that leaves stops the server's beam search at its next
step and the server answers on, and the server stopping (Runner.shutdown, a 503) stops it too.

The tiny model is forced to write ``<`` at every step (a hook on its LM head), so an answer never ends by itself: a
generation that ends before its budget was cancelled. The hook also acts at a chosen step (sets the cancel event,
waits for the test, stops the server), so where a generation stands when it is cancelled is known exactly: the
assertions count the tokens generated, never the time taken. Helpers: tests/server_fixtures.py."""

from __future__ import annotations

import json
import socket
import threading
import urllib.parse

import httpx
import pytest

from server_fixtures import LIMITS, NAME, Wrapped, openai_client, post, user, wait_for
from tinygpt.chat import ChatEngine, GenerationSettings
from tinygpt.serve.app import create_app
from tinygpt.serve.background import BackgroundServer

LT = 27  # "<"
BEAMS = GenerationSettings(max_new_tokens=200, num_beams=2)
AT = 5  # the step at which the tests cancel


class Steps:
    """A forward hook on the LM head: forces ``<`` at every step and runs `actions[k]()` during step k (1: the
    prompt's forward pass, which gives the first token)."""

    def __init__(self, model):
        self.step, self.actions = 0, {}
        model.language_model.lm_head.register_forward_hook(self)

    def __call__(self, module, args, out):
        self.step += 1
        action = self.actions.pop(self.step, None)
        if action is not None:
            action()
        out = out.clone()
        out[:, -1] = -1e4
        out[:, -1, LT] = 1e4
        return out

    def at(self, step: int, action) -> None:
        self.step, self.actions = 0, {step: action}


@pytest.fixture(scope="module")
def forced(chat_model):
    """(engine over the tiny PyTorch model with beam search by default, its Steps hook)."""
    from tinygpt.chat.torch_backend import TorchBackend
    from tinygpt.model import load_vlm

    model = load_vlm(chat_model[0])
    return ChatEngine(TorchBackend(model), BEAMS), Steps(model)


def test_the_engines_beam_search_stops_at_the_next_step_once_cancelled(forced):
    engine, steps = forced
    steps.actions.clear()
    assert engine.chat([user("Hello")], BEAMS.with_(max_new_tokens=12)) == "<" * 12  # left alone: the whole budget
    assert engine.backend.last_stats.generated_tokens == 12
    for answer in (lambda cancel: engine.chat([user("Hello")], BEAMS, cancel),
                   lambda cancel: engine.complete("Hello", BEAMS, cancel)):
        cancel = threading.Event()
        steps.at(AT, cancel.set)
        text = answer(cancel)
        stats = engine.backend.last_stats
        assert (stats.generated_tokens, stats.stopped_by) == (AT, "cancelled"), stats
        assert text.strip("< ") == "" and text.count("<") == AT


def test_a_client_that_leaves_stops_the_servers_beam_search(forced):
    engine, steps = forced
    cancels: list[threading.Event] = []

    def chat(messages, settings, cancel=None):  # the engine's, recording the job's cancel event
        cancels.append(cancel)
        return engine.chat(messages, settings, cancel)

    reached, release = threading.Event(), threading.Event()
    steps.at(AT, lambda: (reached.set(), release.wait(30)))
    with BackgroundServer(create_app(Wrapped(engine, chat=chat), NAME, LIMITS)) as running:
        # a client that leaves once its answer is being generated: a raw connection, closed when step AT is reached
        # (a client timeout instead could expire before a loaded machine had even started the job)
        address = urllib.parse.urlsplit(running.url)
        body = json.dumps({"model": NAME, "messages": [user("go on")]}).encode()
        leaver = socket.create_connection((address.hostname, address.port), timeout=30)
        leaver.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                       b"Content-Length: %d\r\n\r\n" % len(body) + body)
        assert reached.wait(30), "the beam search did not start"
        leaver.close()  # it has gone, with no answer; the generation waits at step AT
        assert wait_for(lambda: bool(cancels) and cancels[0].is_set(), 20), "the job was not cancelled"
        release.set()
        assert wait_for(lambda: httpx.get(running.url + "/health").json()["queue"]["depth"] == 0, 20)
        stats = engine.backend.last_stats
        assert (stats.generated_tokens, stats.stopped_by) == (AT, "cancelled"), stats  # not 200
        client = openai_client(running)  # and the server answers on, beam search included
        reply = client.chat.completions.create(model=NAME, messages=[user("again")], max_tokens=3)
        assert reply.choices[0].message.content == "<<<" and reply.usage.completion_tokens == 3
        text = client.completions.create(model=NAME, prompt="again", max_tokens=3)
        assert text.choices[0].text == "<<<" and text.choices[0].finish_reason == "length"


def test_the_server_stopping_stops_a_running_beam_search(forced):
    engine, steps = forced
    app = create_app(engine, NAME, LIMITS)
    steps.at(AT, app.state.runner.shutdown)  # what the server does when it stops (SIGTERM, Ctrl+C)
    with BackgroundServer(app) as running:
        response = post(running, {"model": NAME, "messages": [user("go on")]})
        assert response.status_code == 503 and response.json()["error"]["code"] == "server_shutting_down"
        assert wait_for(lambda: httpx.get(running.url + "/health").json()["queue"]["depth"] == 0, 20)
        stats = engine.backend.last_stats
        assert (stats.generated_tokens, stats.stopped_by) == (AT, "cancelled"), stats  # not 200
        refused = httpx.post(running.url + "/v1/completions", json={"model": NAME, "prompt": "x"}, timeout=60)
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "server_shutting_down"
