"""A Q-Former feature cache fits only the stage it was made for: the same model directory, image size, Q-Former width
and query count, checked from its manifest.json before the model loads (train.py --check too). builtin:tiny caches."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import test_train_tools
from tinygpt.config import load_config
from tinygpt.errors import UserError

STAGE3 = Path(__file__).resolve().parents[1] / "train_configs" / "tiny" / "stage3.yaml"
FIX = r"; rebuild it with python -m tinygpt\.train\.features --cfg-path .*stage3\.yaml --dataset cc_sbu_align --out "


fresh_accelerate_state, align_root = test_train_tools.fresh_accelerate_state, test_train_tools.align_root  # shared


@pytest.fixture(scope="module")
def cache(base_model, tmp_path_factory) -> Path:
    """A cache of two 112-px samples written from ``base_model`` (the writer's own API, as the CLI calls it)."""
    from tinygpt.model import load_vlm
    from tinygpt.train.features import write_features

    torch.manual_seed(0)
    samples = [{"images": torch.rand(1, 3, 112, 112), "turns": [{"user": "<ImageHere>", "assistant": f"a {i}"}],
                "dataset": "cc_sbu_align"} for i in range(2)]
    out = tmp_path_factory.mktemp("features") / "cache"
    return write_features(load_vlm(base_model), samples, out, "cc_sbu_align", str(base_model), progress=False)


def stage(root: Path, tmp_path: Path, *extra: str):
    """Tiny stage 3 training on the cache ``root`` (from base_model unless ``extra`` says otherwise)."""
    return [f"run.output_dir={tmp_path / 'out'}", "data.datasets.cc_sbu_align.kind=qformer_features",
            f"data.datasets.cc_sbu_align.params={{root: {root}}}", *extra]


def check(options: list[str]) -> None:
    from tinygpt.train.stage import check_dataset_specs

    check_dataset_specs(load_config(STAGE3, options))


def edited(cache: Path, tmp_path: Path, **fields) -> Path:
    """A copy of ``cache`` whose manifest has ``fields`` changed (None: removed)."""
    copy = shutil.copytree(cache, tmp_path / "edited")
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest.update(fields)
    (copy / "manifest.json").write_text(json.dumps({k: v for k, v in manifest.items() if v is not None}))
    return copy


def test_a_new_cache_records_its_model_directory_and_fits_its_own_stage(cache, base_model, tmp_path, monkeypatch):
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["model"] == str(base_model) and manifest["model_dir"] == str(base_model.resolve())
    assert (manifest["image_size"], manifest["hidden_size"], manifest["num_query_tokens"]) == (112, 128, 32)
    check(stage(cache, tmp_path, f"model.init_from={base_model}"))
    monkeypatch.chdir(base_model.parent)  # the same directory, named relative to the working directory
    check(stage(cache, tmp_path, f"model.init_from=./{base_model.name}"))


def test_a_cache_made_at_another_image_size_is_refused_before_the_model_loads(cache, base_model, tmp_path,
                                                                            monkeypatch, capsys):
    import tinygpt.train.stage as stage_module
    from tinygpt.cli.train import main

    options = stage(cache, tmp_path, f"model.init_from={base_model}", "model.image_size=224")
    message = (rf"^--options: data\.datasets\.cc_sbu_align\.params\.root: the feature cache {cache} does not fit this "
               rf"stage: manifest\.json image_size is 112, this stage trains at 224 px{FIX}{cache} --options "
               rf"model\.init_from={base_model} model\.image_size=224$")
    with pytest.raises(UserError, match=message):
        check(options)
    monkeypatch.setattr(stage_module, "build_model", lambda *a, **k: pytest.fail("the model loaded"))
    with pytest.raises(UserError, match=message):
        stage_module.run_stage(load_config(STAGE3, options))
    assert main(["--check", "--cfg-path", str(STAGE3), "--options", *options]) == 2
    assert capsys.readouterr().err.startswith("error: --options: data.datasets.cc_sbu_align.params.root: ")


def test_a_cache_of_another_model_directory_is_refused(cache, base_model, tmp_path):
    twin = shutil.copytree(base_model, tmp_path / "twin")  # equal weights, but another model as far as a cache knows
    with pytest.raises(UserError, match=rf"the feature cache {cache} was made from another model: manifest\.json "
                                        rf"model_dir is {base_model.resolve()}, this stage's model\.init_from is "
                                        rf"{twin.resolve()}{FIX}"):
        check(stage(cache, tmp_path, f"model.init_from={twin}"))
    with pytest.raises(UserError, match=r"manifest\.json model_dir is .*, this stage's model\.init_from is null "
                                        r"\(random weights\)"):
        check(stage(cache, tmp_path, "model.init_from=null"))


def test_a_cache_of_another_width_or_query_count_is_refused(cache, base_model, tmp_path):
    wide = edited(cache, tmp_path, hidden_size=768)
    with pytest.raises(UserError, match=r"does not fit this stage: manifest\.json hidden_size is 768, its model takes "
                                        r"Q-Former outputs 128 wide" + FIX):
        check(stage(wide, tmp_path, f"model.init_from={base_model}"))
    shutil.rmtree(wide)
    few = edited(cache, tmp_path, num_query_tokens=16)
    with pytest.raises(UserError, match=r"manifest\.json num_query_tokens is 16, its model takes 32 query tokens"):
        check(stage(few, tmp_path, f"model.init_from={base_model}"))


def test_a_cache_from_before_model_dir_is_compared_by_its_path(cache, base_model, tmp_path, monkeypatch):
    """Older caches recorded only model.init_from as their config gave it, often relative to the working directory."""
    old = edited(cache, tmp_path, model=base_model.name, model_dir=None)
    monkeypatch.chdir(base_model.parent)
    check(stage(old, tmp_path, f"model.init_from={base_model}"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=rf"made from another model: manifest\.json model is {base_model.name}, "
                                        rf"this stage's model\.init_from is {base_model.resolve()}"):
        check(stage(old, tmp_path, f"model.init_from={base_model}"))
    bare = edited(cache, tmp_path / "b", hidden_size=None)
    with pytest.raises(UserError, match=r"params\.root: .*manifest\.json: not a feature-cache manifest \(no "
                                        r"'hidden_size'\); rebuild the cache"):
        check(stage(bare, tmp_path, f"model.init_from={base_model}"))


def test_the_feature_command_caches_a_builtin_tiny_stage(align_root, base_model, tmp_path, monkeypatch, capsys):
    """builtin:tiny (tiny stages 1-2) is resolved to the cached backbones, here base_model, and recorded as such."""
    import tinygpt.tiny.backbones as backbones
    from tinygpt.cli.train import main as train_main
    from tinygpt.train.features import main

    monkeypatch.setattr(backbones, "ensure_tiny_backbones", lambda *a, **k: base_model)
    out = tmp_path / "cache"
    assert main(["--cfg-path", str(STAGE3), "--out", str(out), "--options", "model.init_from=builtin:tiny",
                 f"data.datasets.cc_sbu_align.params.root={align_root}"]) == 0, capsys.readouterr().err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"] == "builtin:tiny" and manifest["model_dir"] == str(base_model.resolve())
    assert manifest["samples"] == 8  # every image of align_root (test_train_tools)
    options = stage(out, tmp_path, "model.init_from=builtin:tiny")
    assert train_main(["--check", "--cfg-path", str(STAGE3), "--options", *options]) == 0  # by name, unresolved
    check(stage(out, tmp_path, f"model.init_from={base_model}"))  # as run_stage sees it once resolved
    rebuilt = shutil.copytree(base_model, tmp_path / "tiny-backbones-rebuilt")
    with pytest.raises(UserError, match=rf"manifest\.json model_dir is {base_model.resolve()} \(builtin:tiny\), "
                                        rf"this stage's model\.init_from is {rebuilt.resolve()}"):
        check(stage(out, tmp_path, f"model.init_from={rebuilt}"))
    with pytest.raises(UserError, match=r"made from another model: manifest\.json model is builtin:tiny, this "
                                        rf"stage's model\.init_from is {base_model.resolve()}"):
        check(stage(edited(out, tmp_path / "e", model_dir=None), tmp_path, f"model.init_from={base_model}"))


def test_the_feature_command_refuses_a_dataset_that_is_a_cache_already(cache, base_model, tmp_path, capsys):
    from tinygpt.train.features import main

    options = stage(cache, tmp_path, f"model.init_from={base_model}")
    assert main(["--cfg-path", str(STAGE3), "--out", str(tmp_path / "again"), "--options", *options]) == 2
    assert capsys.readouterr().err.strip().endswith(
        "--dataset: cc_sbu_align is a feature cache already (kind qformer_features in --options); cache the dataset "
        "of its images")
