"""A user's attempts to break the demo, each once a bug: the handlers and endpoints the UI calls, and the command
line (the fixtures and helpers are tests/test_demo.py's)."""

from __future__ import annotations

import shutil
import socket
import struct
import threading
import time
import zlib
from contextlib import contextmanager
from pathlib import Path

import gradio as gr
import pytest

from test_demo import (  # noqa: F401 (engine, launch_configs and served are fixtures)
    SHAPES, Scripted, demo_config, engine, free_port, launch_configs, served,
)
from tinygpt.chat.launch import Limits
from tinygpt.demo import cli
from tinygpt.demo.handlers import Handlers
from tinygpt.demo.uploads import check_image_file
from tinygpt.errors import UserError


# ------------------------------------------------------------------------------------------------ the command line
@pytest.mark.parametrize("host, reason", [("10.255.255.1", "cannot listen on 10.255.255.1 ("),
                                          ("999.1.1.1", "cannot resolve host 999.1.1.1 (")])
def test_a_host_that_is_not_this_machines_stops_before_the_model_loads(monkeypatch, capsys, host, reason):
    """Without --port, a --host that does not resolve or that is not one of this machine's addresses loaded the
    model, then gradio tried its 100 ports on it (one uvicorn ERROR line each) and hung instead of exiting."""
    def never(cfg):
        raise AssertionError("the model was loaded although the host cannot be served on")

    monkeypatch.setattr(cli, "load_launch_config", lambda path: object())
    monkeypatch.setattr(cli, "open_engine", never)
    assert cli.main(["--host", host]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: --host: {reason}"), err
    assert ":0" not in err[0]  # the free port the check used is not the user's business


def test_no_free_port_in_gradios_range_names_our_flag(monkeypatch, capsys):
    """Without --port gradio tries 7860-7959; with all of them taken the error read "cannot listen on
    127.0.0.1:None (... passing the `server_port` parameter to `launch()`)", advice the command's user cannot take."""
    class Engine(Scripted):
        name, context_length = "scripted", 1024

    monkeypatch.delenv("GRADIO_SERVER_PORT", raising=False)
    monkeypatch.setattr(cli, "load_launch_config", lambda path: demo_config())
    monkeypatch.setattr(cli, "open_engine", lambda cfg: Engine("unused"))
    held = []
    try:
        for port in range(7860, 7960):
            try:
                held.append(socket.create_server(("127.0.0.1", port)))
            except OSError:  # already taken by someone else: as good
                pass
        assert cli.main([]) == 2
    finally:
        for server in held:
            server.close()
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --port: gradio cannot listen on 127.0.0.1 (Cannot find empty port in range: 7860-7959); "
                   "give a free port with --port"], err


# ------------------------------------------------------------------------------------------------ the handlers
def test_box_answers_are_drawn_after_the_temporary_folder_was_cleaned(tmp_path):
    """The drawn views go to a temporary folder made at start-up; once it was removed (a /tmp cleaner, a long-running
    demo) every answer with boxes ended in FileNotFoundError instead of the answer."""
    drawn = tmp_path / "drawn"
    h = Handlers(Scripted("<p>triangle</p> {<39><38><65><65>}"), demo_config(), drawn)  # type: ignore[arg-type]
    _, history = h.add_message({"text": "", "files": [SHAPES]}, [], "grounding", "")
    shutil.rmtree(drawn, ignore_errors=True)
    *_, (final, view, current) = h.respond(history, 12, 0.0, 0.9, 1.0, 0)
    text, picture = final[-1]["content"]
    assert Path(picture["path"]).is_file() and Path(picture["path"]).parent == drawn and current == SHAPES


def test_an_image_deleted_from_disk_says_that_clear_starts_over(tmp_path):
    """An uploaded file removed while the demo ran (gradio's upload folder cleaned) refused every later turn with
    the engine's 'messages[0].content[0].image: image file not found: <path>', and nothing said what to do."""
    image = shutil.copy(SHAPES, tmp_path / "cat.png")
    h = Handlers(Scripted("a cat"), demo_config(), tmp_path / "drawn")  # type: ignore[arg-type]
    _, history = h.add_message({"text": "what is it?", "files": [image]}, [], "none", "")
    Path(image).unlink()
    with pytest.warns(UserWarning, match="no longer on disk"):
        *_, (final, *_views) = h.respond(history, 12, 0.0, 0.9, 1.0, 0)
    assert final[-1]["metadata"]["title"] == "⚠️ Not answered"
    assert final[-1]["content"] == "cat.png: this image of the conversation is no longer on disk; Clear starts a new " \
                                   "conversation"


