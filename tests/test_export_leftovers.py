"""What an export leaves in --out: files of another model, temporaries of a killed export, a vision file of another
precision, a directory it created, an empty --out or --model (quantize.export, tinygpt.io_utils)."""
from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("gguf")

from test_export import SMALL_VOCAB, _save_tiny  # noqa: E402

from quantize import gguf_names as names  # noqa: E402
from quantize.export import export_model  # noqa: E402
from quantize.gguf_file import check_pair, llm_hyperparams, open_gguf, vision_values  # noqa: E402
from tinygpt.errors import UserError  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
IN_LLM_FILE = 120  # the quantize() call that is inside the LLM file, after vision.gguf was complete


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Two different small-vocabulary tiny models: (model a, model b)."""
    root = tmp_path_factory.mktemp("leftovers")
    _save_tiny(root / "a", text_overrides=SMALL_VOCAB)
    _save_tiny(root / "b", text_overrides={**SMALL_VOCAB, "vocab_size": 640})
    return root / "a", root / "b"


@pytest.fixture(scope="module")
def pair_a(models, tmp_path_factory):
    """Model a exported at q4_k."""
    out = tmp_path_factory.mktemp("pair-a") / "gguf"
    export_model(models[0], out, "q4_k", progress=False)
    return out


def snapshot(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(root.iterdir())}


def temporaries(root: Path) -> list[str]:
    return sorted(p.name for p in root.glob(".*.tmp"))


def check_every_llm_pairs(d: Path) -> None:
    vision = open_gguf(d / names.VISION_FILE_NAME, names.ARCH_VISION)
    for path in sorted(d.glob("llm-*.gguf")):
        llm = open_gguf(path, names.ARCH_LLM)
        check_pair(llm, llm_hyperparams(llm), vision, vision_values(vision))


def vision_linear_types(d: Path) -> set[str]:
    vision = open_gguf(d / names.VISION_FILE_NAME, names.ARCH_VISION)
    return {t.tensor_type.name for n, t in vision.tensors.items() if len(t.shape) == 2 and n.endswith(".weight")}


def dying_at(monkeypatch, call: int, action) -> None:
    """The call-th tensor quantized runs action() first."""
    import quantize.gguf_stream as stream

    real, calls = stream.quantize, [0]

    def dying(array, qtype):
        calls[0] += 1
        if calls[0] == call:
            action()
        return real(array, qtype)

    monkeypatch.setattr(stream, "quantize", dying)


CHILD = """
import os, signal, sys
import quantize.gguf_stream as stream
real, calls = stream.quantize, [0]
def dying(array, qtype):
    calls[0] += 1
    if calls[0] == {call}:
        os.kill(os.getpid(), signal.{signal})
    return real(array, qtype)
