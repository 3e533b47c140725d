"""Stage-config mistakes found in review, each now one ``error:`` line naming the file (or ``--options``) and the key:
a list over a mapping (a traceback before), a repeated ``--options`` (the earlier ones were dropped), a folder or a
missing base in ``extends``, YAML errors that said neither what nor where, interpolation typos blamed on base.yaml,
non-finite floats and 65-bit seeds accepted, ``model.lora={}`` refused on the command line, a ``model.tokenizer``
ignored beside init_from or missing until the model build, an empty checkpoint_dir replaced by the default, a
setting no file sets reported as base.yaml's interpolation error, and an empty TINYGPT_OUTPUT making /stage1."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from tinygpt.cli import evaluate as evaluate_cli
from tinygpt.cli import train as train_cli
from tinygpt.config import check_paths, load_config
from tinygpt.config.schema import LoraSettings
from tinygpt.errors import UserError

REPO = Path(__file__).resolve().parents[1]
STAGE3 = REPO / "train_configs" / "stage3.yaml"
TINY1 = REPO / "train_configs" / "tiny" / "stage1.yaml"
BASE = REPO / "train_configs" / "base.yaml"


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def extending_stage3(tmp_path: Path, body: str) -> Path:
    return write(tmp_path / "mine.yaml", f"extends: [{os.path.relpath(STAGE3, tmp_path)}]\n{body}")


def error_of(path, options=None) -> str:
    with pytest.raises(UserError) as info:
        load_config(path, options)
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("option, key, now, was", [
    ("data.datasets=[a]", "data.datasets", "list", "mapping"),
    ("optim.betas.0=0.5", "optim.betas", "mapping", "list"),
    ("vars=[1]", "vars", "list", "mapping"),
])
def test_a_list_over_a_mapping_in_options_is_one_line(option, key, now, was, capsys):
    assert train_cli.main(["--check", "--cfg-path", str(STAGE3), "--options", option]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --options: {key}: a {now} cannot replace the {was} set in ")
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_a_list_over_a_mapping_in_a_file_names_the_file_and_the_base(tmp_path):
    mine = extending_stage3(tmp_path, "optim:\n  betas: {0: 0.5}\n")
    assert error_of(mine) == (f"{mine}: optim.betas: a mapping cannot replace the list set in {BASE} "
                              "(give the whole list)")


def test_repeated_options_all_apply(capsys):
    for cli in (train_cli, evaluate_cli):
        args = cli.parse_args(["--cfg-path", "x.yaml", "--options", "a=1", "b=2", "--options", "c=3"])
        assert args.options == ["a=1", "b=2", "c=3"]
    assert train_cli.main(["--check", "--cfg-path", str(STAGE3), "--options", "run.seed=abc",
                           "--options", "run.keep_last=3"]) == 2
    assert "error: --options: run.seed: expected an integer, got 'abc'" in capsys.readouterr().err


def test_a_folder_as_cfg_path_or_base_says_so(tmp_path):
    assert error_of(tmp_path) == f"{tmp_path}: is a folder, not a YAML config file"
    mine = write(tmp_path / "mine.yaml", "extends: .\n")
    assert error_of(mine) == f"{mine}: extends: '.' names {tmp_path}, which is a folder (bases are relative to " \
                             "this file)"


def test_a_missing_base_names_the_file_that_extends_it(tmp_path):
    """A shipped stage copied elsewhere: its relative base.yaml is missing there; the message names the copy."""
    copy = write(tmp_path / "my_stage1.yaml", (REPO / "train_configs" / "stage1.yaml").read_text())
    assert error_of(copy) == (f"{copy}: extends: 'base.yaml' names {tmp_path / 'base.yaml'}, which does not exist "
                              "(bases are relative to this file)")


@pytest.mark.parametrize("text, problem", [  # regular expressions of PyYAML's words
    ("run:\n  seed: 1\n  seed: 2\n", r"found duplicate key seed \(line 4, column 3\)"),
    # PyYAML 6.0.1 names the character ("found character '\\t' that cannot ..."), 6.0.4 does not
    ("run:\n\tseed: 1\n", r"found character (?:'\\t' )?that cannot start any token \(line 3, column 1\)"),
])
def test_yaml_errors_say_what_and_where(tmp_path, text, problem):
    bad = extending_stage3(tmp_path, text)
    error = error_of(bad)  # the line after extends: is line 2
    assert re.fullmatch(re.escape(f"{bad}: not valid YAML (") + problem + r"\)", error), error


def test_an_interpolation_typo_blames_its_own_key_not_base_yaml(tmp_path):
    """base.yaml's run.checkpoint_dir is ${run.output_dir}-checkpoints: a typo in output_dir was reported as
    base.yaml's run.checkpoint_dir."""
    mine = extending_stage3(tmp_path, "run:\n  output_dir: ${vars.output_rot}/mine\n")
    assert error_of(mine) == (f"{mine}: run.output_dir: cannot resolve interpolation "
                              "(Interpolation key 'vars.output_rot' not found)")
    assert error_of(STAGE3, ["run.output_dir=${oc.env:TINYGPT_REVIEW_UNSET}"]).startswith(
        "--options: run.output_dir: cannot resolve interpolation (")


@pytest.mark.parametrize("option, key, shown", [
    ("schedule.init_lr=.inf", "schedule.init_lr", "inf"),
    ("data.datasets.cc_sbu_align.sample_ratio=.inf", "data.datasets.cc_sbu_align.sample_ratio", "inf"),
    ("model.lora.alpha=.nan", "model.lora.alpha", "nan"),
    ("schedule.min_lr=.nan", "schedule.min_lr", "nan"),
])
def test_non_finite_numbers_are_refused(option, key, shown):
    assert error_of(STAGE3, [option]) == f"--options: {key}: expected a finite number, got {shown}"


