"""The starting model's config against the stage, before it loads (tinygpt.train.init_checks via check_outputs):
MoE layers outside the LLM, MoE settings other than an MoE init_from's, trainable_only from random weights. Each is
one UserError naming the YAML file (or --options) and the key, in --check and first thing in a real run."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tinygpt.config import load_config
from tinygpt.errors import UserError
from tinygpt.model import build_config
from tinygpt.train.stage import check_outputs

REPO = Path(__file__).resolve().parents[1]
STAGE5 = REPO / "train_configs" / "tiny" / "stage5_moe.yaml"
STAGE1 = REPO / "train_configs" / "tiny" / "stage1.yaml"


def config_dir(path: Path, layers: int = 4, moe: dict | None = None) -> Path:
    """A model directory's config.json alone (the checks read no weights): the tiny preset, ``layers`` LLM layers."""
    config = build_config("tiny", lora={})
    config.text_config.num_hidden_layers = layers
    config.text_config.moe = moe
    config.save_pretrained(str(path))
    return path


MOE = {"num_experts": 4, "top_k": 2, "layers": [1, 3], "aux_loss_weight": 0.01, "capacity_factor": 1.5,
       "router_jitter": 0.0, "z_loss_weight": 0.0}


def stage5(tmp_path: Path, *options: str, path: Path = STAGE5):
    return load_config(path, [f"vars.output_root={tmp_path}", f"run.output_dir={tmp_path / 'out'}", *options])


def refused(cfg) -> str:
    with pytest.raises(UserError) as info:
        check_outputs(cfg)
    return str(info.value)


def test_moe_layers_outside_the_preset_are_refused(tmp_path):
    message = refused(stage5(tmp_path, "model.init_from=null", "model.moe.layers=[1,7]"))
    assert message == ("--options: model.moe.layers: layer indices [7] are outside the model's 0..3 "
                       "(preset 'tiny' has 4 LLM layers)")


def test_moe_layers_outside_init_from_name_the_yaml_file(tmp_path):
    start = config_dir(tmp_path / "start", layers=2)
    own = tmp_path / "stage5.yaml"
    own.write_text(f"extends: [{os.path.relpath(STAGE5, tmp_path)}]\nmodel:\n  moe:\n    layers: [1, 3]\n")
    message = refused(stage5(tmp_path, f"model.init_from={start}", path=own))
    assert message == (f"{own}: model.moe.layers: layer indices [3] are outside the model's 0..1 "
                       f"(model.init_from {start} has 2 LLM layers)")


def test_alternate_layers_of_a_one_layer_llm_pick_none(tmp_path):
    start = config_dir(tmp_path / "start", layers=1)
    message = refused(stage5(tmp_path, f"model.init_from={start}"))
    assert message.startswith(f"{STAGE5}: model.moe.layers: 'alternate' picks no layer of the 1-layer LLM of "
                              f"model.init_from {start}")


def test_moe_settings_other_than_an_moe_init_from_are_refused(tmp_path):
    start = config_dir(tmp_path / "start", moe=MOE)
    message = refused(stage5(tmp_path, f"model.init_from={start}", "model.moe.num_experts=2"))
    assert message == (f"--options: model.moe.num_experts: model.init_from {start} already has MoE layers with "
                       "other settings: num_experts 2 (the model: 4); a model with experts trains further only with "
                       "its own settings")
    message = refused(stage5(tmp_path, f"model.init_from={start}", "model.moe.layers=[1]"))
    assert message.startswith("--options: model.moe.layers: ") and "layers [1] (the model: [1, 3])" in message
    check_outputs(stage5(tmp_path, f"model.init_from={start}"))  # the same settings ('alternate' is [1, 3]): fine


def test_moe_null_over_an_moe_init_from_is_refused(tmp_path):
    start = config_dir(tmp_path / "start", moe=MOE)
    cfg = load_config(REPO / "train_configs" / "tiny" / "stage4.yaml",
                      [f"vars.output_root={tmp_path}", f"model.init_from={start}"])
    assert refused(cfg) == (f"--options: model.init_from: the model {start} has MoE layers but this stage's "
                            "model.moe is null; set model.moe to the model's settings (and trainable: moe), or start "
                            "from a dense model")
    cfg = load_config(REPO / "train_configs" / "tiny" / "stage4.yaml",
                      [f"vars.output_root={tmp_path}", f"model.init_from={start}", "model.moe=null"])
    assert refused(cfg).startswith(f"--options: model.moe: the model {start} has MoE layers")


def test_trainable_only_from_random_weights_is_refused(tmp_path):
    cfg = load_config(STAGE1, [f"run.output_dir={tmp_path / 'out'}", "model.init_from=null",
                               "run.save_mode=trainable_only"])
    assert refused(cfg) == ("--options: run.save_mode: trainable_only is impossible: model.init_from is null, so the "
                            "model starts from random weights and there is no base directory to refer to; use auto "
                            "or whole")
    own = tmp_path / "stage1.yaml"
    own.write_text(f"extends: [{os.path.relpath(STAGE1, tmp_path)}]\nrun:\n  save_mode: trainable_only\n")
    cfg = load_config(own, [f"run.output_dir={tmp_path / 'out'}", "model.init_from=null"])
    assert refused(cfg).startswith(f"{own}: run.save_mode: trainable_only is impossible: model.init_from is null "
                                   "(in --options), so")


def test_a_real_run_stops_before_the_model_loads(tmp_path, monkeypatch):
    from tinygpt.train import stage

    def no_load(*args, **kwargs):
        raise AssertionError("the model was built")

    monkeypatch.setattr(stage, "build_model", no_load)
    monkeypatch.setattr(stage, "build_datasets", no_load)
    with pytest.raises(UserError, match=r"^--options: model\.moe\.layers: layer indices \[9\]"):
        stage.run_stage(stage5(tmp_path, "model.init_from=null", "model.moe.layers=[9]"))


def test_check_flag_reports_it(tmp_path, capsys, tiny_synthetic_data):
    from tinygpt.cli.train import main

    data = tiny_synthetic_data
    start = config_dir(tmp_path / "start", moe=MOE)
    args = ["--cfg-path", str(STAGE5), "--check", "--options", f"vars.data_root={data}",
            f"vars.output_root={tmp_path}", f"model.init_from={start}"]
    assert main(args) == 0
    assert main(args + ["model.moe.top_k=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: --options: model.moe.top_k: model.init_from {start} already has MoE layers with other "
                   "settings: top_k 1 (the model: 2); a model with experts trains further only with its own settings"]