stream.quantize = dying
from quantize.__main__ import main
sys.exit(main(sys.argv[1:]))
"""


def export_killed(model: Path, out: Path, sig: str) -> subprocess.CompletedProcess:
    """`python -m quantize export` at q8_0 in a child that sends itself `sig` inside the LLM file."""
    code = CHILD.format(call=IN_LLM_FILE, signal=sig)
    return subprocess.run([sys.executable, "-c", code, "export", "--model", str(model), "--out", str(out),
                           "--qtype", "q8_0", "--quiet"], cwd=REPO, capture_output=True, text=True, timeout=300)


# ----------------------------------------------------------------------------------- 1: another model's files
def test_export_of_another_model_removes_the_llm_files_it_cannot_pair_with(models, pair_a, tmp_path, capsys):
    mix = tmp_path / "mix"
    shutil.copytree(pair_a, mix)
    export_model(models[1], mix, "q8_0", progress=True)
    out = capsys.readouterr().out
    assert sorted(p.name for p in mix.glob("*.gguf")) == ["llm-q8_0.gguf", "vision.gguf"]
    assert f"removed {mix / 'llm-q4_k.gguf'} (of another model" in out
    check_every_llm_pairs(mix)

    export_model(models[1], mix, "q4_0", progress=True)  # the same model's files stay
    assert "removed" not in capsys.readouterr().out
    assert sorted(p.name for p in mix.glob("*.gguf")) == ["llm-q4_0.gguf", "llm-q8_0.gguf", "vision.gguf"]
    check_every_llm_pairs(mix)


def test_a_quiet_export_removes_them_silently(models, pair_a, tmp_path, capsys):
    mix = tmp_path / "mix"
    shutil.copytree(pair_a, mix)
    (mix / "llm-f16.gguf").write_bytes(b"not a gguf file")  # unreadable: cannot pair either
    export_model(models[1], mix, "q8_0", progress=False)
    assert capsys.readouterr().out == ""
    assert sorted(p.name for p in mix.glob("*.gguf")) == ["llm-q8_0.gguf", "vision.gguf"]


# ---------------------------------------------------------------------------------------- 2: killed exports
@pytest.mark.slow
def test_sigterm_during_export_removes_the_temporaries(models, pair_a, tmp_path):
    out = tmp_path / "gguf"
    shutil.copytree(pair_a, out)
    before = snapshot(out)
    result = export_killed(models[1], out, "SIGTERM")
    assert result.returncode == 128 + signal.SIGTERM, result.stderr[-2000:]
    assert snapshot(out) == before  # the old pair as it was, no temporary file



def test_sigterm_during_an_export_into_a_new_directory_removes_the_directory(models, tmp_path, monkeypatch):
    """The same SIGTERM in this process (the handler raises SystemExit(143), as in the child above): the directories
    the export created are gone."""
    dying_at(monkeypatch, IN_LLM_FILE, lambda: os.kill(os.getpid(), signal.SIGTERM))
    with pytest.raises(SystemExit) as stopped:
        export_model(models[1], tmp_path / "new" / "gguf", "q8_0", progress=False)
    assert stopped.value.code == 128 + signal.SIGTERM
    assert not (tmp_path / "new").exists()


def test_sigterm_handler_is_restored_after_an_export(models, tmp_path):
    def mine(signum, frame):
        pass

    previous = signal.signal(signal.SIGTERM, mine)
    try:
        export_model(models[0], tmp_path / "out", "q8_0", progress=False)
        assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, previous)


@pytest.mark.slow
def test_next_export_removes_temporaries_of_a_killed_export_only(models, pair_a, tmp_path, capsys):
    out = tmp_path / "gguf"
    shutil.copytree(pair_a, out)
    result = export_killed(models[1], out, "SIGKILL")
    assert result.returncode == -signal.SIGKILL
    dead = temporaries(out)
    assert len(dead) == 3 and all(".tmp" in name for name in dead)  # vision, LLM and export.json temporaries
    live = out / f".llm-q4_0.gguf.{os.getpid()}.abcd1234.tmp"  # a running export's (this process)
    legacy = out / ".vision.gguf.k3j2h1g0.tmp"  # named before temporaries carried a PID, untouched for an hour
    other = out / ".notes.txt.tmp"  # not the export's
    for path in (live, legacy, other):
        path.write_bytes(b"x")
    hour_ago = time.time() - 3600
    os.utime(legacy, (hour_ago, hour_ago))

    export_model(models[0], out, "q4_k", progress=True)
    printed = capsys.readouterr().out
    assert temporaries(out) == sorted([live.name, other.name])
    for name in [*dead, legacy.name]:
        assert f"removed {out / name} (a temporary file of an export that is no longer running)" in printed


def test_fresh_legacy_temporaries_are_kept(models, tmp_path):
    out = tmp_path / "gguf"
    out.mkdir()
    fresh = out / ".llm-q4_k.gguf.k3j2h1g0.tmp"  # may be an older version's export running now
    fresh.write_bytes(b"x")
    export_model(models[0], out, "q4_k", progress=False)
    assert temporaries(out) == [fresh.name]


# ------------------------------------------------------------------------------------------- 3: empty flags
@pytest.mark.parametrize("flag", ["--out", "--model"])
def test_empty_out_or_model_is_a_user_error(flag, models, tmp_path, monkeypatch, capsys):
    import quantize.__main__ as cli

    monkeypatch.chdir(tmp_path)
    args = {"--model": str(models[0]), "--out": str(tmp_path / "out"), flag: ""}
    assert cli.main(["export", *[x for kv in args.items() for x in kv], "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {flag}: the path is empty") and "\n" not in err
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------- 4: vision precision
def test_quantized_export_keeps_the_more_precise_vision_file_of_the_same_model(models, tmp_path, capsys):
    out = tmp_path / "gguf"
    export_model(models[0], out, "f32", progress=False)
    reference = (out / "vision.gguf").read_bytes()
    summary = export_model(models[0], out, "q4_k", progress=True)
    printed = capsys.readouterr().out
    assert (out / "vision.gguf").read_bytes() == reference
    assert f"kept {out / 'vision.gguf'} of this model (F32, more precise than the Q8_0 this export writes)" in printed
    assert "vision F32" in printed.splitlines()[0]
    assert summary.vision_type == "F32"
    assert json.loads((out / "export.json").read_text())["vision_type"] == "F32"
    check_every_llm_pairs(out)


def test_reference_export_replaces_a_quantized_vision_file_and_says_so(models, pair_a, tmp_path, capsys):
    out = tmp_path / "gguf"
    shutil.copytree(pair_a, out)
    assert vision_linear_types(out) == {"Q8_0"}
    export_model(models[0], out, "f16", progress=True)
    assert "llm-q4_k.gguf now pair with this F16 vision.gguf (it was Q8_0)" in capsys.readouterr().out
    assert vision_linear_types(out) == {"F16"}
    check_every_llm_pairs(out)


def test_vision_file_of_another_model_is_replaced_whatever_its_precision(models, tmp_path):
    out = tmp_path / "gguf"
    export_model(models[1], out, "f32", progress=False)
    export_model(models[0], out, "q8_0", progress=False)
    assert vision_linear_types(out) == {"Q8_0"}
    assert sorted(p.name for p in out.glob("*.gguf")) == ["llm-q8_0.gguf", "vision.gguf"]


# -------------------------------------------------------------------------------- 5, 6: failed exports
def test_failed_export_into_a_new_directory_removes_it(models, tmp_path, monkeypatch):
    def full_disk():
        raise OSError(errno.ENOSPC, "No space left on device")

    dying_at(monkeypatch, IN_LLM_FILE, full_disk)
    with pytest.raises(UserError, match="could not write the GGUF export.*No space left"):
        export_model(models[0], tmp_path / "new" / "deeper", "q8_0", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_keeps_the_previous_files_and_removes_a_new_directory(models, pair_a, tmp_path, monkeypatch):
    def ctrl_c():
        raise KeyboardInterrupt

    out = tmp_path / "gguf"
    shutil.copytree(pair_a, out)
    before = snapshot(out)
    dying_at(monkeypatch, IN_LLM_FILE, ctrl_c)
    with pytest.raises(KeyboardInterrupt):  # model b: a. finished export would remove llm-q4_k.gguf
        export_model(models[1], out, "q8_0", progress=False)
    assert snapshot(out) == before

    dying_at(monkeypatch, IN_LLM_FILE, ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        export_model(models[1], tmp_path / "new", "q8_0", progress=False)
    assert not (tmp_path / "new").exists()
