"""The backend-agreement check (tinygpt.tiny.backend_agreement): same conversation, PyTorch vs the GGUF F16 runtime.

A decisive random tiny model and its F16 export agree on every conversation of a small hand-written split; the GGUF
export of a different model does not, and the command then prints the differences and exits 1."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from conftest import save_decisive_tiny_model
from tinygpt.tiny.backend_agreement import KINDS, main

pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    """Four images with one vqa and one refer record each, in the synthetic split's file layout."""
    root = tmp_path_factory.mktemp("split")
    (root / "images").mkdir()
    vqa, refer = [], []
    for i in range(4):
        rng = np.random.default_rng(i)
        name = f"images/scene_{i}.png"
        Image.fromarray(rng.integers(0, 255, (96, 96, 3), dtype=np.uint8)).save(root / name)
        vqa.append({"image": name, "question": "what color is the circle?", "answer": ["red"] * 10})
        refer.append({"image": name, "sents": "small red circle", "bbox": [1, 2, 30, 30], "width": 96, "height": 96})
    (root / "vqa.json").write_text(json.dumps(vqa))
    (root / "refer.json").write_text(json.dumps(refer))
    return root


@pytest.fixture(autouse=True)
def short_answers(monkeypatch):
    """A random model's long answers run into near-ties after a few tokens (a trained model's do not): 5 tokens."""
    import tinygpt.tiny.backend_agreement as agreement

    monkeypatch.setattr(agreement, "MAX_NEW_TOKENS", {"vqa": 5, "refer": 5})


def test_a_model_and_its_f16_export_agree(chat_model, split, capsys):
    model_dir, gguf_dir = chat_model
    assert main(["--model", str(model_dir), "--gguf", str(gguf_dir), "--split", str(split), "--limit", "2"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines()[1:] if line.split()[0] in (*KINDS, "all")}
    assert rows["all"] == ["6", "6", "100.0%"]
    assert all(rows[kind] == ["2", "2", "100.0%"] for kind in KINDS)


def test_a_different_model_disagrees_and_fails(chat_model, split, tmp_path, capsys):
    from quantize.export import export_model

    other = save_decisive_tiny_model(tmp_path / "other", seed=1)
    export_model(other, tmp_path / "other-gguf", qtype="f16", progress=False)
    model_dir, _ = chat_model
    code = main(["--model", str(model_dir), "--gguf", str(tmp_path / "other-gguf"), "--split", str(split),
                 "--limit", "2"])
    captured = capsys.readouterr()
    assert code == 1
    assert "differs (" in captured.out
    last = captured.err.strip().splitlines()[-1]  # after the progress bar
    assert last.startswith("error: the backends agree on") and "below the required 99%" in last


def test_the_unquantised_file_is_compared_and_a_quantised_one_is_named(chat_model, split, tmp_path, capsys):
    """The README's export directory held the default Q4_K file: the check compared it, failed at 86%, and said
    nothing of why. It now uses an F16 / F32 file in the directory when there is one, and says to export one."""
    from quantize.export import export_model

    model_dir, _ = chat_model
    both = tmp_path / "both"
    export_model(model_dir, both, qtype="q4_k", progress=False)
    export_model(model_dir, both, qtype="f16", progress=False)  # the same model: llm-q4_k.gguf stays beside it
    assert main(["--model", str(model_dir), "--gguf", str(both), "--split", str(split), "--limit", "2"]) == 0
    capsys.readouterr()
    other = save_decisive_tiny_model(tmp_path / "other", seed=1)
    export_model(other, tmp_path / "q4k", qtype="q4_k", progress=False)
    assert main(["--model", str(model_dir), "--gguf", str(tmp_path / "q4k"), "--split", str(split),
                 "--limit", "2"]) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.endswith(f"this compared a quantised llm-*.gguf, whose answers differ by design: export with --qtype "
                         f"f16 (or f32) into {tmp_path / 'q4k'} for the exact comparison")


def test_bad_limit_and_split_are_user_errors(chat_model, tmp_path, capsys):
    model_dir, gguf_dir = chat_model
    assert main(["--model", str(model_dir), "--gguf", str(gguf_dir), "--limit", "0"]) == 2
    assert "--limit must be >= 1" in capsys.readouterr().err
    (tmp_path / "vqa.json").write_text("[]")
    (tmp_path / "refer.json").write_text("[]")
    assert main(["--model", str(model_dir), "--gguf", str(gguf_dir), "--split", str(tmp_path)]) == 2
    assert "no image has both" in capsys.readouterr().err
