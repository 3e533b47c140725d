"""Where a model directory may be written, and how a stage directory names its base: a model output never replaces
another model's download (a Phi-2 or BLIP-2 folder given as --out) or a folder of checkpoints, and a base outside the
output's own tree is stored absolute, so that moving the outputs keeps them loadable."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tinygpt.errors import UserError
from tinygpt.model import load_vlm, save_vlm
from tinygpt.model.checkpoint_io import check_model_out
from tinygpt.model.trainable import apply_trainable_set


def test_missing_empty_and_tinygpt_directories_may_be_replaced(tiny_vlm, tmp_path):
    assert check_model_out(tmp_path / "new", "--out") == tmp_path / "new"
    (tmp_path / "empty").mkdir()
    assert check_model_out(tmp_path / "empty", "--out") == tmp_path / "empty"
    save_vlm(tiny_vlm(), tmp_path / "ours")
    assert check_model_out(tmp_path / "ours", "--out") == tmp_path / "ours"
    save_vlm(tiny_vlm(seed=1), tmp_path / "ours")  # replaced whole
    assert {p.name for p in (tmp_path / "ours").iterdir()} >= {"config.json", "model.safetensors"}


@pytest.mark.parametrize("config,words", [
    ({"model_type": "phi", "hidden_size": 2560}, "holds another model (config.json model_type 'phi')"),
    ({"model_type": "blip-2"}, "holds another model (config.json model_type 'blip-2')"),
    ([1, 2], "holds another model (config.json model_type None)"),
    (None, "is a non-empty directory that is not a model directory (no config.json)"),
])
def test_another_models_directory_is_never_replaced(tmp_path, config, words):
    download = tmp_path / "phi-2"
    download.mkdir()
    (download / "model.safetensors").write_bytes(b"the user's weights")
    if config is not None:
        (download / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError) as refused:
        check_model_out(download, "--out")
    assert str(refused.value).startswith(f"--out: {download} {words}")
    assert str(refused.value).endswith("the model replaces the directory whole, so choose a new or empty directory")
    assert (download / "model.safetensors").read_bytes() == b"the user's weights"


def test_a_model_directory_holding_folders_is_not_replaced(tiny_vlm, tmp_path):
    save_vlm(tiny_vlm(), tmp_path / "stage1")
    (tmp_path / "stage1" / "checkpoints" / "step-10").mkdir(parents=True)
    with pytest.raises(UserError, match=r"holds folders \(checkpoints\) that replacing the model directory would "
                                        r"delete; move them out"):
        check_model_out(tmp_path / "stage1", "run.output_dir")


def test_a_base_beside_the_output_is_relative_a_far_one_absolute(tiny_vlm, tmp_path):
    cache, runs = tmp_path / "cache" / "backbones", tmp_path / "runs" / "exp1"
    save_vlm(tiny_vlm(), cache)
    stage1 = load_vlm(cache)
    apply_trainable_set(stage1, "stage1")
    save_vlm(stage1, runs / "stage1", trainable_only=True, base_model=str(cache))
    save_vlm(stage1, runs / "stage2", trainable_only=True, base_model=str(runs / "stage1"))
    stored = {name: json.loads((runs / name / "config.json").read_text())["base_model"] for name in ("stage1",
                                                                                               "stage2")}
    assert stored == {"stage1": str(cache.resolve()), "stage2": "../stage1"}

    moved = tmp_path / "elsewhere" / "deeper" / "exp1"  # the outputs move, the base stays where it was
    moved.parent.mkdir(parents=True)
    shutil.move(str(runs), str(moved))
    assert load_vlm(moved / "stage2").config.base_model == "../stage1"

    shutil.rmtree(cache)
    with pytest.raises(UserError, match=r"stage1/config\.json: base_model '.*backbones' \(.*\) is not a model "
                                        r"directory; restore it there, or fix base_model"):
        load_vlm(moved / "stage2")


def test_a_feature_cache_replaces_only_an_earlier_cache(tmp_path):
    """The cache builder replaces --out whole: a dataset folder with a manifest.json of its own (every synthetic data
    folder has one) is refused, never wiped; an earlier cache, and nothing else, may be replaced."""
    from tinygpt.train.features import check_features_out

    dataset = tmp_path / "cc_sbu_align"
    (dataset / "image").mkdir(parents=True)
    (dataset / "filter_cap.json").write_text("[]")
    (dataset / "manifest.json").write_text(json.dumps({"generator": "synthetic", "seed": 0}))
    with pytest.raises(UserError, match=r"is a non-empty directory that is not a feature cache"):
        check_features_out(dataset)
    assert (dataset / "filter_cap.json").is_file()

    cache = tmp_path / "features"
    cache.mkdir()
    (cache / "manifest.json").write_text(json.dumps({"shards": [], "samples": 0, "num_query_tokens": 32}))
    (cache / "features-00000.safetensors").write_bytes(b"")
    (cache / "samples-00000.jsonl").write_text("")
    check_features_out(cache)
    (cache / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match=r"holds files a feature cache does not write \(notes\.txt\)"):
        check_features_out(cache)


def test_a_stage_never_writes_into_the_model_it_starts_from(tiny_vlm, tmp_path):
    """run.output_dir = model.init_from, or a directory in init_from's base_model chain: refused before any work
    (it used to replace the model and leave a base_model cycle that no longer loads)."""
    from tinygpt.config import load_config
    from tinygpt.train.stage import check_outputs

    stage3 = Path(__file__).resolve().parents[1] / "train_configs" / "tiny" / "stage3.yaml"
    save_vlm(tiny_vlm(), tmp_path / "c1")
    stage = load_vlm(tmp_path / "c1")
    apply_trainable_set(stage, "stage1")
    save_vlm(stage, tmp_path / "c2", trainable_only=True, base_model=str(tmp_path / "c1"))
    for out in ("c2", "c1"):
        cfg = load_config(stage3, [f"model.init_from={tmp_path / 'c2'}", f"run.output_dir={tmp_path / out}"])
        with pytest.raises(UserError, match=rf"run\.output_dir: {tmp_path / out} is the model this stage starts from"):
            check_outputs(cfg)
    check_outputs(load_config(stage3, [f"model.init_from={tmp_path / 'c2'}", f"run.output_dir={tmp_path / 'c3'}"]))
    assert load_vlm(tmp_path / "c2").config.base_model == "../c1"


def test_a_logging_package_that_is_missing_is_named_before_any_work(monkeypatch, tmp_path):
    import importlib.util

    from tinygpt.config import load_config
    from tinygpt.train.stage import check_outputs

    stage1 = Path(__file__).resolve().parents[1] / "train_configs" / "tiny" / "stage1.yaml"
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    cfg = load_config(stage1, ["run.wandb_project=mine", f"run.output_dir={tmp_path / 'o'}"])
    with pytest.raises(UserError, match=r"^--options: run\.wandb_project: needs the wandb package"):
        check_outputs(cfg)
    assert not (tmp_path / "o-checkpoints").exists()


@pytest.mark.parametrize("flags", [["--batch-size", "0"], ["--limit", "0"], ["--limit", "-3"]])
def test_the_feature_cache_command_refuses_counts_below_one(tmp_path, capsys, flags):
    from tinygpt.train.features import main

    stage3 = Path(__file__).resolve().parents[1] / "train_configs" / "tiny" / "stage3.yaml"
    assert main(["--cfg-path", str(stage3), "--out", str(tmp_path / "f"), *flags]) == 2
    assert "error: --batch-size and --limit: expected whole numbers >= 1" in capsys.readouterr().err
    assert not (tmp_path / "f").exists()