@pytest.mark.parametrize("text, reason", [("what is <ImageHere>?", "may not contain <ImageHere>"),
                                          ("smile \ud83d", "unpaired UTF-16 surrogate")])
def test_a_text_the_engine_refuses_stays_in_the_box(tmp_path, text, reason):
    """A text with <ImageHere> or half an emoji (a lone surrogate: JSON can carry one) was sent, emptying the
    textbox, and then refused by the engine as "messages[0].content[1].text: ...; send images as image parts"."""
    h = Handlers(Scripted("unused"), demo_config(), tmp_path)  # type: ignore[arg-type]
    with pytest.warns(UserWarning, match=reason):
        box, history = h.add_message({"text": text, "files": [SHAPES]}, [], "none", "")
    assert box == gr.skip() and history[-1]["metadata"]["title"] == "⚠️ Not sent"  # the textbox keeps it
    assert "messages[0]" not in history[-1]["content"]


def test_a_question_stopped_before_its_answer_began_is_not_merged_into_the_next(tmp_path):
    """Stop before the first piece of an answer left the question unanswered in the chat; the next question was then
    sent merged with it ("[vqa] what colour is it? [vqa] how many shapes?"), while the chat showed two questions."""
    scripted = Scripted("three")
    h = Handlers(scripted, demo_config(), tmp_path)  # type: ignore[arg-type]
    _, history = h.add_message({"text": "what colour is it?", "files": [SHAPES]}, [], "vqa", "")
    stream = h.respond(history, 12, 0.0, 0.9, 1.0, 0)
    stream.close()  # Stop, before the answer began: the chat keeps the question alone
    _, history = h.add_message({"text": "how many shapes?", "files": []}, history, "vqa", "")
    assert [m["role"] for m in history] == ["user", "assistant", "user"]
    assert history[1]["metadata"]["title"] == "⏹️ Stopped"
    *_, (final, _, _) = h.respond(history, 12, 0.0, 0.9, 1.0, 0)
    assert scripted.asked[-1] == [{"role": "user", "content": [{"type": "text", "text": "[vqa] how many shapes?"}]}]
    assert final[-1] == {"role": "assistant", "content": "three"}


def _png_header(path: Path, width: int, height: int) -> str:
    """A PNG that says it is width x height (RGB) and holds one row: as small as a compressed huge image's header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\x00" * (3 * width + 1))) + chunk(b"IEND", b""))
    return str(path)


def test_an_image_with_too_many_pixels_is_refused_and_never_decoded_for_the_view(tmp_path):
    """Attaching an image over PIL's decompression-bomb guard (2 x 89.5 M pixels) made the view's handlers raise
    (a console traceback, "Error" on the view) and add_message call it "truncated or damaged"; one over the demo's
    limit but under PIL's was decoded in full for the view on every change of the textbox."""
    bomb, big = _png_header(tmp_path / "bomb.png", 20_000, 10_000), _png_header(tmp_path / "big.png", 5000, 4000)
    with pytest.raises(UserError, match=r"bomb\.png: the image has more pixels than this demo's limit of 16,000,000"):
        check_image_file(bomb, Limits())
    h = Handlers(Scripted("unused"), demo_config(), tmp_path)  # type: ignore[arg-type]
    for path in (bomb, big):
        message = {"text": "", "files": [path]}
        assert h.follow(message, [], "", None) == (gr.skip(), gr.skip())
        assert h.redraw(message, [], "1, 2, 3, 4") is None
        with pytest.warns(UserWarning, match="pixels"):
            box, history = h.add_message(message, [], "caption", "")
        assert box == gr.skip() and "Not sent" in history[-1]["metadata"]["title"]


