"""HF-native model directories: whole and trainable-only saves, chains, LoRA, merging, bad files."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
from transformers import AutoConfig, AutoModel

from tinygpt.errors import UserError
from tinygpt.model import TinyGPTVForConditionalGeneration, load_vlm, merge_lora, save_vlm
from tinygpt.model.state import load_state
from tinygpt.model.trainable import apply_trainable_set

TURNS = [[{"user": "<Img><ImageHere></Img> what colour?", "assistant": "red"}], [{"user": "hi", "assistant": "yo"}]]


def loss(model, pixels):
    with torch.no_grad():
        return model(turns=TURNS, image_counts=[1, 0], pixel_values=pixels).loss


def perturb(model, pattern):
    with torch.no_grad():
        for name, param in model.named_parameters():
            if pattern in name:
                param.add_(torch.randn_like(param) * 0.1)


def test_whole_directory_round_trip_is_exact_and_hf_native(tiny_vlm, tmp_path):
    model = tiny_vlm()
    pixels = torch.randn(1, 3, 112, 112)
    save_vlm(model, tmp_path / "m")
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in (tmp_path / "m").iterdir()}
    again = load_vlm(tmp_path / "m")
    assert torch.equal(loss(model, pixels), loss(again, pixels))
    assert again.config.prompt_template == model.config.prompt_template
    # transformers' own Auto classes read the same directory
    assert AutoConfig.from_pretrained(tmp_path / "m").model_type == "tinygptv"
    auto = AutoModel.from_pretrained(tmp_path / "m")
    assert isinstance(auto, TinyGPTVForConditionalGeneration)
    assert torch.equal(auto.proj1.weight, model.proj1.weight)


def test_trainable_only_chain_stage1_then_lora_stage(tiny_vlm, tmp_path, caplog):
    base = tiny_vlm()
    save_vlm(base, tmp_path / "base")
    pixels = torch.randn(1, 3, 112, 112)

    stage1 = load_vlm(tmp_path / "base")
    apply_trainable_set(stage1, "stage1")
    perturb(stage1, "proj")
    perturb(stage1, "layernorm.weight")
    save_vlm(stage1, tmp_path / "stage1", trainable_only=True, base_model=tmp_path / "base")
    config = json.loads((tmp_path / "stage1" / "config.json").read_text())
    assert config["base_model"] == "../base"  # relative, so the tree can move
    stage_bytes = (tmp_path / "stage1" / "model.safetensors").stat().st_size
    assert stage_bytes < (tmp_path / "base" / "model.safetensors").stat().st_size / 10

    stage2 = tiny_vlm(lora={})
    report = load_state(stage2, load_vlm(tmp_path / "stage1").state_dict(), "stage1")
    assert all(".lora_" in k for k in report.missing) and report.missing
    stage2.tokenizer = stage1.tokenizer
    apply_trainable_set(stage2, "lora")
    perturb(stage2, "lora_B")
    save_vlm(stage2, tmp_path / "stage2", trainable_only=True, base_model=tmp_path / "stage1")

    moved = tmp_path / "moved"
    moved.mkdir()
    for name in ("base", "stage1", "stage2"):  # the chain uses relative paths, so the whole tree can move
        (tmp_path / name).rename(moved / name)
    with caplog.at_level(logging.INFO, logger="tinygpt.model.checkpoint_io"):
        reloaded = load_vlm(moved / "stage2")
    assert torch.equal(loss(stage2.eval(), pixels), loss(reloaded, pixels))
    loaded = [r.getMessage() for r in caplog.records if "model.safetensors" in r.getMessage()]
    assert len(loaded) == 3 and not any("../" in line for line in loaded), loaded  # each base named without ../
    assert any(line.startswith(f"{(moved / 'base').resolve()}/model.safetensors") for line in loaded), loaded
    stages = [line for line in loaded if "/stage" in line]  # their other tensors come from the base, not missing
    assert len(stages) == 2 and all(line.endswith("tensors over its base") for line in stages), stages
    alone = tmp_path / "alone"  # a stage copied without the directory it builds on: the field is named
    shutil.copytree(moved / "stage2", alone / "stage2")
    with pytest.raises(UserError, match=r"stage2/config\.json: base_model '\.\./stage1' \(.*\) is not a model "
                                        r"directory; copy that directory too"):
        load_vlm(alone / "stage2")

    merged = merge_lora(reloaded)
    assert merged.config.lora is None
    assert not any(".lora_" in n for n, _ in merged.named_parameters())
    assert torch.allclose(loss(stage2, pixels), loss(merged, pixels), atol=1e-5)
    save_vlm(merged, moved / "merged")
    assert torch.allclose(loss(load_vlm(moved / "merged"), pixels), loss(stage2, pixels), atol=1e-5)


def test_save_is_atomic_and_replaces_an_old_directory(tiny_vlm, tmp_path, monkeypatch):
    model = tiny_vlm()
    save_vlm(model, tmp_path / "m")
    before = (tmp_path / "m" / "model.safetensors").read_bytes()

    import tinygpt.model.checkpoint_io as io

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(io, "save_file", boom)
    with pytest.raises(RuntimeError):
        save_vlm(tiny_vlm(seed=1), tmp_path / "m")
    assert (tmp_path / "m" / "model.safetensors").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no temporary directory left behind


def test_bad_directories_and_files_give_one_clear_error(tiny_vlm, tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_vlm(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no config.json"):
        load_vlm(tmp_path / "empty")
    save_vlm(tiny_vlm(), tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(UserError, match="not a readable safetensors file"):
        load_vlm(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(UserError, match="model_type is 'llama'"):
        load_vlm(tmp_path / "m")


def test_load_state_reports_and_refuses_shape_errors_and_empty_matches(tiny_vlm):
    model = tiny_vlm()
    with pytest.raises(UserError, match=r"ckpt.pth: tensor proj1.weight has shape \[3, 3\]"):
        load_state(model, {"proj1.weight": torch.zeros(3, 3)}, "ckpt.pth")
    with pytest.raises(UserError, match="no tensor matched"):
        load_state(model, {"foo.bar": torch.zeros(1)}, "other.pth")
    report = load_state(model, {"proj2.bias": torch.ones(256), "extra.x": torch.zeros(1)}, "part.pth")
    assert report.loaded == ["proj2.bias"] and report.unexpected == ["extra.x"]
    assert torch.equal(model.proj2.bias, torch.ones(256))
    assert "1 unexpected [extra.x]" in report.summary()
    with pytest.raises(UserError, match="incomplete checkpoint"):
        load_state(model, {"proj2.bias": torch.ones(256)}, "part.pth", expect_complete=True)


def test_trainable_only_dir_over_a_base_of_another_image_size(tiny_vlm, tmp_path):
    """Stage 4 (larger images) saved trainable-only over a stage-3 base: loading resizes the base's positions."""
    from tinygpt.model.vision import resize_position_embedding

    base = tiny_vlm()
    save_vlm(base, tmp_path / "base")
    big = tiny_vlm(image_size=224)
    pos = base.vision_model.embeddings.position_embedding
    load_state(big, {k: v for k, v in base.state_dict().items() if "position_embedding" not in k}, "base")
    with torch.no_grad():
        big.vision_model.embeddings.position_embedding.copy_(resize_position_embedding(pos, 224, 14))
    apply_trainable_set(big, "stage1")
    perturb(big, "proj2.")
    save_vlm(big, tmp_path / "big", trainable_only=True, base_model=tmp_path / "base")
    again = load_vlm(tmp_path / "big")
    assert again.vision_model.embeddings.position_embedding.shape[1] == 257
    pixels = torch.randn(1, 3, 224, 224)
    assert torch.equal(loss(big, pixels), loss(again, pixels))


