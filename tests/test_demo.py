"""The gradio demo (tinygpt.demo): its pure parts (history <-> OpenAI messages, upload checks, box drawing, the
clicked region, the shipped examples), its handlers over a real ChatEngine, and the named endpoints the UI uses,
called with gradio_client against the demo served in-process (the command line: tests/test_demo_cli.py).

The engine is opened from a launch config naming conftest's decisive tiny model (random weights, seeded; logits
scaled so greedy choices are not near-ties), on the PyTorch backend and once on the GGUF one: it answers nonsense, but
every answer really goes through the engine and the demo. Answers with boxes come from a scripted engine
(`Scripted`) where noted; tests/test_demo_browser.py teaches a tiny model one."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
from PIL import Image

from tinygpt.chat import ChatEngine, GenerationSettings
from tinygpt.chat.launch import LaunchConfig, Limits, ModelChoice, load_launch_config, open_engine
from tinygpt.demo.conversation import (
    is_notice, last_question, notice, parse_region, shown, tagged_text, to_openai, user_message, without_last_answer,
)
from tinygpt.demo.drawing import PALETTE, click_region, region_marks, render_view, view_scale
from tinygpt.demo.examples import EXAMPLES_DIR, example_path, example_rows, example_scenes
from tinygpt.demo.handlers import Handlers
from tinygpt.demo.uploads import check_image_file, check_message_files
from tinygpt.errors import UserError
from tinygpt.tiny.synthetic.scenes import render_scene

REPO = Path(__file__).resolve().parents[1]
SHAPES = str(example_path(0))


def demo_config(max_new_tokens: int = 12, **limits) -> LaunchConfig:
    return LaunchConfig(Path("test.yaml"), ModelChoice("torch", "unused"),
                        GenerationSettings(max_new_tokens=max_new_tokens), Limits(**limits))


@pytest.fixture(scope="module")
def launch_configs(chat_model, tmp_path_factory):
    """Launch configs (the demo's own input) naming conftest's decisive tiny model: {"torch": yaml, "gguf": yaml}."""
    d = tmp_path_factory.mktemp("eval-configs")
    model_dir, gguf_dir = chat_model
    for backend, path in (("torch", model_dir), ("gguf", gguf_dir)):
        (d / f"{backend}.yaml").write_text(f"model:\n  backend: {backend}\n  path: {path}\n  device: cpu\n"
                                           "generation:\n  max_new_tokens: 12\n")
    return {"torch": d / "torch.yaml", "gguf": d / "gguf.yaml"}


@pytest.fixture(scope="module")
def engine(launch_configs):
    return open_engine(load_launch_config(launch_configs["torch"]))


class Scripted:
    """Stands in for a ChatEngine (Handlers only call `stream`): yields a fixed answer in pieces."""

    def __init__(self, answer: str):
        self.answer, self.asked = answer, []

    def stream(self, messages, settings=None, cancel=None):
        self.asked.append(messages)
        yield from (self.answer[i:i + 5] for i in range(0, len(self.answer), 5))

    def prepare(self, messages):
        pass


class Recording:
    """A ChatEngine seen through `stream` only, recording for each stream how many pieces it gave and whether it was
    closed before its end (GeneratorExit: what gradio's Stop does to the handler, and the handler to the engine)."""

    def __init__(self, engine: ChatEngine):
        self.engine, self.streams, self.prepared = engine, [], []

    def prepare(self, messages):
        self.prepared.append(messages)
        self.engine.prepare(messages)

    def stream(self, messages, settings=None, cancel=None):
        record = {"pieces": 0, "closed_early": False}
        self.streams.append(record)
        try:
            for piece in self.engine.stream(messages, settings, cancel):
                record["pieces"] += 1
                yield piece
        except GeneratorExit:
            record["closed_early"] = True
            raise


def _text_png(tmp_path: Path) -> str:
    path = tmp_path / "notes.png"
    path.write_text("this is text, not a picture\n")
    return str(path)


# ------------------------------------------------------------------------------------------------ the examples
def test_committed_examples_are_the_generators_scenes():
    scenes = example_scenes()
    for i, scene in enumerate(scenes):
        committed = np.asarray(Image.open(example_path(i)).convert("RGB"))
        assert (committed == np.asarray(render_scene(scene))).all(), example_path(i)
        assert example_path(i).stat().st_size < 5_000
    assert sorted(p.name for p in EXAMPLES_DIR.glob("*.png")) == [example_path(i).name for i in range(3)]
    rows = example_rows()
    assert {task for _, task, _ in rows} == {"vqa", "refer", "caption", "grounding", "detection", "identify"}
    for message, task, region in rows:
        assert all(Path(f).is_file() for f in message["files"])
        text = tagged_text(task, message["text"], region, (224, 224))
        assert text.startswith(f"[{task}]")


# ------------------------------------------------------------------------------------------------ conversation
def test_history_to_openai_messages():
    history = [
        user_message("how many <shapes>?", ["/a.png", "/b.png"]),
        {"role": "assistant", "content": [shown("<p>one</p> {<1><2><3><4>}"), {"path": "/drawn.png"}]},
        # the same turn shapes as gradio hands them back (normalized content parts)
        {"role": "user", "content": [{"type": "file", "file": {"path": "/c.png"}, "alt_text": None},
                                     {"type": "text", "text": shown("and & this?")}]},
        notice("⚠️ Not answered", "prompt too long"),
        {"role": "user", "content": [{"type": "text", "text": "again"}]},
    ]
    assert history[0]["content"][-1] == "how many &lt;shapes&gt;?"
    assert to_openai(history) == [
        {"role": "user", "content": [{"type": "image", "image": "/a.png"}, {"type": "image", "image": "/b.png"},
                                     {"type": "text", "text": "how many <shapes>?"}]},
        {"role": "assistant", "content": "<p>one</p> {<1><2><3><4>}"},
        {"role": "user", "content": [{"type": "text", "text": "again"}]},  # the refused turn is left out
    ]
    assert is_notice(history[3]) and not is_notice(history[1])
    assert last_question(history) == "again" and last_question([]) == ""
    assert without_last_answer(history[:2]) == history[:1]
    with pytest.raises(UserError, match="nothing to regenerate"):
        without_last_answer([])
    text = "a <b> &amp; {<1><2>} ' \" & done"
    assert to_openai([user_message(text)])[0]["content"][0]["text"] == text


def test_regions_and_task_tags():
    assert parse_region("") is None and parse_region(None) is None
    assert parse_region("135, 203, 80.5, 148") == (80.5, 148, 135, 203)
    for bad, match in [("10, 20", "one corner"), ("1 2 3", "expected x1"), ("5, 5, 5, 9", "no area")]:
        with pytest.raises(UserError, match=match):
            parse_region(bad)
    assert tagged_text("none", " hello ") == "hello"
    assert tagged_text("refer", "[vqa] what colour?") == "[vqa] what colour?"  # a typed tag wins
    assert tagged_text("vqa", "how many?") == "[vqa] how many?"
    assert tagged_text("caption", "") == "[caption] Briefly describe this image."
    assert tagged_text("identify", "", "20, 10, 100, 50", (200, 100)) == "[identify] {<10><10><50><50>}"
    with pytest.raises(UserError, match="mark a region"):
        tagged_text("identify", "", "", (200, 100))
    with pytest.raises(UserError, match="attach an image"):
        tagged_text("identify", "", "1, 2, 3, 4", None)
    with pytest.raises(UserError, match="the vqa task needs a text"):
        tagged_text("vqa", "")


# ------------------------------------------------------------------------------------------------ uploads
def test_upload_checks(tmp_path):
    assert check_image_file(SHAPES, Limits()) == (224, 224)
    with pytest.raises(UserError, match=r"notes\.png: not a readable image"):
        check_image_file(_text_png(tmp_path), Limits())
    with pytest.raises(UserError, match="over this demo's upload limit"):
        check_image_file(SHAPES, Limits(max_upload_bytes=100))
    with pytest.raises(UserError, match="224x224 pixels is over"):
        check_image_file(SHAPES, Limits(max_image_pixels=100 * 100))
    with pytest.raises(UserError, match="3 images in one message; this demo takes at most 2"):
        check_message_files([SHAPES] * 3, Limits(max_images=2))
    assert check_message_files([SHAPES] * 2, Limits(max_images=2)) == [(224, 224)] * 2


# ------------------------------------------------------------------------------------------------ drawing
def test_boxes_are_drawn_on_an_enlarged_copy():
    image = Image.open(SHAPES).convert("RGB")
    before = image.tobytes()
    assert view_scale((224, 224)) == 2 and view_scale((1000, 300)) == 1 and view_scale((50, 10)) == 9
    view = render_view(image, [("small green triangle", (88, 87, 147, 146)), (None, (10, 10, 30, 30))])
    assert view.size == (448, 448) and image.tobytes() == before
    pixels = np.asarray(view)
    assert tuple(pixels[87 * 2 + 40, 88 * 2]) == PALETTE[0]  # the left edge of box 1, in view pixels
    assert tuple(pixels[10 * 2 + 25, 10 * 2]) == PALETTE[1]
    assert tuple(pixels[87 * 2 + 40, 88 * 2 + 20]) != PALETTE[0]  # inside the box: not painted


def test_two_clicks_make_a_region():
    region = click_region("", (161, 297), 2)
    assert region == "80, 148"
    assert region_marks(region) == ([], [(80, 148)])
    region = click_region(region, (270, 100), 2)
    assert region == "80, 50, 135, 148"
    assert region_marks(region) == ([("region", (80, 50, 135, 148))], [])
    assert click_region(region, (10, 10), 2) == "5, 5"  # a third click starts again
    assert region_marks("garbage") == ([], [])


# ------------------------------------------------------------------------------------------------ handlers
def test_a_turn_through_the_handlers(engine, tmp_path):
    h = Handlers(engine, demo_config(), tmp_path)
    box, history = h.add_message({"text": "how many shapes are there?", "files": [SHAPES]}, [], "vqa", "")
    assert box.interactive is False and box.value == {"text": "", "files": []}
    assert history == [user_message("[vqa] how many shapes are there?", [SHAPES])]
    steps = list(h.respond(history, 12, 0.0, 0.9, 1.0, 0))
    final = steps[-1][0]
    answer = engine.chat(to_openai(history), GenerationSettings(max_new_tokens=12))
    assert final[-1] == {"role": "assistant", "content": shown(answer)} and answer
    assert len(steps) >= 2  # streamed: the answer grows over several yields

    _, text_only = h.add_message({"text": "hello", "files": []}, [], "none", "")  # no image at all
    *_, (chatted, view, current) = h.respond(text_only, 4, 0.0, 0.9, 1.0, 0)
    assert chatted[-1]["role"] == "assistant" and view == gr.skip()
    again, locked = h.regenerate(final)
    assert again == history and locked.interactive is False
    # a text file named .png: a notice in the chat, the textbox untouched, then nothing to answer
    with pytest.warns(UserWarning, match="not a readable image"):
        box, refused = h.add_message({"text": "and this?", "files": [_text_png(tmp_path)]}, final, "none", "")
    assert box == gr.skip() and refused[:-1] == final and is_notice(refused[-1])
    assert list(h.respond(refused, 12, 0.0, 0.9, 1.0, 0)) == [(gr.skip(),) * 3]
    # a seed the generator cannot take (the seed box is a free number): a notice, never an exception
    with pytest.warns(UserWarning, match="seed"):
        (told, _, _), = list(h.respond(history, 4, 1.0, 0.9, 1.0, 2 ** 70))
    assert told[:-1] == history and is_notice(told[-1])
    with pytest.warns(UserWarning, match="3 images in one message"):
        h2 = Handlers(engine, demo_config(max_images=2), tmp_path)
        assert is_notice(h2.add_message({"text": "", "files": [SHAPES] * 3}, [], "none", "")[1][-1])


def test_the_gguf_backend_through_the_handlers(launch_configs, tmp_path):
    cfg = load_launch_config(launch_configs["gguf"])
    gguf = open_engine(cfg)
    h = Handlers(gguf, cfg, tmp_path)
    _, history = h.add_message({"text": "what is it?", "files": [SHAPES, SHAPES]}, [], "none", "")
    *_, (final, _, _) = h.respond(history, 8, 0.0, 0.9, 1.0, 0)
    assert final[-1]["content"] == shown(gguf.chat(to_openai(history), GenerationSettings(max_new_tokens=8)))


def test_an_attached_image_is_prepared_while_the_question_is_typed(launch_configs, tmp_path):
    """The textbox's change event (h.prepare) encodes a newly attached image and evaluates the prompt up to it; the
    answer is the cold one and its question evaluates only its own tokens. Typing more (same files) and a file the
    demo refuses reach no engine call."""
    cfg = load_launch_config(launch_configs["gguf"])
    gguf = open_engine(cfg)
    recording = Recording(gguf)
    h = Handlers(recording, cfg, tmp_path)  # type: ignore[arg-type]
    image = tmp_path / "fresh.png"
    Image.fromarray(np.random.default_rng(9).integers(0, 255, (60, 80, 3), dtype=np.uint8)).save(image)
    message = {"text": "", "files": [str(image)]}
    h.prepare(message, [])
    h.prepare({**message, "text": "what is"}, [])  # typing: the same image, nothing new to do
    h.prepare({"text": "x", "files": [_text_png(tmp_path)]}, [])  # add_message will say why it is refused
    assert len(recording.prepared) == 1
    _, history = h.add_message({**message, "text": "what is it?"}, [], "none", "")
    *_, (final, _, _) = h.respond(history, 8, 0.0, 0.9, 1.0, 0)
    stats = gguf.backend.session.last_stats
    question = len(gguf.backend.session.tokenizer.encode("</Img> what is it? ###Assistant: ",
                                                         add_special_tokens=False).ids)
    assert stats.prompt_tokens == question and stats.reused_tokens > gguf.backend.prompt.image_tokens
    cold = open_engine(cfg).chat(to_openai(history), GenerationSettings(max_new_tokens=8))
    assert final[-1]["content"] == shown(cold)


def test_a_failing_prepare_is_logged_not_raised(tmp_path, caplog):
    class Failing(Scripted):
        def prepare(self, messages):
            raise RuntimeError("ggml graph compute failed with status 1")

    h = Handlers(Failing("ok"), demo_config(), tmp_path)  # type: ignore[arg-type]
    with caplog.at_level("WARNING", logger="tinygpt.demo.handlers"):
        assert h.prepare({"text": "", "files": [SHAPES]}, []) is None
    assert "preparing the attached image failed" in caplog.text and "status 1" in caplog.text


def test_a_conversation_longer_than_the_context_is_a_notice(engine, tmp_path):
    h = Handlers(engine, demo_config(), tmp_path)
    _, history = h.add_message({"text": "word " * 1500, "files": []}, [], "none", "")
    with pytest.warns(UserWarning, match="prompt too long"):
        (final, view, current), = list(h.respond(history, 12, 0.0, 0.9, 1.0, 0))
    assert final[:-1] == history and is_notice(final[-1]) and "prompt too long" in final[-1]["content"]
    assert to_openai(final) == []  # the refused turn never reaches the model again


def test_stopping_a_stream_frees_the_engine(engine, tmp_path):
    h = Handlers(engine, demo_config(), tmp_path)
    _, history = h.add_message({"text": "tell me everything", "files": [SHAPES]}, [], "none", "")
    stream = h.respond(history, 300, 0.0, 0.9, 1.0, 0)
    next(stream)
    stream.close()  # what gradio does when Stop cancels the event
    done = threading.Event()
    threading.Thread(target=lambda: (engine.chat(to_openai(history), GenerationSettings(max_new_tokens=2)),
                                     done.set()), daemon=True).start()
    assert done.wait(60), "the engine's lock was not released"


def test_box_answers_are_drawn_in_the_chat_and_the_view(tmp_path):
    h = Handlers(Scripted("{<39><38><65><65>}"), demo_config(), tmp_path)  # the tiny model's refer wording
    _, history = h.add_message({"text": "small green triangle", "files": [SHAPES]}, [], "refer", "")
    *_, (final, view, current) = h.respond(history, 12, 0.0, 0.9, 1.0, 0)
    text, drawn = final[-1]["content"]
    assert text == shown("{<39><38><65><65>}") and Path(drawn["path"]).parent == tmp_path
    assert current == SHAPES and view.size == (448, 448)
    assert np.array_equal(np.asarray(Image.open(drawn["path"])), np.asarray(view))
    assert tuple(np.asarray(view)[87 * 2 + 40, 87 * 2]) == PALETTE[0]  # box x1 = 39% of 224 = 87 px
    # identify: the region clicked on the view becomes the prompt's box
    h = Handlers(Scripted("small green triangle"), demo_config(), tmp_path)
    region = click_region(click_region("", (176, 174), 2), (294, 292), 2)
    _, history = h.add_message({"text": "", "files": [SHAPES]}, [], "identify", region)
    assert last_question(history) == "[identify] {<39><38><65><65>}"
    assert h.pick(None, history, "", gr.SelectData(None, {"index": [176, 174], "value": None})) == "88, 87"


# ------------------------------------------------------------------------------------------------ gradio_client
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(engine, tmp_path_factory):
    """The demo over the random tiny engine, launched in-process on a free port: (url, its `Recording`)."""
    from tinygpt.demo.app import build_demo, launch

    cfg = demo_config(max_images=2)
    recording = Recording(engine)
    demo = build_demo(engine, cfg, Handlers(recording, cfg, tmp_path_factory.mktemp("drawn")))  # type: ignore
    port = free_port()
    launch(demo, cfg, port=port, prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{port}/", recording
    demo.close()


@pytest.mark.slow  # ~10 s: a server, a client and a few tiny generations
def test_the_ui_endpoints_through_gradio_client(served, engine, tmp_path):
    from gradio_client import Client, handle_file

    url, recording = served
    client = Client(url, verbose=False, download_files=False)
    assert {"/add_message", "/respond", "/regenerate"} <= set(client.view_api(print_info=False,
                                                                            return_format="dict")["named_endpoints"])
    message = {"text": "how many shapes are there?", "files": [handle_file(SHAPES)]}
    box, history = client.predict(message, [], "vqa", "", api_name="/add_message")
    assert history[-1]["role"] == "user" and history[-1]["content"][-1]["text"] == "[vqa] how many shapes are there?"
    job = client.submit(history, 12, 0.0, 0.9, 1.0, 0, api_name="/respond")
    final, view = job.result(timeout=120)  # (the view's gr.State is not part of the API)
    outputs = job.outputs()
    assert len(outputs) >= 2 and outputs[-1][0] == final  # streamed
    answer = engine.chat(to_openai(history), GenerationSettings(max_new_tokens=12))
    assert final[-1]["role"] == "assistant" and final[-1]["content"][0]["text"] == shown(answer)

    # a text file named .png and too many images: a notice, not a crash
    bad = {"text": "and this?", "files": [handle_file(_text_png(tmp_path))]}
    _, refused = client.predict(bad, final, "none", "", api_name="/add_message")
    assert refused[-1]["metadata"]["title"] == "⚠️ Not sent"
    assert "notes.png: not a readable image" in refused[-1]["content"][0]["text"]
    many = {"text": "", "files": [handle_file(SHAPES)] * 3}
    _, refused = client.predict(many, final, "none", "", api_name="/add_message")
    assert "3 images in one message" in refused[-1]["content"][0]["text"]

    # Stop: cancelling a long answer frees the engine for the next one
    _, history = client.predict({"text": "tell me everything", "files": []}, final, "none", "",
                                api_name="/add_message")
    job = client.submit(history, 300, 0.0, 0.9, 1.0, 0, api_name="/respond")
    deadline = time.monotonic() + 60
    while not job.outputs() and time.monotonic() < deadline:
        time.sleep(0.05)
    job.cancel()
    again, _ = client.predict(final, api_name="/regenerate")
    final2, _ = client.submit(again, 12, 0.0, 0.9, 1.0, 0, api_name="/respond").result(timeout=120)
    assert final2[-1]["content"][0]["text"] == shown(answer)
    stopped = recording.streams[-2]
    assert stopped["closed_early"] and stopped["pieces"] < 300, recording.streams


@pytest.mark.slow  # ~3 s on the served demo
def test_a_txt_upload_is_our_notice_and_no_traceback(served, tmp_path, capfd, caplog):
    """gradio's own file-type check (MultimodalTextbox.preprocess) would raise before add_message and print a traceback
    (gradio/queueing.py); the textbox takes any file, so add_message's check refuses it with a notice."""
    from gradio_client import Client, handle_file

    notes = tmp_path / "notes.txt"
    notes.write_text("milk, eggs\n")
    client = Client(served[0], verbose=False, download_files=False)
    capfd.readouterr()
    box, history = client.predict({"text": "what is this?", "files": [handle_file(str(notes))]}, [], "vqa", "",
                                  api_name="/add_message")
    assert box == {"__type__": "update"} and history[-1]["metadata"]["title"] == "⚠️ Not sent"  # the box keeps it
    assert history[-1]["content"][0]["text"] == ("notes.txt: not a readable image (not an image format this demo "
                                                 "knows); attach a PNG, JPEG, WebP, GIF or BMP picture")
    err = capfd.readouterr().err + caplog.text
    assert "Traceback" not in err and "Invalid file type" not in err, err