# ------------------------------------------------------------------------------------------------ the endpoints
@pytest.mark.slow  # ~3 s on the served demo
def test_regenerate_on_an_empty_chat_changes_nothing_and_prints_no_traceback(served, capfd):  # noqa: F811
    """Regenerate before anything was asked raised a gr.Error: red "Error" badges on the chat and the textbox in the
    browser (without the message) and a traceback on the console. Now: a warning (the browser test sees its toast)
    and nothing changes."""
    from gradio_client import Client

    client = Client(served[0], verbose=False, download_files=False)
    capfd.readouterr()
    history, box = client.predict([], api_name="/regenerate")
    assert history == box == {"__type__": "update"}  # no change
    err = capfd.readouterr().err
    assert "Traceback" not in err, err


# ------------------------------------------------------------------------------------------------ in a browser
class Slow:
    """A ChatEngine stand-in whose answers take 25 pieces of 0.2 s (one at a time), recording each stream."""

    name, context_length = "slow", 1024

    def __init__(self):
        self.streams, self.prepared, self._lock = [], [], threading.Lock()

    def prepare(self, messages):
        self.prepared.append(messages)

    def stream(self, messages, settings=None, cancel=None):
        record = {"pieces": 0, "closed_early": False}
        self.streams.append(record)
        with self._lock:
            try:
                for i in range(25):
                    time.sleep(0.2)
                    record["pieces"] += 1
                    yield f"w{len(self.streams)}.{i} "
            except GeneratorExit:
                record["closed_early"] = True
                raise