def test_loading_draws_no_random_weights_unless_a_tensor_is_in_no_file(tiny_vlm, tmp_path, monkeypatch):
    """load_vlm builds the model without its random init when the files fill every tensor (the full-size init cost
    83 s on a 2-core CPU); a tensor no file holds (here LoRA that the config names, which a directory may lack) makes
    it build the model again with its init, so that tensor starts as in a fresh model (LoRA as peft starts it: B = 0,
    A kaiming-uniform), never as the uninitialised memory of the fast build."""
    from safetensors.torch import load_file, save_file

    from tinygpt.model.phi import TinyGPTPhiPreTrainedModel

    calls = []
    real = TinyGPTPhiPreTrainedModel._init_weights
    monkeypatch.setattr(TinyGPTPhiPreTrainedModel, "_init_weights", lambda self, m: calls.append(m) or real(self, m))
    model = tiny_vlm(lora={"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["qkv", "dense"]})
    perturb(model, ".lora_")
    save_vlm(model, tmp_path / "m")
    calls.clear()
    again = load_vlm(tmp_path / "m")
    assert calls == []  # every tensor came from the file
    saved = model.state_dict()
    assert all(torch.equal(tensor, saved[name]) for name, tensor in again.state_dict().items())

    weights = tmp_path / "m" / "model.safetensors"
    save_file({k: v for k, v in load_file(str(weights)).items() if ".lora_" not in k}, str(weights))
    again = load_vlm(tmp_path / "m")
    assert calls  # built again, with its random init
    lora_a = [p.detach() for name, p in again.named_parameters() if ".lora_A." in name]
    lora_b = [p.detach() for name, p in again.named_parameters() if ".lora_B." in name]
    assert lora_a and len(lora_b) == len(lora_a) and not any(p.any() for p in lora_b)
    assert all(0 < float(p.abs().max()) <= p.shape[1] ** -0.5 and float(p.std()) > 0.3 * p.shape[1] ** -0.5
               for p in lora_a)  # uniform on +-1/sqrt(fan_in): std 0.58/sqrt(fan_in)
    assert all(torch.equal(tensor, saved[name]) for name, tensor in again.state_dict().items() if ".lora_" not in name)