def test_a_seed_beyond_64_bits_is_refused_before_training():
    """torch.manual_seed raised 'Overflow when unpacking long long' after the run had started."""
    assert error_of(STAGE3, [f"run.seed={2**64}"]).startswith("--options: run.seed: must be below 2^63 in size")
    assert load_config(STAGE3, ["run.seed=-1"]).run.seed == -1


def test_empty_mapping_option_turns_lora_on_with_its_defaults():
    """The schema documents ``lora: {}`` (r 64, alpha 16, ...); on the command line it was refused as 'text'."""
    cfg = load_config(TINY1, ["model.trainable=lora", "model.lora={}"])
    assert cfg.model.lora == LoraSettings()
    assert "quote it: 'model.prompt_template=\"{}\"'" in error_of(TINY1, ["model.prompt_template={}"])


def test_a_tokenizer_the_stage_would_ignore_or_miss_is_named():
    """model.tokenizer only counts for a fresh model (init_from null): beside init_from it was silently ignored; a
    missing folder passed --check and failed at the model build without naming the file or the key."""
    assert error_of(TINY1, ["model.tokenizer=/nowhere/tok"]) == (
        "--options: model.tokenizer: only used when init_from is null (the model in init_from has its own "
        "tokenizer); set it to null")
    assert error_of(TINY1, ["model.init_from=null", "model.tokenizer=''"]) == (
        "--options: model.tokenizer: empty (use null: builtin)")
    cfg = load_config(TINY1, ["model.init_from=null", "model.tokenizer=/nowhere/tok"])
    with pytest.raises(UserError) as info:
        check_paths(cfg)
    assert str(info.value) == ("--options: model.tokenizer: /nowhere/tok does not exist (a folder of tokenizer "
                               "files, a hub id like microsoft/phi-2, or builtin)")


def test_an_empty_checkpoint_dir_is_refused_not_replaced_by_the_default():
    assert error_of(STAGE3, ["run.checkpoint_dir=''"]) == (
        "--options: run.checkpoint_dir: empty path (use null for <output_dir>-checkpoints)")


def test_a_setting_an_interpolation_needs_but_no_file_sets_is_named(tmp_path):
    """A new stage without run.output_dir: base.yaml's ${run.output_dir}-checkpoints failed first, and the message
    blamed base.yaml's run.checkpoint_dir."""
    mine = write(tmp_path / "mine.yaml", f"extends: [{os.path.relpath(BASE, tmp_path)}]\n"
                 "data:\n  datasets:\n    a: {kind: cc_sbu_align, batch_size: 2}\n"
                 "schedule: {init_lr: 1.0e-4, min_lr: 1.0e-5, total_steps: 10}\n")
    assert error_of(mine) == (f"{mine}: run.output_dir: required value is missing; run.checkpoint_dir in {BASE} "
                              "refers to it")


def test_an_empty_environment_root_is_refused_not_turned_into_the_filesystem_root(monkeypatch):
    """${oc.env:TINYGPT_OUTPUT,outputs} takes an empty variable's empty text, not the default: the stage output
    became /stage1."""
    monkeypatch.setenv("TINYGPT_OUTPUT", "")
    assert error_of(REPO / "train_configs" / "stage1.yaml") == (
        f"{BASE}: vars.output_root: the environment variable TINYGPT_OUTPUT is set but empty (unset it for the "
        "default, or give it a value)")


# the launch configs of evaluate.py, demo.py and serve (tinygpt.chat.launch), the same three mistakes
def test_launch_config_folder_yaml_error_and_list_over_mapping_are_one_line(tmp_path):
    from tinygpt.chat.launch import load_launch_config
    from tinygpt.evaluation.config import load_eval_config

    with pytest.raises(UserError, match=r": is a folder, not a launch config file$"):
        load_launch_config(tmp_path)
    dupl = write(tmp_path / "dupl.yaml", "model:\n  path: x\n  path: y\n")
    with pytest.raises(UserError, match=r"not valid YAML \(found duplicate key path \(line 3, column 3\)\)"):
        load_launch_config(dupl)
    with pytest.raises(UserError) as info:  # omegaconf's bare TypeError before
        load_eval_config(REPO / "eval_configs" / "shapes.yaml", ["benchmark=[a]"], check_model=False)
    assert "benchmark: a list cannot replace the mapping set in" in str(info.value)
    assert "\n" not in str(info.value)


def test_the_training_bench_takes_repeated_options_too(monkeypatch):
    from tinygpt.train import bench

    seen = {}
    monkeypatch.setattr(bench, "_bench_command", lambda args: seen.setdefault("options", args.options) and 0)
    bench.main(["--cfg-path", str(STAGE3), "--options", "run.seed=abc", "--options", "run.keep_last=3"])
    assert seen["options"] == ["run.seed=abc", "run.keep_last=3"]


def test_the_feature_cache_takes_repeated_options_too(monkeypatch):
    from tinygpt.train import features

    seen = {}
    monkeypatch.setattr(features, "_features_command", lambda args: seen.setdefault("options", args.options) and 0)
    features.main(["--cfg-path", str(STAGE3), "--out", "x", "--options", "run.seed=abc", "--options", "run.seed=1"])
    assert seen["options"] == ["run.seed=abc", "run.seed=1"]
