"""Stage configs: the shipped YAMLs validate; every kind of mistake is one clear line naming file and dotted key."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tinygpt.config import check_paths, load_config
from tinygpt.errors import UserError
from tinygpt.train.schedule import WarmupCosine

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "train_configs"
FULL = [CONFIGS / f"stage{i}.yaml" for i in range(1, 5)]
TINY = [CONFIGS / "tiny" / f"stage{i}.yaml" for i in range(1, 5)]


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.mark.parametrize("path", FULL + TINY, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_shipped_configs_validate(path):
    cfg = load_config(path)
    assert cfg.schedule.min_lr <= cfg.schedule.init_lr
    assert cfg.schedule.warmup_steps <= cfg.schedule.total_steps
    assert cfg.active_datasets()
    assert not Path(cfg.run.output_dir).is_absolute()  # roots come from the environment, not the YAML


def test_paper_settings_and_fixes():
    s1, s2, s3, s4 = (load_config(p) for p in FULL)
    # stage 1: one run with the whole budget, no LoRA, LAION 115 : CC/SBU 14, batch 64, 224 px
    assert s1.model.lora is None and s1.model.trainable == "stage1"
    assert s1.schedule.total_steps == 17 * 5000
    assert {n: (d.sample_ratio, d.batch_size) for n, d in s1.active_datasets().items()} == {
        "laion": (115, 64), "cc_sbu": (14, 64)}
    assert (s1.model.prompt_template, s1.model.end_sym, s1.model.max_txt_len) == ("{}", "\n", 32)
    # stage 2 chains from stage 1 and adds LoRA r64 / alpha 16 / dropout 0.05 on qkv + dense
    assert s2.model.init_from == s1.run.output_dir
    assert (s2.model.lora.r, s2.model.lora.alpha, s2.model.lora.dropout) == (64, 16.0, 0.05)
    assert s2.model.lora.target_modules == ["qkv", "dense"]
    assert (s2.schedule.warmup_steps, s2.schedule.total_steps) == (5000, 20000)
    assert s3.model.init_from == s2.run.output_dir and s4.model.init_from == s3.run.output_dir
    assert (s3.model.prompt_template, s3.model.end_sym, s3.model.max_txt_len) == ("###Human: {} ###Assistant: ",
                                                                                    "###", 160)
    assert s3.active_datasets()["cc_sbu_align"].batch_size == 6
    # stage 4: 448 px, 20 datasets summing to ratio 690, min_lr fixed below init_lr
    assert s4.model.image_size == 448 and s4.model.max_txt_len == 1024
    assert s4.model.prompt_template == "[INST] {} [/INST]"
    assert len(s4.active_datasets()) == 20
    assert sum(d.sample_ratio for d in s4.active_datasets().values()) == 690
    assert s4.schedule.min_lr < s4.schedule.init_lr == 1e-5


def test_tiny_twins_keep_stage_semantics():
    for full, tiny in zip(FULL, TINY):
        f, t = load_config(full), load_config(tiny)
        assert t.model.preset == "tiny"
        assert (t.model.trainable, t.model.lora, t.model.prompt_template, t.model.end_sym) == (
            f.model.trainable, f.model.lora, f.model.prompt_template, f.model.end_sym)
        kinds_full = {n: d.kind for n, d in f.active_datasets().items()}
        for name, spec in t.active_datasets().items():
            if name in kinds_full:
                assert spec.kind == kinds_full[name]
    assert load_config(TINY[0]).model.init_from == "builtin:tiny"


def test_env_interpolation_and_options(monkeypatch, tmp_path):
    monkeypatch.setenv("TINYGPT_DATA", str(tmp_path / "d"))
    monkeypatch.setenv("TINYGPT_OUTPUT", str(tmp_path / "o"))
    cfg = load_config(FULL[2], ["run.seed=7", "schedule.init_lr=2e-5", "model.lora.r=8"])
    assert cfg.active_datasets()["cc_sbu_align"].params["root"] == f"{tmp_path}/d/cc_sbu_align"
    assert cfg.model.init_from == f"{tmp_path}/o/stage2"
    assert cfg.checkpoint_dir == f"{tmp_path}/o/stage3-checkpoints"
    assert (cfg.run.seed, cfg.schedule.init_lr, cfg.model.lora.r) == (7, 2e-5, 8)


def test_null_entry_disables_inherited_dataset():
    cfg = load_config(TINY[3])
    assert "refvg" not in cfg.active_datasets() and cfg.data.datasets["refvg"] is None
    assert {"coco_vqa", "ok_vqa", "aok_vqa", "gqa"} <= set(cfg.active_datasets())


def test_tiny_stage4_keeps_the_real_share_of_vqa():
    tiny, full = load_config(TINY[3]).active_datasets(), load_config(FULL[3]).active_datasets()
    vqa = ("coco_vqa", "ok_vqa", "aok_vqa", "gqa")
    assert sum(tiny[n].sample_ratio for n in vqa) == sum(full[n].sample_ratio for n in vqa) == 85
    assert sum(d.sample_ratio for d in tiny.values()) == 580


def relative(target: Path, start: Path) -> str:
    return os.path.relpath(target, start)


def test_unknown_key_names_file_key_and_suggestion(tmp_path):
    bad = write(tmp_path / "bad.yaml", f"extends: [{relative(FULL[2], tmp_path)}]\nmodel:\n  init_form: x\n")
    with pytest.raises(UserError) as info:
        load_config(bad)
    message = str(info.value)
    assert message.startswith(str(bad)) and "'model.init_form'" in message and "'model.init_from'" in message
    assert "\n" not in message


def test_unknown_key_from_a_base_names_the_base(tmp_path):
    base = write(tmp_path / "base.yaml", "run:\n  save_evry: 5\n")
    top = write(tmp_path / "top.yaml", f"extends: [base.yaml, {CONFIGS / 'stage3.yaml'}]\n")
    with pytest.raises(UserError, match="absolute"):
        load_config(top)
    top = write(tmp_path / "top.yaml", f"extends: [{relative(FULL[2], tmp_path)}, base.yaml]\n")
    with pytest.raises(UserError) as info:
        load_config(top)
    assert str(info.value).startswith(str(base)) and "run.save_every" in str(info.value)


@pytest.mark.parametrize("options, expected", [
    (["run.seed=abc"], "run.seed: expected an integer, got 'abc'"),
    (["schedule.init_lr=[1]"], "schedule.init_lr: expected a number"),
    (["model.lora.r=0"], "model.lora.r: must be >= 1"),
    (["model.trainable=lorra"], "did you mean 'lora'"),
    (["model.lora=null"], "model.lora: trainable set 'lora' needs LoRA settings"),
    (["schedule.min_lr=1e-3"], "schedule.min_lr: 0.001 is above init_lr"),
    (["schedule.warmup_steps=5000"], "schedule.warmup_steps: must be in [0, total_steps=1000]"),
    (["data.datasets.cc_sbu_align.batch_size=0"], "data.datasets.cc_sbu_align.batch_size: must be >= 1"),
    (["model.image_size=100"], "model.image_size: 100 px is not a positive multiple"),
    (["run.precison=bf16"], "did you mean 'run.precision'"),
    (["model.init_from=builtin:huge"], "model.init_from: 'builtin:huge' is not one of builtin:tiny"),
    (["noequals"], "--options: 'noequals' is not key=value"),
])
def test_bad_values_are_one_clear_line(options, expected):
    with pytest.raises(UserError) as info:
        load_config(FULL[2], options)
    assert expected in str(info.value) and "\n" not in str(info.value)
    assert str(info.value).startswith("--options") or str(info.value).startswith(str(CONFIGS))


def test_original_stage4_min_lr_is_refused(tmp_path):
    cfg = write(tmp_path / "s4.yaml", f"extends: [{relative(FULL[3], tmp_path)}]\nschedule:\n  min_lr: 8.0e-5\n")
    with pytest.raises(UserError) as info:
        load_config(cfg)
    assert str(info.value).startswith(f"{cfg}: schedule.min_lr: 8e-05 is above init_lr 1e-05")


def test_missing_required_value(tmp_path):
    cfg = write(tmp_path / "c.yaml", "model: {}\ndata:\n  datasets:\n    a: {kind: cc_sbu_align, batch_size: 2}\n"
                "schedule: {init_lr: 1.0e-4, min_lr: 1.0e-5, total_steps: 10}\n")
    with pytest.raises(UserError, match=r"run.output_dir: required value is missing"):
        load_config(cfg)
    cfg.write_text(cfg.read_text().replace("batch_size: 2", "sample_ratio: 1"))
    with pytest.raises(UserError, match=r"data.datasets.a.batch_size: required value is missing"):
        load_config(cfg, ["run.output_dir=o"])


def test_extends_cycle_and_missing_file(tmp_path):
    write(tmp_path / "a.yaml", "extends: b.yaml\n")
    write(tmp_path / "b.yaml", "extends: [a.yaml]\n")
    with pytest.raises(UserError, match="cycle"):
        load_config(tmp_path / "a.yaml")
    with pytest.raises(UserError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    write(tmp_path / "broken.yaml", "model: [unclosed\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(tmp_path / "broken.yaml")


def test_check_paths_names_file_and_key(tmp_path, monkeypatch):
    monkeypatch.setenv("TINYGPT_DATA", str(tmp_path / "nowhere"))
    cfg = load_config(FULL[0], ["model.init_from=null"])
    with pytest.raises(UserError) as info:
        check_paths(cfg)
    assert str(info.value).startswith(str(FULL[0])) and "data.datasets.laion.params.shards" in str(info.value)
    cfg = load_config(FULL[1])
    with pytest.raises(UserError, match=r"stage2.yaml: model.init_from: .*stage1 does not exist"):
        check_paths(cfg)


def test_paths_of_a_kind_with_a_root_are_checked_under_it(tmp_path):
    """cc_sbu_align reads <root>/<ann_file> and <root>/<image_dir>: a relative image_dir is under root, not the
    working directory."""
    root = tmp_path / "cc_sbu_align"
    (root / "pictures").mkdir(parents=True)
    (root / "filter_cap.json").write_text('{"annotations": []}')
    options = ["model.init_from=null", f"data.datasets.cc_sbu_align.params.root={root}",
               "data.datasets.cc_sbu_align.params.image_dir=pictures"]
    check_paths(load_config(FULL[2], options))  # exists under root: ok
    with pytest.raises(UserError, match=rf"params.image_dir: {root / 'nothing'} does not exist"):
        check_paths(load_config(FULL[2], [*options[:2], "data.datasets.cc_sbu_align.params.image_dir=nothing"]))


def test_a_prompt_path_is_checked_where_the_loader_opens_it(tmp_path, monkeypatch):
    """cc_sbu_align's prompt_path is a path of its own (the loader opens it from the working directory), not a file
    under root: the check used to look for it under root, refusing a file the loader reads and passing one it cannot."""
    from tinygpt.data.registry import build_dataset

    root = tmp_path / "cc_sbu_align"
    (root / "image").mkdir(parents=True)
    (root / "filter_cap.json").write_text('{"annotations": [{"image_id": "1", "caption": "a red circle"}]}')
    (tmp_path / "prompts.txt").write_text("<Img><ImageHere></Img> Describe it.\n")
    monkeypatch.chdir(tmp_path)
    options = ["model.init_from=null", f"data.datasets.cc_sbu_align.params.root={root}",
               "data.datasets.cc_sbu_align.params.prompt_path=prompts.txt"]
    cfg = load_config(FULL[2], options)
    check_paths(cfg)
    params = cfg.active_datasets()["cc_sbu_align"].params
    assert build_dataset("cc_sbu_align", image_size=28, seed=0, **params).prompts == [
        "<Img><ImageHere></Img> Describe it."]
    (tmp_path / "prompts.txt").rename(root / "prompts.txt")  # under root only: the loader would not find it
    with pytest.raises(UserError, match=r"params.prompt_path: prompts.txt does not exist"):
        check_paths(cfg)


def test_cli_reports_errors_without_traceback(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "train.py"), "--cfg-path", str(FULL[2]), "--options",
                             "model.init_form=x"], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: --options: unknown key 'model.init_form'")
    assert "Traceback" not in result.stderr
    result = subprocess.run([sys.executable, str(REPO / "train.py"), "--cfg-path", str(tmp_path / "none.yaml")],
                            capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 2 and "none.yaml: config file does not exist" in result.stderr


def test_schedule_warmup_counts_global_steps_then_cosine():
    s = WarmupCosine(init_lr=1e-4, min_lr=8e-5, warmup_lr=1e-6, warmup_steps=1000, total_steps=20000)
    assert s.lr_at(0) == pytest.approx(1e-6)
    assert s.lr_at(500) == pytest.approx(1e-6 + (1e-4 - 1e-6) * 0.5)
    assert s.lr_at(1000) == pytest.approx(1e-4)
    assert s.lr_at(19999) == pytest.approx(8e-5)
    mid = 1000 + (19999 - 1000) / 2
    assert s.lr_at(int(mid)) == pytest.approx(8e-5 + 2e-5 * 0.5 * (1 + math.cos(math.pi * int(mid - 1000) / 18999)))
    lrs = [s.lr_at(i) for i in range(1000, 20000, 500)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))  # never rises after warm-up
    assert s.lr_at(1001) > s.lr_at(999)  # continuous join, no jump back after warm-up
    with pytest.raises(UserError, match="min_lr"):
        WarmupCosine(init_lr=1e-5, min_lr=8e-5, warmup_lr=1e-6, warmup_steps=10, total_steps=100)
