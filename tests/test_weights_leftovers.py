"""Weight import leftovers, both "a wrong model without a word":

* a released TinyGPT-V stage or a MiniGPT-4 projection file that lacks part of what it must hold (a projection, a
  layer's LoRA, a norm weight, ``llama_proj.bias``) used to be logged as "missing" and left that part fresh (random)
  or at the base model's values; it is now one ``UserError`` naming the file and the first missing tensors, in the
  build before any weights are read. What legitimately starts fresh (LoRA a stage-1 file does not have) still does.
* a zip-format ``.pth`` with a flipped byte inside a tensor's data: ``torch.load`` does not check the members'
  CRC-32 and loads the wrong value; the import now checks them and names the file and the member.
"""

from __future__ import annotations

import struct
import zipfile

import pytest
import torch

from tinygpt.errors import UserError
from tinygpt.model import load_vlm
from tinygpt.weights import load_lavis, load_minigpt4_proj, load_released, read_checkpoint
from tinygpt.weights.build import main as build_main
from weight_sources import LAYERS, hf_phi, lavis_files, released_state, tiny_vlm

EVA, QFORMER = "eva_vit_g.pth", "blip2_pretrained_flant5xxl.pth"
LORA1 = "llama_model.base_model.model.model.layers.1.self_attn."


def released_file(tmp_path, stage: int, drop=(), name: str | None = None):
    state, _, _ = released_state(stage)
    for key in drop:
        del state[key]
    path = tmp_path / (name or f"TinyGPT-V_for_Stage{stage}.pth")
    torch.save({"model": state, "optimizer": {"state": {}}, "epoch": 0}, path)
    return path, state


def build(tmp_path, *extra: str) -> int:
    """The build CLI: tiny Phi-2 + LAVIS files at 28 px, fp32, into tmp_path/built."""
    hf_phi(qk_layernorm=False).save_pretrained(tmp_path / "phi")
    lavis_files(tmp_path, "")
    return build_main(["--llm", str(tmp_path / "phi"), "--eva", str(tmp_path / EVA), "--qformer",
                       str(tmp_path / QFORMER), "--preset", "tiny", "--image-size", "28", "--dtype", "fp32",
                       *extra, "--out", str(tmp_path / "built")])


def error_line(err: str) -> str:
    last = err.rstrip("\n").split("\n")[-1]
    assert last.startswith("error: ") and "Traceback" not in err, err[-400:]
    return last


# -------------------------------------------------------------------------------------- 1: files that lack tensors


@pytest.mark.parametrize("stage, drop, first", [
    (1, ["llama_proj2.weight"], "proj2.weight"),  # would start fresh: random
    (3, [f"{LORA1}{m}.lora_{ab}.weight" for m in ("query_key_value", "dense") for ab in "AB"],
     "language_model.model.layers.1.self_attn.qkv.lora_A.default.weight, "
     "language_model.model.layers.1.self_attn.qkv.lora_B.default.weight, "
     "language_model.model.layers.1.self_attn.dense.lora_A.default.weight ..."),  # fresh: B = 0, no adaptation
    (1, ["llama_model.model.final_layernorm.weight"], "language_model.model.final_layernorm.weight"),  # base value
])
def test_released_file_lacking_part_of_its_stage_is_refused(tmp_path, stage, drop, first):
    path, _ = released_file(tmp_path, stage, drop)
    with pytest.raises(UserError) as caught:
        load_released(tiny_vlm(), str(path))
    assert str(caught.value) == (f"{path}: lacks {len(drop)} tensor(s) the model needs, first {first} (renamed or "
                                 "missing in the file: a partial checkpoint, or one of another kind)")


def test_build_refuses_a_partial_released_file_before_reading_weights(tmp_path, capsys):
    path, _ = released_file(tmp_path, 3, [f"{LORA1}dense.lora_B.weight"])
    assert build(tmp_path, "--released", str(path)) == 2
    captured = capsys.readouterr()
    assert error_line(captured.err) == (
        f"error: {path}: lacks 1 tensor(s) the model needs, first language_model.model.layers.1.self_attn.dense."
        "lora_B.default.weight (renamed or missing in the file: a partial checkpoint, or one of another kind)")
    assert "loading the language model" not in captured.out  # checked from the names, before any weights
    assert not (tmp_path / "built").exists()


def test_stage1_file_on_a_model_with_lora_leaves_the_lora_fresh(tmp_path):
    """What a stage-1 file does not hold by design (LoRA) may start fresh, and the complete file loads."""
    path, _ = released_file(tmp_path, 1)
    model = tiny_vlm(lora={})
    report = load_released(model, str(path))
    assert not report.missing
    assert not model.language_model.model.layers[0].self_attn.qkv.lora_B["default"].weight.any()
    complete, _ = released_file(tmp_path, 3, name="complete.pth")
    assert not load_released(tiny_vlm(), str(complete)).missing


def minigpt4_file(tmp_path, bias: bool = True):
    gen = torch.Generator().manual_seed(7)
    state = {"llama_proj.weight": torch.randn(512, 32, generator=gen), "llama_model.x": torch.zeros(2)}
    if bias:
        state["llama_proj.bias"] = torch.randn(512, generator=gen)
    torch.save({"model": state}, tmp_path / "pretrained_minigpt4_7b.pth")
    return tmp_path / "pretrained_minigpt4_7b.pth", state


