"""User mistakes on `python -m quantize chat` and the GGUF runtime are one `error:` line naming the file or the flag,
exit status 2, no traceback: huge images, one-byte corruptions of a .gguf, NaN sampling values, --ctx outside the
model's range, --qtype in any case or of a type the directory lacks, a directory as --image; interactive chat checks
its --image at start, takes quoted / ~ paths, and says when /stats has no turn; the help lists defaults and the
interactive commands; Ctrl-C is one line and status 130."""

from __future__ import annotations

import io
import math
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

pytest.importorskip("gguf")

from quantize import chat  # noqa: E402
from quantize.__main__ import __doc__ as USAGE, build_parser, main  # noqa: E402
from quantize.gguf_file import find_llm_file  # noqa: E402
from quantize.sampler import SamplingParams  # noqa: E402
from quantize.session import TurnStats  # noqa: E402
from quantize.vision_runtime import load_image  # noqa: E402
from tinygpt.errors import UserError  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

MEAN, STD = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]


def _png(path, side: int):
    Image.new("RGB", (side, side), (200, 30, 30)).save(path)
    return path


def _one_line_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


# 1. images past PIL's decompression-bomb limit
@pytest.mark.parametrize("side, pixels", [(20, "400 pixels"), (12, "144 pixels")])  # the error (> 2x), the warning
def test_an_image_with_too_many_pixels_is_a_user_error_naming_the_file_and_its_size(tmp_path, monkeypatch, side,
                                                                                       pixels):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    path = _png(tmp_path / "big.png", side)
    with pytest.raises(UserError, match=rf"big\.png: the image has {pixels}, more than the 100 an image may have"):
        load_image(path, 8, MEAN, STD)


