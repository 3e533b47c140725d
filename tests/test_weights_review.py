"""Weight import on damaged or foreign inputs found in a failure-mode review: each is one ``UserError`` naming the file
and the tensor or field, never a raw ``TypeError`` / ``AttributeError`` and never a silently wrong model (integer
weights cast to float, fp32 values that become inf in an fp16 model)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from tinygpt.errors import UserError
from tinygpt.weights import load_lavis, load_phi2, load_released
from tinygpt.weights.blip2_hf import blip2_config_overrides
from tinygpt.weights.lavis import lavis_config_overrides
from tinygpt.weights.sources import weight_files
from tinygpt.weights.torch_file import read_checkpoint
from weight_sources import hf_phi, lavis_files, our_llm, released_state, tiny_vlm


def phi_with(tmp_path, edit):
    """A Phi-2 folder (save_pretrained layout) whose model.safetensors went through ``edit(state)``."""
    hf_phi(qk_layernorm=False).save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    edit(state)
    save_file(state, tmp_path / "model.safetensors")
    return tmp_path


@pytest.mark.parametrize("dtype", [torch.int8, torch.bool])
def test_integer_or_bool_weights_are_refused_not_cast(tmp_path, dtype):
    def edit(state):  # what a bitsandbytes 8-bit save_pretrained holds: int8 weights of the same shape
        state["model.embed_tokens.weight"] = (state["model.embed_tokens.weight"] * 100).to(dtype)

    folder = phi_with(tmp_path, edit)
    with pytest.raises(UserError, match=rf"{tmp_path}: tensor model.embed_tokens.weight is {str(dtype)[6:]}, not "
                                        "floating point"):
        load_phi2(our_llm(folder), str(folder))


def test_values_beyond_fp16_range_are_refused_for_an_fp16_model(tmp_path):
    def edit(state):
        state["model.layers.0.mlp.fc1.weight"][0, 0] = 1e6

    folder = phi_with(tmp_path, edit)
    with pytest.raises(UserError, match=r"tensor model.layers.0.mlp.fc1.weight holds values up to 1e\+06, beyond "
                                        r"the range of float16"):
        load_phi2(our_llm(folder).half(), str(folder))
    model = our_llm(folder).to(torch.bfloat16)  # bf16 holds it
    load_phi2(model, str(folder))
    assert model.model.layers[0].mlp.fc1.weight[0, 0] == torch.tensor(1e6, dtype=torch.bfloat16)


def test_fused_qkv_of_the_wrong_height_names_file_and_tensor(tmp_path):
    def edit(state):  # the transformers <= 4.36 layout, one row short
        parts = [state.pop(f"model.layers.0.self_attn.{n}_proj.weight") for n in "qkv"]
        for n in "qkv":
            state.pop(f"model.layers.0.self_attn.{n}_proj.bias")
        state["model.layers.0.self_attn.query_key_value.weight"] = torch.cat(parts)[:-1].contiguous()

    folder = phi_with(tmp_path, edit)
    with pytest.raises(UserError, match=rf"{tmp_path}: tensor model.layers.0.self_attn."
                             r"query_key_value.weight has shape \[95, 32\]: 95 rows, not divisible"):
        load_phi2(our_llm(folder), str(folder))


@pytest.mark.parametrize("weight_map", [["model-00001-of-00001.safetensors"], {"a": ["x.safetensors"]}, {"a": None}])
def test_index_whose_weight_map_is_not_names_to_files_is_a_user_error(tmp_path, weight_map):
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(UserError, match="model.safetensors.index.json: not a valid weight index"):
        weight_files(tmp_path)


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/etc/x.safetensors", "sub/x.safetensors", ".."])
def test_index_naming_a_shard_outside_its_folder_is_a_user_error(tmp_path, shard):
    """A shard name is a file of the model folder; '../x' read a file next to it (or fetched a path of the hub)."""
    folder = tmp_path / "model"
    folder.mkdir()
    (tmp_path / "outside.safetensors").write_bytes(b"x")
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": shard}}))
    with pytest.raises(UserError, match=r"not a valid weight index \(shard '.*' is not a file name in its folder\)"):
        weight_files(folder)


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.update(num_query_tokens=None), "field 'num_query_tokens' is null"),
    (lambda c: c.update(num_query_tokens="32"), "field 'num_query_tokens' is \"32\""),
    (lambda c: c.update(vision_config=[1408]), "field 'vision_config' is \\[1408\\]"),
    (lambda c: c["vision_config"].update(hidden_size=None), "vision_config: field 'hidden_size' is null"),
    (lambda c: c["vision_config"].update(num_attention_heads="16"), "vision_config: field 'num_attention_heads'"),
    (lambda c: c["qformer_config"].update(num_hidden_layers=0), "qformer_config: field 'num_hidden_layers' is 0"),
    (lambda c: c["vision_config"].update(qkv_bias="yes"), "vision_config: field 'qkv_bias'"),
])
def test_blip2_config_fields_of_the_wrong_type_name_file_and_field(edit, message):
    config = {"model_type": "blip-2", "num_query_tokens": 32, "vision_config": {"hidden_size": 1408},
              "qformer_config": {"num_hidden_layers": 12}}
    assert blip2_config_overrides(config, "c.json") == {"vision": {"hidden_size": 1408},
                                                        "qformer": {"num_hidden_layers": 12}, "num_query_tokens": 32}
    edit(config)
    with pytest.raises(UserError, match=f"^c.json: {message}"):
        blip2_config_overrides(config, "c.json")


def test_position_embedding_not_on_a_square_grid_names_file_and_tensor(tmp_path):
    eva, _ = lavis_files(tmp_path, "")
    eva["pos_embed"] = torch.randn(1, 7, 32)
    torch.save(eva, tmp_path / "eva_vit_g.pth")
    with pytest.raises(UserError, match=r"eva_vit_g.pth: tensor vision_model.embeddings.position_embedding \(shape "
                                        r"\[1, 7, 32\]\): position embedding has 7 positions"):
        load_lavis(tiny_vlm(), eva=str(tmp_path / "eva_vit_g.pth"))


def test_lavis_tensor_of_another_rank_is_named_not_read_as_a_size(tmp_path):
    eva, _ = lavis_files(tmp_path, "")
    eva["patch_embed.proj.weight"] = eva["patch_embed.proj.weight"].flatten(1)  # [32, 588]: "patch size 588" before
    torch.save(eva, tmp_path / "eva_vit_g.pth")
    qformer = read_checkpoint(tmp_path / "blip2_pretrained_flant5xxl.pth")
    with pytest.raises(UserError, match=r"eva_vit_g.pth: tensor patch_embed.proj.weight has shape \[32, 588\]"):
        lavis_config_overrides(read_checkpoint(tmp_path / "eva_vit_g.pth"), qformer)


def test_tensor_under_a_non_string_key_or_a_directory_is_a_user_error(tmp_path):
    torch.save({"model": {1: torch.zeros(3), "llama_proj.weight": torch.zeros(3)}}, tmp_path / "intkey.pth")
    with pytest.raises(UserError, match=r"intkey.pth: key 1 \(int\) is not a string"):
        load_released(tiny_vlm(), str(tmp_path / "intkey.pth"))
    (tmp_path / "stage3.pth").mkdir()
    with pytest.raises(UserError, match="stage3.pth: is a directory; expected a checkpoint file"):
        read_checkpoint(tmp_path / "stage3.pth")


def test_two_copies_of_a_tensor_under_two_layouts_are_an_error_not_a_silent_pick(tmp_path):
    def edit(state):  # the transformers <= 4.36 fused tensor beside today's split q/k/v of the same layer
        state["model.layers.0.self_attn.query_key_value.weight"] = torch.zeros(96, 32)

    folder = phi_with(tmp_path / "phi", edit)
    with pytest.raises(UserError, match=r"phi: model.layers.0.self_attn.query_key_value.weight and "
                                        r"model.layers.0.self_attn.q_proj.weight are both "
                                        r"model.layers.0.self_attn.qkv.weight"):
        load_phi2(our_llm(folder), str(folder))

    eva, _ = lavis_files(tmp_path, "")  # bare EVA names and a zeroed copy under visual_encoder.
    torch.save({**eva, **{"visual_encoder." + k: torch.zeros_like(v) for k, v in eva.items()}},
               tmp_path / "eva_vit_g.pth")
    with pytest.raises(UserError, match="eva_vit_g.pth: cls_token and visual_encoder.cls_token are both "
                                        "vision_model.embeddings.class_embedding"):
        load_lavis(tiny_vlm(), eva=str(tmp_path / "eva_vit_g.pth"))

    state, prefix, _ = released_state(1)  # stage-1 names and a stage-2..4 (peft) copy of one tensor
    embed = state[prefix + "embed_tokens.weight"]
    state["llama_model.base_model.model.model.embed_tokens.weight"] = torch.zeros_like(embed)
    torch.save({"model": state}, tmp_path / "stage1.pth")
    with pytest.raises(UserError, match=r"stage1.pth: llama_model.model.embed_tokens.weight and "
                                        r"llama_model.base_model.model.model.embed_tokens.weight are both "):
        load_released(tiny_vlm(), str(tmp_path / "stage1.pth"))
