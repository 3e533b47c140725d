"""``python -m tinygpt.weights.build`` on sources a user gets wrong: stray weight files next to the model's own, PEFT
names, LAVIS files shorter than the preset, broken Phi config.json fields, widths that do not fit the preset's heads,
an unreachable tokenizer, a missing tensor, and what the log and the error line then say.

Every failing build must end stderr with one ``error:`` line naming the file (and the field or tensor) at fault.
"""

from __future__ import annotations

import io
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import tinygpt.weights.build as build_module
from tinygpt.errors import UserError
from tinygpt.model import load_vlm
from tinygpt.weights.build import main as build_main
from tinygpt.weights.phi2 import open_phi2
from tinygpt.weights.sources import weight_files
from weight_sources import IDS, hf_phi, lavis_files

EVA, QFORMER = "eva_vit_g.pth", "blip2_pretrained_flant5xxl.pth"


def phi_dir(tmp_path, name: str = "phi"):
    """A Phi-2 folder as save_pretrained writes it (config.json + model.safetensors), and the model it holds."""
    phi = hf_phi(qk_layernorm=False)
    phi.save_pretrained(tmp_path / name)
    return phi, tmp_path / name


def build(tmp_path, llm, *extra: str, preset: str | None = "tiny", lavis: bool = True) -> int:
    """The build CLI with LAVIS files from ``lavis_files`` (written by the caller) and the tiny preset at 28 px."""
    args = ["--llm", str(llm), *extra, "--image-size", "28", "--dtype", "fp32", "--out", str(tmp_path / "built")]
    if lavis:
        args += ["--eva", str(tmp_path / EVA), "--qformer", str(tmp_path / QFORMER)]
    return build_main(args + (["--preset", preset] if preset else []))


def error_line(err: str) -> str:
    """stderr's last line, which must be the one ``error:`` line (a progress bar's \\r does not end a line)."""
    last = err.rstrip("\n").split("\n")[-1]
    assert last.startswith("error: "), repr(err[-400:])
    assert "Traceback" not in err
    return last