def test_chat_with_a_huge_image_exits_2(random_gguf_pairs, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    path = _png(tmp_path / "big.png", 20)
    code = main(["chat", "--gguf", str(random_gguf_pairs / "modified"), "--image", str(path), "--prompt", "hi",
                 "--max-new-tokens", "2"])
    assert code == 2
    assert str(path) in _one_line_error(capsys.readouterr().err)


# 2. one-byte corruptions of a .gguf
def _corrupt(src_dir, dst_dir, find: bytes, offset: int, value: bytes) -> None:
    """A copy of the pair in dst_dir whose LLM file has `value` written `offset` bytes after the first `find`."""
    shutil.copytree(src_dir, dst_dir)
    path = dst_dir / "llm-q8_0.gguf"
    data = bytearray(path.read_bytes())
    at = data.index(find) + offset
    data[at:at + len(value)] = value
    path.write_bytes(bytes(data))


def test_a_huge_array_length_in_the_header_is_a_damaged_file(random_gguf_pairs, tmp_path, capsys):
    key = b"tokenizer.ggml.token_type"  # then: value type (u32 9 = array), item type (u32), length (u64)
    _corrupt(random_gguf_pairs / "modified", tmp_path / "g", key, len(key) + 8 + 7, b"\xff")
    code = main(["chat", "--gguf", str(tmp_path / "g"), "--no-vision", "--prompt", "hi"])
    line = _one_line_error(capsys.readouterr().err)
    assert code == 2 and f"{tmp_path / 'g' / 'llm-q8_0.gguf'}: damaged or truncated GGUF file" in line


def test_a_corrupted_vocabulary_token_is_a_damaged_tokenizer(random_gguf_pairs, tmp_path, capsys):
    # the token "Ġt" (the first merge's result) as stored: u64 length 3, then its bytes; renamed to "Ġq"
    _corrupt(random_gguf_pairs / "modified", tmp_path / "g", struct.pack("<Q", 3) + "Ġt".encode(), 8 + 2, b"q")
    code = main(["chat", "--gguf", str(tmp_path / "g"), "--no-vision", "--prompt", "hi"])
    line = _one_line_error(capsys.readouterr().err)
    assert code == 2 and f"{tmp_path / 'g' / 'llm-q8_0.gguf'}: damaged GGUF file: its tokenizer" in line


# 6. NaN sampling values
@pytest.mark.parametrize("flag, field", [("--temperature", "temperature"), ("--top-p", "top_p"),
                                         ("--repetition-penalty", "repetition_penalty")])
def test_non_finite_sampling_values_name_their_flag(random_gguf_pairs, capsys, flag, field):
    for value in (math.nan, math.inf):
        with pytest.raises(UserError, match=f"{flag} must be a finite number"):
            SamplingParams(**{field: value}).validate()
    assert main(["chat", "--gguf", str(random_gguf_pairs / "modified"), flag, "nan", "--prompt", "hi"]) == 2
    assert flag in _one_line_error(capsys.readouterr().err)


# 7. --ctx
@pytest.mark.parametrize("ctx, message", [("0", "--ctx must be >= 1, got 0"), ("-5", "--ctx must be >= 1, got -5"),
                                          ("5000", "--ctx 5000 is larger than the model's context length 1024")])
def test_ctx_outside_the_models_range_names_the_flag(random_gguf_pairs, capsys, ctx, message):
    assert main(["chat", "--gguf", str(random_gguf_pairs / "modified"), "--no-vision", "--ctx", ctx,
                 "--prompt", "hi"]) == 2
    assert message in _one_line_error(capsys.readouterr().err)


# 8. --qtype, --image, /image, /stats
def test_qtype_is_case_insensitive_and_a_wrong_one_lists_what_the_directory_has(random_gguf_pairs):
    d = random_gguf_pairs / "modified"
    assert find_llm_file(d, "Q8_0") == d / "llm-q8_0.gguf"
    with pytest.raises(UserError, match=r"--qtype q5_k: unknown type; choose one of .*\(.* has q8_0\)"):
        find_llm_file(d, "q5_k")
    with pytest.raises(UserError, match=r"llm-q4_k.gguf: no LLM file for --qtype q4_k \(.* has q8_0\)"):
        find_llm_file(d, "q4_k")
    with pytest.raises(UserError, match=r"--qtype q4_k disagrees with --gguf .*llm-q8_0.gguf"):
        find_llm_file(d / "llm-q8_0.gguf", "q4_k")
    assert find_llm_file(d / "llm-q8_0.gguf", "Q8_0") == d / "llm-q8_0.gguf"


def test_a_directory_as_image_says_so_before_loading(random_gguf_pairs, tmp_path, capsys):
    assert main(["chat", "--gguf", str(random_gguf_pairs / "modified"), "--image", str(tmp_path), "--prompt",
                 "hi"]) == 2
    assert f"{tmp_path}: is a directory, not an image file" in _one_line_error(capsys.readouterr().err)


def test_interactive_chat_checks_its_image_before_the_first_question(random_gguf_pairs, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("what is it?\n"))
    code = main(["chat", "--gguf", str(random_gguf_pairs / "modified"), "--image", __file__, "--max-new-tokens", "2"])
    captured = capsys.readouterr()
    assert code == 2 and captured.out == ""
    assert f"{__file__}: not a readable image" in _one_line_error(
        "\n".join(line for line in captured.err.splitlines() if line.startswith("error")))
    assert "chat: type a question" not in captured.err  # failed before the conversation began


def test_image_command_takes_quoted_and_home_paths(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert chat.image_argument(" '/a b/cat.png' ") == "/a b/cat.png"
    assert chat.image_argument('"/x/dog.jpg"') == "/x/dog.jpg"
    assert chat.image_argument("~/cat.png") == str(tmp_path / "cat.png")


class _Session:
    """What chat's loop uses of a ChatSession, answering 'ok' with made-up timings."""

    vision = None

    def __init__(self):
        self.last_stats = TurnStats()

    def reset(self):
        pass

    def ask(self, text, images=(), on_text=None):
        self.last_stats = TurnStats(prompt_tokens=7, generated_tokens=3, stopped_by="eos")
        on_text("ok")
        return "ok"


def test_stats_says_when_there_is_no_turn_yet_and_after_reset(capsys):
    lines = "/stats\nhello\n/stats\n/reset\n/stats\n/quit\n"
    assert chat.interactive(_Session(), [], False, stdin=io.StringIO(lines)) == 0
    err = capsys.readouterr().err
    assert err.count("(no turn yet)") == 2
    assert err.count("prompt 7 tok") == 1 and err.index("(no turn yet)") < err.index("prompt 7 tok")


# 9. help texts
def test_every_flag_has_help_with_its_default_and_chat_lists_its_commands(capsys):
    assert "q4_k|q4_0|q8_0|f16|f32" in USAGE
    parser = build_parser()
    for name, sub in parser._subparsers._group_actions[0].choices.items():
        assert sub.description, name
        assert all(a.help for a in sub._actions), (name, [a.dest for a in sub._actions if not a.help])
    with pytest.raises(SystemExit):
        main(["chat", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert all(command in text for command in ("/image", "/reset", "/stats", "/quit"))
    assert "CPU threads (default: 2)" in text and "(default: 300)" in text


@pytest.mark.parametrize("command", ["", "chat", "bench", "profile", "export", "random", "accuracy"])
def test_help_imports_neither_torch_nor_transformers(command):
    """`python -m quantize [COMMAND] --help` imports only the command it shows: it took 9 s when every command's
    module (torch, transformers, the model) was imported to build the parser."""
    code = ("import contextlib, io, sys\n"
            "from quantize.__main__ import main\n"
            "with contextlib.redirect_stdout(io.StringIO()) as out:\n"
            f"    try: main({[a for a in (command, '--help') if a]!r})\n"
            "    except SystemExit as exc: assert exc.code == 0\n"
            "assert 'usage:' in out.getvalue()\n"
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


# 10. Ctrl-C
def test_ctrl_c_prints_one_line_and_exits_130(monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(chat, "run", interrupted)
    try:
        code = main(["chat", "--gguf", "anywhere"])
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped main() (a traceback for the user)")
    assert code == 130
    assert capsys.readouterr().err == "interrupted\n"


def test_a_gguf_directory_that_does_not_exist_is_named_as_such(tmp_path):
    from quantize.gguf_file import find_vision_file
    from tinygpt.errors import UserError
    with pytest.raises(UserError, match=r"nope\.gguf: --gguf directory not found"):
        find_vision_file(tmp_path / "nope.gguf")
