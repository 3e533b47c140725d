"""`tinygpt chat` (tinygpt.chat.cli): the chat engine in the terminal, one-shot and interactive, either backend."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from tinygpt.chat import ChatEngine, GenerationSettings
from tinygpt.chat.cli import TerminalChat, interact, main
from tinygpt.chat.gguf_backend import GGUFBackend


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "scene.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (80, 96, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def engine(chat_model):
    return ChatEngine(GGUFBackend.load(chat_model[1]), GenerationSettings(max_new_tokens=8))


def _ask(engine, image, text, settings=None):
    return engine.chat([{"role": "user", "content": [{"type": "image", "image": str(image)},
                                                     {"type": "text", "text": text}]}], settings)


@pytest.mark.parametrize("backend", ["--gguf", "--model"])
def test_one_shot_prints_the_engines_answer(chat_model, image, engine, backend, capsys):
    where = chat_model[1] if backend == "--gguf" else chat_model[0]
    code = main([backend, str(where), "--image", str(image), "--prompt", "What is it?", "--max-new-tokens", "8",
                 "--device", "cpu"])
    assert code == 0
    assert capsys.readouterr().out == _ask(engine, image, "What is it?") + "\n"


def test_a_launch_config_and_flag_overrides(chat_model, image, engine, tmp_path, capsys):
    cfg = tmp_path / "mine.yaml"
    cfg.write_text(f"model:\n  backend: gguf\n  path: {chat_model[1]}\ngeneration:\n  max_new_tokens: 1\n")
    ask = ["--cfg-path", str(cfg), "--image", str(image), "--prompt", "hello"]
    assert main(ask) == 0
    short = capsys.readouterr().out.rstrip("\n")  # the config's one token
    assert main([*ask, "--max-new-tokens", "8"]) == 0
    full = _ask(engine, image, "hello")
    assert capsys.readouterr().out == full + "\n"
    assert short == _ask(engine, image, "hello", GenerationSettings(max_new_tokens=1)) != full


def test_interactive_commands_and_mistakes_keep_the_conversation(engine, image, tmp_path):
    text_file = tmp_path / "notes.png"
    text_file.write_text("not an image")
    out, err = io.StringIO(), io.StringIO()
    chat = TerminalChat(engine, out)
    lines = io.StringIO(f"/image {image}\nWhat is it?\n/image {text_file}\n/image\n/fly\n/image {tmp_path}/no.png\n"
                        f"And now?\n/reset\n/quit\nnever asked\n")
    interact(chat, lines, err)
    errors = [line for line in err.getvalue().splitlines() if line.startswith("error:")]
    assert len(errors) == 4 and "/image needs a path" in errors[1] and "unknown command '/fly'" in errors[2]
    # the path once, and not "this server" (it was "error: X: image: not a readable image (... this server knows ...")
    assert errors[0] == (f"error: {text_file}: not a readable image (not an image format tinygpt knows: PNG, JPEG, "
                         "WebP, GIF or BMP)")
    assert errors[3] == f"error: {tmp_path}/no.png: image file not found"
    answers = out.getvalue().splitlines()
    assert len(answers) == 2 and answers[0] == _ask(engine, image, "What is it?")
    assert chat.messages == []  # /reset, and nothing after /quit


def test_an_attached_image_is_prepared_before_the_question(engine, tmp_path):
    """/image starts the engine's prepare on a worker: the question then evaluates only its own tokens (on the GGUF
    runtime; a new image, so nothing of it was cached before)."""
    path = tmp_path / "new.png"
    Image.fromarray(np.random.default_rng(5).integers(0, 255, (70, 70, 3), dtype=np.uint8)).save(path)
    session = engine.backend.session
    chat = TerminalChat(engine, io.StringIO())
    try:
        interact(chat, io.StringIO(f"/image {path}\nWhere is it?\n"), io.StringIO())
    finally:
        chat.close()
    question = len(session.tokenizer.encode("</Img> Where is it? ###Assistant: ", add_special_tokens=False).ids)
    assert session.last_stats.prompt_tokens == question
    assert session.last_stats.reused_tokens > session.fmt.image_token_count


def test_user_errors_are_one_line_and_exit_2(tmp_path, capsys):
    assert main(["--gguf", str(tmp_path), "--prompt", "hi"]) == 2
    assert "holds no llm-*.gguf" in capsys.readouterr().err
    assert main(["--cfg-path", str(tmp_path / "none.yaml"), "--prompt", "hi"]) == 2
    assert "launch config does not exist" in capsys.readouterr().err