def same_llm(out, phi) -> None:
    with torch.no_grad():
        torch.testing.assert_close(load_vlm(out).language_model(input_ids=IDS).logits, phi(IDS).logits,
                                   atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------ 1, 2: which files of a folder are read


def test_extra_copies_of_the_weight_file_are_ignored_with_one_warning(tmp_path, capsys):
    phi, llm = phi_dir(tmp_path)
    zeros = {k: torch.zeros_like(v) for k, v in load_file(llm / "model.safetensors").items()}
    save_file(zeros, llm / "model-old.safetensors")
    save_file(zeros, llm / "model_backup.safetensors")
    lavis_files(tmp_path, "")
    assert build(tmp_path, llm, "--no-extra-norms") == 0
    out = capsys.readouterr().out
    warnings = [line for line in out.splitlines() if "ignoring" in line]
    assert len(warnings) == 1 and "model-old.safetensors, model_backup.safetensors" in warnings[0], warnings
    assert "only model.safetensors read" in warnings[0]
    same_llm(tmp_path / "built", phi)  # the weights are model.safetensors', not the zeros of the backups


def test_file_not_in_the_index_is_ignored_with_a_warning(tmp_path, caplog):
    hf_phi(qk_layernorm=False).save_pretrained(tmp_path, max_shard_size="40KB")
    listed = sorted(json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"].values())
    save_file({"model.embed_tokens.weight": torch.zeros(3)}, tmp_path / "model-old.safetensors")
    with caplog.at_level("WARNING", logger="tinygpt.weights"):
        files = weight_files(tmp_path)
    assert sorted({f.name for f in files}) == sorted(set(listed))
    assert "ignoring model-old.safetensors (not listed in model.safetensors.index.json)" in caplog.text


def test_a_tensor_in_two_weight_files_is_an_error_naming_both(tmp_path, capsys):
    _, llm = phi_dir(tmp_path)
    state = load_file(llm / "model.safetensors")
    (llm / "model.safetensors").unlink()
    names = sorted(state)
    save_file({k: state[k] for k in names[: len(names) // 2 + 1]}, llm / "model-00001-of-00002.safetensors")
    save_file({k: state[k] for k in names[len(names) // 2:]}, llm / "model-00002-of-00002.safetensors")
    lavis_files(tmp_path, "")
    assert build(tmp_path, llm) == 2
    line = error_line(capsys.readouterr().err)
    assert str(llm) in line and "model-00001-of-00002.safetensors, model-00002-of-00002.safetensors" in line
    assert f"e.g. {names[len(names) // 2]}" in line and "more than one weight file" in line


def test_an_incomplete_set_of_shards_names_the_missing_one(tmp_path, capsys):
    _, llm = phi_dir(tmp_path)
    state = load_file(llm / "model.safetensors")
    (llm / "model.safetensors").unlink()
    save_file(state, llm / "model-00001-of-00002.safetensors")
    lavis_files(tmp_path, "")
    assert build(tmp_path, llm) == 2
    assert "shard model-00002-of-00002.safetensors is missing" in error_line(capsys.readouterr().err)


def test_pytorch_model_bin_next_to_an_adapter_safetensors_reads_the_bin(tmp_path, capsys):
    phi, llm = phi_dir(tmp_path)
    torch.save(load_file(llm / "model.safetensors"), llm / "pytorch_model.bin")
    (llm / "model.safetensors").unlink()
    save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(8, 32)},
              llm / "adapter_model.safetensors")
    lavis_files(tmp_path, "")
    assert build(tmp_path, llm, "--no-extra-norms") == 0
    assert "ignoring adapter_model.safetensors (only pytorch_model.bin read)" in capsys.readouterr().out
    same_llm(tmp_path / "built", phi)


def test_nothing_matched_counts_what_was_read_and_shows_both_sides(tmp_path, capsys):
    _, llm = phi_dir(tmp_path)
    save_file({"encoder.weight": torch.zeros(2), "decoder.weight": torch.zeros(2), "head.bias": torch.zeros(2)},
              llm / "model.safetensors")
    lavis_files(tmp_path, "")
    assert build(tmp_path, llm) == 2
    line = error_line(capsys.readouterr().err)
    assert f"error: {llm}: no tensor matched the model: read 3 tensors" in line
    assert "the file has e.g. decoder.weight, encoder.weight ..." in line
    assert "the model expects e.g. language_model.model.embed_tokens.weight" in line


def test_peft_prefixed_phi_loads_and_lora_adapter_tensors_are_refused(tmp_path, capsys):
    phi, llm = phi_dir(tmp_path)
    state = {"base_model.model." + k: v for k, v in load_file(llm / "model.safetensors").items()}
    save_file(state, llm / "model.safetensors")
    lavis_files(tmp_path, "")
    assert build(tmp_path, llm, "--no-extra-norms") == 0
    assert "removed the PEFT prefix 'base_model.model.'" in capsys.readouterr().out
    same_llm(tmp_path / "built", phi)
    state["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"] = torch.zeros(8, 32)
    save_file(state, llm / "model.safetensors")
    assert build(tmp_path, llm, "--no-extra-norms") == 2
    line = error_line(capsys.readouterr().err)
    assert f"{llm}: holds LoRA adapter tensors (e.g. base_model.model.model.layers.0.self_attn.q_proj.lora_A" in line
    assert "merge_and_unload" in line


# ------------------------------------------------------------------------------------------ 3: LAVIS depth = preset


@pytest.mark.parametrize("file, short, first", [
    (EVA, {"eva_blocks": 3}, "vision_model.encoder.layers.3."),
    (QFORMER, {"qformer_layers": 1}, "qformer.encoder.layer.1."),
])
def test_lavis_file_short_of_the_presets_depth_is_an_error(tmp_path, capsys, file, short, first):
    _, llm = phi_dir(tmp_path)
    lavis_files(tmp_path, "", **short)
    assert build(tmp_path, llm) == 2
    line = error_line(capsys.readouterr().err)
    assert line.startswith(f"error: {tmp_path / file}: lacks ") and f"first {first}" in line
    assert not (tmp_path / "built").exists()


# --------------------------------------------------------------------------------------- 4, 5, 10: sizes and config


@pytest.mark.parametrize("edit, field, state", [
    (lambda c: c.pop("intermediate_size"), "intermediate_size", "missing"),
    (lambda c: c.update(num_attention_heads=None), "num_attention_heads", "null"),
])
def test_phi_config_field_missing_or_null_names_file_and_field(tmp_path, capsys, edit, field, state):
    _, llm = phi_dir(tmp_path)
    config = json.loads((llm / "config.json").read_text())
    edit(config)
    (llm / "config.json").write_text(json.dumps(config))
    lavis_files(tmp_path, "")
    assert build(tmp_path, llm) == 2
    assert error_line(capsys.readouterr().err) == f"error: {llm / 'config.json'}: field {field!r} is {state}; " \
                                                  "a Phi config.json needs it"


def test_lavis_widths_that_do_not_fit_the_preset_heads_name_file_and_preset(tmp_path, capsys):
    _, llm = phi_dir(tmp_path)
    lavis_files(tmp_path, "")  # 32 wide: the default preset tinygptv has 12 Q-Former heads
    assert build(tmp_path, llm, preset=None) == 2
    line = error_line(capsys.readouterr().err)
    assert line == (f"error: {tmp_path / QFORMER}: the Q-Former is 32 wide, which does not split into the 12 attention "
                    "heads of --preset tinygptv; choose the --preset the files were made for")


def test_image_size_not_a_multiple_of_the_patch_names_the_flag(tmp_path, capsys):
    _, llm = phi_dir(tmp_path)
    lavis_files(tmp_path, "")
    rc = build_main(["--llm", str(llm), "--eva", str(tmp_path / EVA), "--qformer", str(tmp_path / QFORMER),
                     "--preset", "tiny", "--image-size", "30", "--out", str(tmp_path / "built")])
    assert rc == 2
    assert error_line(capsys.readouterr().err) == ("error: --image-size 30: 30 px is not a positive multiple of the "
                                                   "ViT patch size 14")


# --------------------------------------------------------------------------------- 6, 7: what is checked, and when


def test_tokenizer_is_resolved_before_any_weight_file_is_opened(tmp_path, capsys, monkeypatch):
    _, llm = phi_dir(tmp_path)
    lavis_files(tmp_path, "")
    opened = []

    def offline_tokenizer(source):
        raise UserError(f"tokenizer '{source}': not a local directory, and the Hub id could not be loaded")

    def recording(path):
        opened.append(path)
        raise AssertionError("a weight file was opened before the tokenizer")

    monkeypatch.setattr(build_module, "load_tokenizer", offline_tokenizer)
    monkeypatch.setattr(build_module, "read_checkpoint", recording)
    monkeypatch.setattr(build_module, "read_phi2", recording)
    assert build(tmp_path, llm, "--tokenizer", "microsoft/phi-2") == 2
    assert error_line(capsys.readouterr().err).startswith("error: tokenizer 'microsoft/phi-2': ")
    assert opened == []


def test_local_path_shaped_like_a_hub_id_names_both_readings(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    with pytest.raises(UserError) as caught:
        open_phi2("models/phi-2")
    message = str(caught.value)
    assert message.startswith("--llm 'models/phi-2': neither an existing local directory")
    assert f"{tmp_path / 'models' / 'phi-2'} does not exist" in message
    assert "nor a model on the Hugging Face Hub or in its local cache" in message


def test_missing_phi_tensor_names_the_folder_before_the_vision_load(tmp_path, capsys):
    _, llm = phi_dir(tmp_path)
    state = load_file(llm / "model.safetensors")
    del state["model.layers.1.mlp.fc1.weight"]
    save_file(state, llm / "model.safetensors")
    lavis_files(tmp_path, "")
    assert build(tmp_path, llm) == 2
    captured = capsys.readouterr()
    assert error_line(captured.err) == (f"error: {llm}: lacks 1 tensor(s) the model needs, first "
                                        "language_model.model.layers.1.mlp.fc1.weight (renamed or missing in the "
                                        "file, or a file for a smaller model)")
    assert "loading the vision tower" not in captured.out


def test_minigpt4_proj_is_checked_before_the_model_is_built(tmp_path, capsys):
    _, llm = phi_dir(tmp_path)
    lavis_files(tmp_path, "")
    assert build(tmp_path, llm, "--minigpt4-proj", str(tmp_path / "absent.pth")) == 2
    captured = capsys.readouterr()
    assert error_line(captured.err) == f"error: {tmp_path / 'absent.pth'}: checkpoint file does not exist"
    assert "building the model" not in captured.out
    torch.save({"model": {"llama_model.x": torch.zeros(2)}}, tmp_path / "other.pth")
    assert build(tmp_path, llm, "--minigpt4-proj", str(tmp_path / "other.pth")) == 2
    captured = capsys.readouterr()
    assert f"{tmp_path / 'other.pth'}: no llama_proj.weight / llama_proj.bias" in error_line(captured.err)
    assert "building the model" not in captured.out


# ------------------------------------------------------------------------------------------ 8, 9: log and stderr


def test_each_log_line_counts_only_what_its_file_provides(tmp_path, capsys):
    _, llm = phi_dir(tmp_path)
    lavis_files(tmp_path, "")
    assert build(tmp_path, llm) == 0
    lines = capsys.readouterr().out.splitlines()
    eva = next(x for x in lines if x.startswith(f"[weights] {tmp_path / EVA}: loaded"))
    qformer = next(x for x in lines if x.startswith(f"[weights] {tmp_path / QFORMER}: loaded"))
    phi = next(x for x in lines if x.startswith(f"[weights] {llm}: loaded"))
    assert "missing" not in eva and "missing" not in qformer and "missing" not in phi, (eva, qformer, phi)
    assert phi.endswith("; 10 not in this source by design (TinyGPT-V's q/k LayerNorms and post-attention RMSNorm: "
                        "fresh unless another file has them)")
    assert sum("by design" in x for x in lines) == 1


def wrong_shape_phi(tmp_path):
    _, llm = phi_dir(tmp_path, "phi_wrong_shape")
    state = load_file(llm / "model.safetensors")
    state["model.layers.1.mlp.fc1.weight"] = torch.zeros(65, 32)
    save_file(state, llm / "model.safetensors")
    lavis_files(tmp_path, "")
    return llm


def test_a_redirected_stderr_gets_no_progress_bar_only_the_error_line(tmp_path, capsys):
    llm = wrong_shape_phi(tmp_path)
    capsys.readouterr()
    assert build(tmp_path, llm) == 2
    err = capsys.readouterr().err
    assert "\r" not in err and len(err.splitlines()) == 1
    assert error_line(err).startswith(f"error: {llm}: tensor language_model.model.layers.1.mlp.fc1.weight has shape "
                                      "[65, 32]")


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_on_a_terminal_the_bar_is_closed_before_the_error(tmp_path, monkeypatch):
    llm = wrong_shape_phi(tmp_path)
    terminal = Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    assert build(tmp_path, llm) == 2
    err = terminal.getvalue()
    bar, line = err.rstrip("\n").split("\n")[-2:]
    assert "loading phi_wrong_shape" in bar and line.startswith(f"error: {llm}: tensor ")
