"""Three demo defects found in review, each kept fixed: generation settings out of the sliders' ranges sent through
the API (gradio's own range check raised before the handler, with a console traceback), Regenerate on an empty chat
while another session's answer is written (its button stayed locked until that answer ended), and attaching an image
while the bounded queue was full or nearly so (the attach step and the engine's head start took queue places)."""

from __future__ import annotations

import json
import threading
from contextlib import contextmanager
from pathlib import Path

import pytest

from test_demo import SHAPES, Scripted, demo_config, free_port
from server_fixtures import wait_for
from test_demo_review import demo_pages
from tinygpt.demo.examples import example_path
from tinygpt.demo.handlers import Handlers

OTHER = str(example_path(1))  # a second image (the same file twice is one upload path: prepared once)
VALID = (12, 0.0, 0.9, 1.0, 0)  # max_new_tokens, temperature, top_p, repetition_penalty, seed


class Named(Scripted):
    name, context_length = "scripted", 1024


@pytest.fixture(scope="module")
def scripted_demo(tmp_path_factory):
    """The demo over `Named` (answers "fine"), served in-process: (url, engine)."""
    from tinygpt.demo.app import build_demo, launch

    engine, cfg = Named("fine"), demo_config()
    demo = build_demo(engine, cfg, Handlers(engine, cfg, tmp_path_factory.mktemp("drawn")))  # type: ignore
    assert not Path(build_demo.__code__.co_filename).with_suffix(".pyi").exists()  # gradio's stub for a subclass
    port = free_port()
    launch(demo, cfg, port=port, prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{port}/", engine
    demo.close()


# ------------------------------------------------------------------------------------------------ settings via the API
OUT_OF_RANGE = [
    ((0, 0.0, 0.9, 1.0, 0), "max_new_tokens: expected a number from 1 to 1024, got 0"),
    ((99999, 0.0, 0.9, 1.0, 0), "max_new_tokens: expected a number from 1 to 1024, got 99999"),
    ((12, -1, 0.9, 1.0, 0), "temperature: expected a number from 0 to 2, got -1"),
    ((12, 0.0, 0, 1.0, 0), "top_p: expected a number from 0.05 to 1, got 0"),
    ((12, 0.0, 2, 1.0, 0), "top_p: expected a number from 0.05 to 1, got 2"),
    ((12, 0.0, 0.9, 0, 0), "repetition_penalty: expected a number from 0.5 to 2, got 0"),
    ((12, 0.0, 0.9, 1.0, -5), "seed: expected a whole number from 0 to 18446744073709551615, or empty (a new "
                              "one each time), got -5"),
]


@pytest.mark.slow  # ~5 s: a served demo, a dozen calls
@pytest.mark.parametrize("settings, reason", OUT_OF_RANGE)
def test_out_of_range_settings_through_the_api_are_a_notice_not_a_traceback(scripted_demo, capfd, settings, reason):
    """gradio's Slider.preprocess refused a value outside the slider's range with gr.Error before Handlers.respond
    ran: a traceback on the console (gradio/queueing.py, "gradio.exceptions.Error: 'Value 0 is less than minimum
    value 1.'") and gradio's bare message to the client. Now respond checks the same ranges: a notice naming the
    setting and its range, the question not answered, and the server answers the next call."""
    from gradio_client import Client

    url, engine = scripted_demo
    client = Client(url, verbose=False, download_files=False)
    _, history = client.predict({"text": "hi", "files": []}, [], "none", "", api_name="/add_message")
    asked = len(engine.asked)
    capfd.readouterr()
    final, _ = client.predict(history, *settings, api_name="/respond")
    assert final[:-1] == history and final[-1]["metadata"]["title"] == "⚠️ Not answered"
    assert final[-1]["content"][0]["text"] == reason
    assert len(engine.asked) == asked  # never reached the engine
    err = capfd.readouterr().err
    assert "Traceback" not in err, err
    answered, _ = client.predict(history, *VALID, api_name="/respond")  # the server keeps running
    assert answered[-1]["content"][0]["text"] == "fine"


def _raw_respond(url: str, history: list, settings: str) -> list:
    """/respond called as any HTTP client may (JSON with NaN, Infinity, strings): the completed outputs."""
    import httpx

    body = '{"data": [' + json.dumps(history) + ", " + settings + "]}"
    posted = httpx.post(url + "gradio_api/call/respond", content=body, headers={"content-type": "application/json"})
    assert posted.status_code == 200, posted.text
    events = httpx.get(url + f"gradio_api/call/respond/{posted.json()['event_id']}", timeout=60).text
    kind, data = [line.split(": ", 1)[1] for line in events.strip().splitlines() if line.strip()][-2:]
    assert kind == "complete", events
    return json.loads(data)


@pytest.mark.slow  # ~3 s on the served demo
@pytest.mark.parametrize("settings, reason", [
    ("NaN, 0.0, 0.9, 1.0, 0", "max_new_tokens: expected a number from 1 to 1024, got nan"),
    ("null, 0.0, 0.9, 1.0, 0", "max_new_tokens: expected a number from 1 to 1024, got None"),
    ('12, "warm", 0.9, 1.0, 0', "temperature: expected a number from 0 to 2, got 'warm'"),
    ("12, 0.0, 0.9, 1.0, NaN", "seed: expected a whole number from 0 to 18446744073709551615, or empty (a new one "
                               "each time), got nan"),
    ("12, 0.0, 0.9, 1.0, Infinity", "seed: expected a whole number from 0 to 18446744073709551615, or empty (a new "
                                    "one each time), got inf"),
    ('12, 0.0, 0.9, 1.0, "abc"', "seed: expected a whole number from 0 to 18446744073709551615, or empty (a new one "
                                 "each time), got 'abc'"),
])
def test_non_numeric_or_non_finite_settings_are_a_notice_not_a_traceback(scripted_demo, capfd, settings, reason):
    """A seed of NaN, Infinity or "abc" (JSON from any HTTP client; gradio_client cannot send NaN) failed in
    Number.preprocess (ComponentProcessingError: "cannot convert float NaN to integer"), a NaN max_new_tokens in
    respond's int() (ValueError): console tracebacks and an error without a message."""
    from gradio_client import Client

    url, engine = scripted_demo
    _, history = Client(url, verbose=False, download_files=False).predict({"text": "hi", "files": []}, [], "none", "",
                                                                          api_name="/add_message")
    capfd.readouterr()
    final = _raw_respond(url, history, settings)[0]  # (history, view, the view's state)
    assert final[:-1] == history and final[-1]["metadata"]["title"] == "⚠️ Not answered"
    assert final[-1]["content"][0]["text"] == reason
    err = capfd.readouterr().err
    assert "Traceback" not in err, err


def test_the_handler_checks_the_sliders_ranges(tmp_path):
    """Handlers.respond itself refuses what the sliders would not send (a gr.Warning and a notice), takes what they
    send (the seed empty: None; a whole-number float seed from the number box) and a value at a range's end."""
    engine = Named("fine")
    h = Handlers(engine, demo_config(), tmp_path)  # type: ignore[arg-type]
    _, history = h.add_message({"text": "hi", "files": []}, [], "none", "")
    with pytest.warns(UserWarning, match=r"top_p: expected a number from 0\.05 to 1, got 1\.5"):
        *_, (final, _, _) = h.respond(history, 12, 0.0, 1.5, 1.0, 0)
    assert final[-1]["metadata"]["title"] == "⚠️ Not answered" and not engine.asked
    for settings in [(1024, 2.0, 0.05, 0.5, None), (1, 0.0, 1.0, 2.0, 7.0), (12.0, 0, 1, 1, 18446744073709551615)]:
        *_, (final, _, _) = h.respond(history, *settings)
        assert final[-1] == {"role": "assistant", "content": "fine"}, settings


# ------------------------------------------------------------------------------------------------ in a browser
class Gated:
    """A ChatEngine stand-in whose answers ("w1 " then "done") wait at a gate the test opens; it records each stream
    and each prepare (without the engine's lock, so a prepare is recorded the moment it is asked for)."""

    name, context_length = "gated", 1024

    def __init__(self):
        self.gate, self.streams, self.prepared, self._lock = threading.Event(), [], [], threading.Lock()

    def prepare(self, messages):
        self.prepared.append(messages)

    def stream(self, messages, settings=None, cancel=None):
        with self._lock:
            self.streams.append(messages)
            yield f"w{len(self.streams)} "
            self.gate.wait(120)
            yield "done"


@contextmanager
def _gated_demo(tmp_path: Path, pages: int, **limits):
    """(url, pages of the demo over `Gated` in headless Chromium (one session each), the engine); skipped like
    tests/test_demo_browser.py. The gate is opened on the way out."""
    gated = Gated()
    try:
        with demo_pages(tmp_path, gated, pages, **limits) as (url, opened):
            yield url, opened, gated
            gated.gate.set()  # before the browser closes: an answer still waiting would hold the demo's close
    finally:
        gated.gate.set()


UNLOCKED = "!document.querySelector('#message textarea').disabled && !document.querySelector('#regenerate').disabled"


@pytest.mark.slow  # ~10 s: a browser, two sessions
def test_regenerate_on_an_empty_chat_answers_at_once_while_another_answer_is_written(tmp_path):
    """Regenerate on an empty chat showed its toast at once, but the answer step chained to it still waited for the
    engine's slot behind another session's answer, and Regenerate stayed locked until that answer ended. Now nothing
    to regenerate ends the chain: the button (and the textbox) are unlocked while the other answer is still written,
    and no answer is asked of the engine."""
    with _gated_demo(tmp_path, pages=2) as (_, (first, second), gated):
        first.locator("#message textarea").fill("hi")
        first.locator("#message textarea").press("Enter")
        first.wait_for_function("document.querySelectorAll('#chat .bot').length > 0")  # the engine is busy
        second.locator("#regenerate").click()
        second.wait_for_selector("text=nothing to regenerate: ask something first")
        second.wait_for_function(UNLOCKED, timeout=20_000)  # the other answer waits at the gate for ever
        assert not gated.gate.is_set() and len(gated.streams) == 1
        assert "Error" not in second.locator("#chat").inner_text()  # no error badge on the chat
        gated.gate.set()
        first.wait_for_function(UNLOCKED)
        assert "done" in first.locator("#chat").inner_text() and len(gated.streams) == 1


def _until(page, done, seconds: float = 20) -> bool:
    """Waits (in the page's event loop) until done() holds, at most `seconds`; whether it did."""
    for _ in range(int(seconds * 20)):
        if done():
            return True
        page.wait_for_timeout(50)
    return done()


@pytest.mark.slow  # ~10 s: a browser, two client sessions
def test_attaching_an_image_takes_no_place_in_the_queue(tmp_path):
    """The step that notices attached images was queued, and the engine's head start (`prepare`) after it waited in
    the queue for the engine's slot: with limits.queue_size 1 and an answer being written, attaching an image took
    the only place (for the whole answer, through prepare), so that another user's message was refused as "queue is
    full"; with the queue full, attaching an image was itself refused (an error toast). Now neither takes a place:
    the head start runs beside the queue and waits for the engine's lock."""
    from gradio_client import Client
    from gradio_client.utils import Status

    with _gated_demo(tmp_path, pages=2, queue_size=1) as (url, (first, second), gated):
        client = Client(url, verbose=False, download_files=False)
        _, history = client.predict({"text": "first", "files": []}, [], "none", "", api_name="/add_message")
        writing = client.submit(history, *VALID, api_name="/respond")
        assert _until(first, lambda: gated.streams)  # the answer is written: out of the queue, in the engine's slot
        first.locator("#message input[type=file]").set_input_files(SHAPES)  # the queue is empty: attach
        first.wait_for_selector("#message img")
        first.locator("#message textarea").press_sequentially("what is it?", delay=20)
        assert _until(first, lambda: gated.prepared)  # the head start is asked for while the answer is written
        assert len(gated.prepared) == 1 and gated.prepared[0][-1]["content"][0]["image"].where == "shapes_1.png"
        other = Client(url, verbose=False, download_files=False)  # another user sends: the place is free
        _, history2 = other.predict({"text": "second", "files": []}, [], "none", "", api_name="/add_message")
        waiting = other.submit(history2, *VALID, api_name="/respond")
        assert _until(first, lambda: waiting.status().code in (Status.IN_QUEUE, Status.FINISHED))
        assert waiting.status().code == Status.IN_QUEUE  # it waits for the engine, in the only place: the queue is full
        second.locator("#message input[type=file]").set_input_files(OTHER)  # attaching now is not refused
        second.wait_for_selector("#message img")
        assert _until(second, lambda: len(gated.prepared) == 2)
        assert gated.prepared[1][-1]["content"][0]["image"].where == Path(OTHER).name
        assert not second.get_by_text("Queue is full").count() and not first.get_by_text("Queue is full").count()
        gated.gate.set()
        assert writing.result(timeout=60)[0][-1]["content"][0]["text"] == "w1 done"
        assert waiting.result(timeout=60)[0][-1]["content"][0]["text"] == "w2 done"


def test_a_stop_that_comes_before_gradio_blocks_still_closes_the_demo_cleanly(tmp_path, monkeypatch):
    """SIGTERM (handled as Ctrl-C) that arrived after the server answered but before gradio's block_thread took it
    ended the demo with "interrupted" and status 130 instead of 0 (a flaky test_sigterm_stops_the_demo_as_ctrl_c_does
    under load). Now launch closes the server and returns as gradio's block_thread does."""
    import socket

    from tinygpt.demo import app

    def stopped_while_printing(*args, **kwargs):
        raise KeyboardInterrupt

    engine, cfg = Named("fine"), demo_config()
    demo = app.build_demo(engine, cfg, Handlers(engine, cfg, tmp_path))  # type: ignore[arg-type]
    monkeypatch.setattr(app, "serving_lines", stopped_while_printing)
    port = free_port()
    assert app.launch(demo, cfg, port=port) is None  # no KeyboardInterrupt escapes
    with socket.socket() as probe:  # the server is closed: its port is free again
        probe.bind(("127.0.0.1", port))


class _Blocked(Scripted):
    """prepare waits until released (the engine busy with another answer), recording what it was asked."""

    def __init__(self):
        super().__init__("fine")
        self.release, self.prepared = threading.Event(), []

    def prepare(self, messages):
        self.release.wait(60)
        self.prepared.append([part["image"].where for part in messages[-1]["content"]])  # ImageRef: the file name


class _Session:
    def __init__(self, session_hash: str):
        self.session_hash = session_hash


def test_each_session_keeps_its_head_start_and_a_sent_message_drops_its_own(tmp_path):
    """The background head start held one pending request for every session: two sessions attaching while the
    engine was busy lost the first one's. Now each session keeps its newest, in the order they asked, and a session
    that sends its message before its head start began drops it (the answer does that work itself)."""
    engine, cfg = _Blocked(), demo_config()
    h = Handlers(engine, cfg, tmp_path)  # type: ignore[arg-type]
    a, b, c = _Session("a"), _Session("b"), _Session("c")
    h.attached({"text": "", "files": [SHAPES]}, [], None, a)  # the thread starts on it and waits for the engine
    assert wait_for(lambda: h._pending == {}, 30)
    h.attached({"text": "", "files": [OTHER]}, [], None, b)
    h.attached({"text": "", "files": [SHAPES, OTHER]}, [], None, c)
    h.add_message({"text": "which?", "files": [SHAPES, OTHER]}, [], "none", "", c)  # c sent first: dropped
    engine.release.set()
    assert wait_for(lambda: len(engine.prepared) == 2 and not h._preparing, 30)
    assert engine.prepared == [[Path(SHAPES).name], [Path(OTHER).name]]

