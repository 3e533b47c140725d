"""Weight import, the failure modes and the build CLI: refused pickles, junk and truncated files, wrong shapes,
an offline hub id, and ``python -m tinygpt.weights.build`` from hub directories and from LAVIS + released files.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys

import pytest
import torch

from tinygpt.errors import UserError
from tinygpt.model import load_vlm
from tinygpt.weights import load_released, read_checkpoint
from tinygpt.weights.build import main as build_main
from tinygpt.weights.phi2 import open_phi2
from tinygpt.weights.sources import resolve_model_dir
from weight_sources import (IDS, LAYERS, hf_blip2, hf_phi, hf_qformer_features, lavis_files, reference_logits,
                            released_state, tiny_vlm)


# ---------------------------------------------------------------------------------------------------- bad inputs


class RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pwned > " + os.environ.get("TINYGPT_TEST_MARKER", "/nonexistent/marker"),))


def test_pickle_with_code_is_refused_and_never_runs(tmp_path, monkeypatch):
    marker = tmp_path / "marker"
    monkeypatch.setenv("TINYGPT_TEST_MARKER", str(marker))
    for name, write in (("evil.pth", lambda f: torch.save({"model": {"x": RunsCode()}}, f)),
                        ("evil_plain.pth", lambda f: pickle.dump({"x": RunsCode()}, open(f, "wb")))):
        path = tmp_path / name
        write(path)
        with pytest.raises(UserError, match=f"{name}.*(refused|weights_only)"):
            read_checkpoint(path)
    assert not marker.exists()


def test_random_bytes_and_truncated_files_are_user_errors(tmp_path):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(os.urandom(4096))
    with pytest.raises(UserError, match="junk.pth"):
        read_checkpoint(junk)
    good = tmp_path / "good.pth"
    torch.save({"w": torch.randn(64, 64)}, good)
    cut = tmp_path / "cut.pth"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(UserError, match="cut.pth"):
        read_checkpoint(cut)
    bad_st = tmp_path / "model.safetensors"
    bad_st.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......")
    with pytest.raises(UserError, match="model.safetensors"):
        read_checkpoint(bad_st)
    with pytest.raises(UserError, match="does not exist"):
        read_checkpoint(tmp_path / "absent.pth")


def test_wrong_shape_and_nothing_matched_are_user_errors(tmp_path):
    state, _, _ = released_state(1)
    state["llama_proj.weight"] = torch.zeros(512, 31)
    wrong = tmp_path / "wrong.pth"
    torch.save({"model": state}, wrong)
    with pytest.raises(UserError, match=r"wrong.pth.*llama_proj|wrong.pth.*proj1.*shape|wrong.pth.*shape"):
        load_released(tiny_vlm(), str(wrong))
    unrelated = tmp_path / "unrelated.pth"
    torch.save({"state_dict": {"encoder.weight": torch.zeros(3)}}, unrelated)
    with pytest.raises(UserError, match="unrelated.pth.*no tensor matched"):
        load_released(tiny_vlm(), str(unrelated))


def test_hub_id_offline_and_not_cached_is_a_user_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    with pytest.raises(UserError, match="nobody-here/no-such-model.*local directory"):
        open_phi2("nobody-here/no-such-model")
    with pytest.raises(UserError, match="no such directory"):
        resolve_model_dir(str(tmp_path / "missing" / "dir" / "x"), "--llm")


# ---------------------------------------------------------------------------------------------------- build CLI


def test_build_cli_from_phi_and_blip2_dirs(tmp_path, capsys):
    phi = hf_phi(qk_layernorm=False)
    phi.save_pretrained(tmp_path / "phi")
    blip = hf_blip2()
    blip.save_pretrained(tmp_path / "blip2")
    out = tmp_path / "built"
    # what a build killed while saving leaves beside --out (the whole model at full size): the next build removes it
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True).stdout.strip()
    killed = tmp_path / f".built.{dead}.x1y2z3.tmp"
    killed.mkdir()
    (killed / "model.safetensors").write_bytes(b"\0" * 1024)
    rc = build_main(["--llm", str(tmp_path / "phi"), "--vision", str(tmp_path / "blip2"), "--preset", "tiny",
                     "--no-extra-norms", "--lora", "--dtype", "fp32", "--image-size", "28", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert f"[build] removed {killed} (a temporary of a build that was killed while writing {out})" in printed
    assert not killed.exists() and [p.name for p in tmp_path.glob(".built.*")] == []
    assert "[build 6/6" in printed
    assert f"fresh (not in any file): {4 + 4 * LAYERS} tensors" in printed  # proj1/proj2 + LoRA A/B only
    model = load_vlm(out)
    assert model.config.lora["r"] == 64 and not model.language_model.model.layers[0].self_attn.dense.lora_B[
        "default"].weight.any()  # fresh LoRA: B = 0, so the function is Phi-2's
    with torch.no_grad():
        torch.testing.assert_close(model.language_model(input_ids=IDS).logits, phi(IDS).logits, atol=1e-5, rtol=1e-5)
        pixels = torch.randn(1, 3, 28, 28)
        # ln_vision eps is LAVIS's 1e-5 in our model, HF's 1e-6 in the reference: equal to ~1e-5
        torch.testing.assert_close(model.qformer_features(pixels), hf_qformer_features(blip, pixels),
                                   atol=1e-4, rtol=1e-4)


def test_build_cli_lavis_plus_released_stage3(tmp_path, capsys):
    hf_phi(qk_layernorm=False).save_pretrained(tmp_path / "phi")
    lavis_files(tmp_path, "")
    state, _, _ = released_state(3)
    torch.save({"model": state}, tmp_path / "stage3.pth")
    out = tmp_path / "built"
    rc = build_main(["--llm", str(tmp_path / "phi"), "--eva", str(tmp_path / "eva_vit_g.pth"),
                     "--qformer", str(tmp_path / "blip2_pretrained_flant5xxl.pth"), "--preset", "tiny",
                     "--released", str(tmp_path / "stage3.pth"), "--image-size", "28", "--out", str(out)])
    assert rc == 0, capsys.readouterr()
    config = json.loads((out / "config.json").read_text())
    assert config["lora"]["r"] == 64 and config["text_config"]["qk_layernorm"] is True
    model = load_vlm(out)
    assert model.language_model.model.layers[0].self_attn.qkv.base_layer.weight.dtype == torch.float32  # load dtype
    _, prefix, head = released_state(3)
    with torch.no_grad():
        want = reference_logits(state, prefix, head, IDS)
        torch.testing.assert_close(model.language_model(input_ids=IDS).logits, want, atol=0.05, rtol=0.02)  # bf16


def test_build_cli_bad_source_exits_2_without_output(tmp_path, capsys):
    out = tmp_path / "built"
    (tmp_path / "phi").mkdir()
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint at all")
    rc = build_main(["--llm", str(tmp_path / "phi"), "--eva", str(tmp_path / "junk.pth"), "--qformer",
                     str(tmp_path / "junk.pth"), "--preset", "tiny", "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == 2 and captured.err.startswith("error: junk.pth".replace("junk.pth", str(tmp_path / "junk.pth")))
    assert "not a PyTorch checkpoint" in captured.err and "Traceback" not in captured.err
    assert not out.exists()