def test_minigpt4_file_without_the_projection_bias_is_refused(tmp_path):
    path, _ = minigpt4_file(tmp_path, bias=False)
    with pytest.raises(UserError, match=rf"^{path}: lacks 1 tensor\(s\) the model needs, first proj1.bias "):
        load_minigpt4_proj(tiny_vlm(), str(path))
    (tmp_path / "ok").mkdir()
    complete, state = minigpt4_file(tmp_path / "ok")
    model = tiny_vlm()
    load_minigpt4_proj(model, str(complete))
    torch.testing.assert_close(model.proj1.bias.detach(), state["llama_proj.bias"])


def test_build_refuses_a_minigpt4_file_without_the_bias(tmp_path, capsys):
    path, _ = minigpt4_file(tmp_path, bias=False)
    assert build(tmp_path, "--minigpt4-proj", str(path)) == 2
    captured = capsys.readouterr()
    assert error_line(captured.err).startswith(f"error: {path}: lacks 1 tensor(s) the model needs, first proj1.bias ")
    assert "loading the language model" not in captured.out
    assert not (tmp_path / "built").exists()


def test_build_with_complete_released_and_minigpt4_files_still_works(tmp_path, capsys):
    released, state = released_file(tmp_path, 3)
    proj, _ = minigpt4_file(tmp_path)
    assert build(tmp_path, "--minigpt4-proj", str(proj), "--released", str(released)) == 0, capsys.readouterr()
    model = load_vlm(tmp_path / "built")
    torch.testing.assert_close(model.proj1.bias.detach(), state["llama_proj.bias"])  # the released file wins
    assert "fresh (not in any file): 0 tensors" in capsys.readouterr().out
    assert LAYERS == len(model.language_model.model.layers)


# ------------------------------------------------------------------------------------- 2: damaged bytes in a .pth


def member_data(path, suffix: str) -> tuple[str, int, int]:
    """(name, offset, size) of the stored bytes of the zip member whose name ends with ``suffix``."""
    with zipfile.ZipFile(path) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith(suffix))
    raw = path.read_bytes()
    name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26:info.header_offset + 30])
    return info.filename, info.header_offset + 30 + name_len + extra_len, info.file_size


def flip(path, offset: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0x10
    path.write_bytes(bytes(raw))


def small_state():
    gen = torch.Generator().manual_seed(3)
    return {"a.weight": torch.randn(64, 64, generator=gen), "b.bias": torch.randn(64, generator=gen)}


def test_flipped_byte_in_a_tensors_data_is_refused_naming_file_and_member(tmp_path):
    path = tmp_path / "weights.pth"
    torch.save(small_state(), path)
    member, offset, size = member_data(path, "/data/0")
    flip(path, offset + size // 2)
    with pytest.raises(UserError, match=rf"^{path}: damaged: the bytes of member {member} do not match its CRC-32"):
        read_checkpoint(path)


def test_intact_file_and_one_saved_without_crcs_load_as_before(tmp_path):
    state = small_state()
    torch.save({"model": state, "epoch": 1}, tmp_path / "intact.pth")
    loaded = read_checkpoint(tmp_path / "intact.pth")
    assert sorted(loaded) == sorted(state)
    for key, value in state.items():
        torch.testing.assert_close(loaded[key], value, rtol=0, atol=0)
    torch.serialization.set_crc32_options(False)  # every CRC written as 0: nothing to check, not "damaged"
    try:
        torch.save(state, tmp_path / "nocrc.pth")
    finally:
        torch.serialization.set_crc32_options(True)
    torch.testing.assert_close(read_checkpoint(tmp_path / "nocrc.pth")["b.bias"], state["b.bias"], rtol=0, atol=0)


def test_damaged_local_header_is_refused_naming_file_and_member(tmp_path):
    path = tmp_path / "weights.pth"
    torch.save(small_state(), path)
    member, offset, _ = member_data(path, "/data/1")
    with zipfile.ZipFile(path) as archive:
        header = archive.getinfo(member).header_offset
    flip(path, header)  # the "PK\3\4" signature
    with pytest.raises(UserError, match=rf"^{path}: damaged: member {member} cannot be read back intact"):
        read_checkpoint(path)


def test_damaged_lavis_and_released_files_stop_the_import(tmp_path, capsys):
    eva, _ = lavis_files(tmp_path, "")
    member, offset, size = member_data(tmp_path / EVA, "/data/5")
    flip(tmp_path / EVA, offset + size - 1)
    with pytest.raises(UserError, match=rf"^{tmp_path / EVA}: damaged: the bytes of member {member} "):
        load_lavis(tiny_vlm(), eva=str(tmp_path / EVA))
    released, _ = released_file(tmp_path, 3)
    _, offset, size = member_data(released, "/data/3")
    flip(released, offset + size // 3)
    (tmp_path / "b").mkdir()
    assert build(tmp_path / "b", "--released", str(released)) == 2
    assert error_line(capsys.readouterr().err).startswith(f"error: {released}: damaged: the bytes of member ")
