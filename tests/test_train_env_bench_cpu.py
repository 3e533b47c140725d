"""``python -m tinygpt.train.bench`` without a GPU: a full-size stage is refused with one line before anything is built
(before this guard it started drawing 3.9 B random weights on the CPU), ``--allow-cpu`` runs it anyway, and the tiny
stages still run (tests/test_train_tools.py benches one)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STAGE3 = REPO / "train_configs" / "stage3.yaml"


@pytest.fixture
def no_bench_run(monkeypatch):
    """The bench itself replaced: a test that reached it on a full-size model would otherwise run for many minutes."""
    from tinygpt.train import bench

    ran = []

    def fake(cfg, *args, **kwargs):
        ran.append(cfg.model.preset)
        return {"fake": True}

    monkeypatch.setattr(bench, "bench", fake)
    return ran


def test_a_full_size_stage_is_refused_on_the_cpu(no_bench_run, capsys):
    from tinygpt.train.bench import main

    assert main(["--cfg-path", str(STAGE3), "--random-weights", "--options", "run.cpu=true"]) == 2
    assert no_bench_run == []
    err = capsys.readouterr().err.strip()
    assert err == (f"error: {REPO / 'train_configs' / 'base.yaml'}: model.preset: tinygptv is a 3.9 B-parameter model "
                   "and this run has run.cpu: true: one CPU step takes many minutes and tens of GiB; bench a tiny "
                   "stage (train_configs/tiny/stageN.yaml), run on a GPU, or pass --allow-cpu to run it anyway")


def test_allow_cpu_runs_a_full_size_stage_anyway(no_bench_run, capsys):
    from tinygpt.train.bench import main

    assert main(["--cfg-path", str(STAGE3), "--random-weights", "--json", "--allow-cpu",
                 "--options", "run.cpu=true"]) == 0
    assert no_bench_run == ["tinygptv"] and json.loads(capsys.readouterr().out) == {"fake": True}


def test_a_tiny_stage_passes_the_guard(no_bench_run, capsys):
    from tinygpt.train.bench import main

    tiny = REPO / "train_configs" / "tiny" / "stage3.yaml"
    assert main(["--cfg-path", str(tiny), "--random-weights", "--json", "--options", "run.cpu=true"]) == 0
    assert no_bench_run == ["tiny"]


def test_a_full_size_model_directory_is_refused_by_its_config(tmp_path, no_bench_run, capsys):
    """``model.init_from`` names a full-size model directory: its config.json says the size (no weights are read)."""
    from tinygpt.model import build_config
    from tinygpt.train.bench import main

    model_dir = tmp_path / "full"
    build_config("tinygptv").save_pretrained(str(model_dir))
    (tmp_path / "data" / "cc_sbu_align").mkdir(parents=True)  # the paths are checked first (no --random-weights)
    code = main(["--cfg-path", str(STAGE3), "--options", "run.cpu=true", f"model.init_from={model_dir}",
                 f"vars.data_root={tmp_path / 'data'}"])
    assert code == 2 and no_bench_run == []
    assert f"error: --options: model.init_from: {model_dir} is a 3.9 B-parameter model" in capsys.readouterr().err