@contextmanager
def demo_pages(tmp_path: Path, chat_engine, pages: int = 1, **limits):
    """(url, pages of the demo over `chat_engine` in headless Chromium, one session each); skipped like
    tests/test_demo_browser.py."""
    if not Path("/usr/bin/chromium").is_file():
        pytest.skip("/usr/bin/chromium is absent (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="the Python package playwright is not installed")
    from tinygpt.demo.app import build_demo, launch

    cfg = demo_config(**limits)
    demo = build_demo(chat_engine, cfg, Handlers(chat_engine, cfg, tmp_path))  # type: ignore[arg-type]
    port = free_port()
    launch(demo, cfg, port=port, prevent_thread_lock=True, quiet=True)
    try:
        with sync_api.sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", headless=True)
            opened = [browser.new_page() for _ in range(pages)]  # one session each
            for page in opened:
                page.set_default_timeout(60_000)
                page.goto(f"http://127.0.0.1:{port}/")
                page.wait_for_selector("#message textarea")
            yield f"http://127.0.0.1:{port}/", opened
            browser.close()
    finally:
        demo.close()


@contextmanager
def _slow_demo_pages(tmp_path: Path, pages: int = 1, **limits):
    """(pages of the demo over `Slow` in headless Chromium, the engine)."""
    slow = Slow()
    with demo_pages(tmp_path, slow, pages, **limits) as (_, opened):
        yield opened, slow


@pytest.fixture
def slow_page(tmp_path):
    with _slow_demo_pages(tmp_path) as (pages, slow):
        yield pages[0], slow


UNLOCKED = "!document.querySelector('#message textarea').disabled"


@pytest.mark.slow  # ~15 s: a browser and three slow answers
def test_regenerate_is_locked_while_an_answer_is_written(slow_page):
    """Regenerate clicked while an answer was streaming let that answer run to its end and then unlocked the textbox
    while the regenerated answer was still waiting for the engine (a message sent then was overwritten by it). Now
    Regenerate is locked with the textbox until the answer is done or stopped."""
    page, slow = slow_page
    page.locator("#regenerate").click()  # on the empty chat: a message, and the button is not left locked
    page.wait_for_selector("text=nothing to regenerate: ask something first")
    page.wait_for_function("!document.querySelector('#regenerate').disabled")
    page.locator("#message textarea").fill("hi")
    page.locator("#message textarea").press("Enter")
    page.wait_for_function("document.querySelectorAll('#chat .bot').length > 0")
    page.wait_for_function("document.querySelector('#regenerate').disabled", timeout=2_000)
    deadline = time.monotonic() + 30  # the bot bubble can show before the engine's stream starts (a loaded host)
    while not slow.streams and time.monotonic() < deadline:
        time.sleep(0.05)
    assert slow.streams and slow.streams[0]["pieces"] < 20  # locked while the answer is written
    page.locator("#regenerate").click(force=True)  # a click on the locked button does nothing
    page.wait_for_function(UNLOCKED)
    assert not page.locator("#regenerate").is_disabled() and slow.streams[0] == {"pieces": 25, "closed_early": False}
    assert len(slow.streams) == 1
    page.locator("#regenerate").click()  # after the answer: a new one, Regenerate locked meanwhile
    page.wait_for_function("document.querySelector('#regenerate').disabled")
    page.wait_for_function(UNLOCKED)
    assert [s["pieces"] for s in slow.streams] == [25, 25] and "w2.24" in page.locator("#chat").inner_text()
    assert not page.locator("#regenerate").is_disabled()
    page.locator("#message textarea").fill("more")  # Stop unlocks both
    page.locator("#message textarea").press("Enter")
    page.wait_for_function("document.querySelector('#regenerate').disabled")
    page.locator("#stop").click()
    page.wait_for_function(UNLOCKED + " && !document.querySelector('#regenerate').disabled")
    assert slow.streams[-1]["closed_early"] or slow.streams[-1]["pieces"] < 25


@pytest.mark.slow  # ~15 s: a browser, two sessions
def test_typing_holds_no_place_in_the_queue(tmp_path):
    """Every keystroke queued a `prepare` for the engine's slot; while another user's answer was written it waited
    there, holding a place in the bounded queue, so that a user typing and sending alone was refused ("queue is
    full", an "Error" badge, the message not sent) with limits.queue_size 2, which the old demo filled. Now neither
    typing nor attaching takes a place (attaching starts `prepare` in a background thread;
    test_demo_leftovers.py checks a queue of 1)."""
    with _slow_demo_pages(tmp_path, pages=2, queue_size=2) as ((first, second), slow):
        first.locator("#message textarea").fill("hi")
        first.locator("#message textarea").press("Enter")
        first.wait_for_function("document.querySelectorAll('#chat .bot').length > 0")  # the engine is busy
        second.locator("#message textarea").press_sequentially("hello", delay=30)
        second.wait_for_timeout(300)
        second.locator("#message textarea").press("Enter")
        second.wait_for_function("document.querySelectorAll('#chat .bot').length > 0")  # answered, after the first
        second.wait_for_function(UNLOCKED)
        assert len(slow.streams) == 2 and not slow.prepared and "w2.24" in second.locator("#chat").inner_text()
        second.locator("#message input[type=file]").set_input_files(SHAPES)  # an image: its head start, once
        second.wait_for_selector("#message img")
        second.locator("#message textarea").press_sequentially("what is it?", delay=30)
        second.wait_for_timeout(500)
        assert len(slow.prepared) == 1 and slow.prepared[0][-1]["content"][0]["image"].where == "shapes_1.png"



def test_the_demo_sends_no_telemetry(engine, tmp_path, monkeypatch):  # noqa: F811
    """gradio's analytics were on (the suite turns them off in conftest, a user's shell does not): its launch posted
    to api.gradio.app, from a demo documented as local-only."""
    from tinygpt.demo.app import build_demo

    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "True")
    cfg = demo_config()
    assert build_demo(engine, cfg, Handlers(engine, cfg, tmp_path)).analytics_enabled is False


@pytest.mark.slow  # ~15 s: a demo process starts (gradio, the tiny model) and is stopped
def test_sigterm_stops_the_demo_as_ctrl_c_does(launch_configs):  # noqa: F811
    """SIGTERM (systemd, docker stop, kill) killed the demo with status 143 and no word; the server already stopped
    on it as on Ctrl-C. Now both close gradio's server and exit 0."""
    import signal
    import subprocess
    import sys
    import urllib.request

    port = free_port()
    repo = Path(__file__).resolve().parents[1]
    demo = subprocess.Popen([sys.executable, str(repo / "demo.py"), "--cfg-path", str(launch_configs["torch"]),
                             "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/config", timeout=5) as page:
                    assert page.status == 200
                break
            except OSError:
                assert demo.poll() is None and time.monotonic() < deadline, demo.stdout.read() if demo.poll() else ""
                time.sleep(0.5)
        demo.send_signal(signal.SIGTERM)
        out, _ = demo.communicate(timeout=60)
    finally:
        if demo.poll() is None:
            demo.kill()
    assert demo.returncode == 0, out[-2000:]
    assert "Traceback" not in out, out[-2000:]
