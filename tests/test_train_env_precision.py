"""``run.precision: fp16`` without a GPU: one warning line says what runs instead and why, and the train summary (and
the bench) record the precision that ran next to the one asked for."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

import test_train
from tinygpt.config import load_config

fresh_accelerate_state, synthetic = test_train.fresh_accelerate_state, test_train.synthetic  # shared fixtures
STAGE3 = Path(__file__).resolve().parents[1] / "train_configs" / "tiny" / "stage3.yaml"


def small(synthetic: Path, out: Path, base_model: Path, *extra: str) -> list[str]:
    return [f"vars.data_root={synthetic}", f"vars.output_root={out}", f"model.init_from={base_model}",
            "schedule.total_steps=1", "schedule.warmup_steps=1", "run.progress=false", "run.resume=false",
            "run.save_every=0", "model.max_txt_len=16", "data.datasets.cc_sbu_align.batch_size=1", "run.cpu=true",
            *extra]


def test_fp16_on_the_cpu_warns_once_and_the_summary_records_bf16(synthetic, base_model, tmp_path, caplog):
    from tinygpt.train.stage import run_stage

    cfg = load_config(STAGE3, small(synthetic, tmp_path, base_model, "run.precision=fp16"))
    with caplog.at_level(logging.INFO, logger="tinygpt.train"):
        out = run_stage(cfg)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and r.name == "tinygpt.train"]
    assert warnings == ["--options: run.precision: fp16 cannot run here (PyTorch has no fp16 autocast on the CPU); "
                        "this run trains in bf16 instead (set run.precision: bf16 to run it without this warning)"]
    summary = json.loads((out / "train_summary.json").read_text())["summary"]
    assert summary["precision"] == "bf16" and summary["precision_requested"] == "fp16"
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("trained steps"))
    assert "; precision bf16 (run.precision fp16 cannot run here)" in line


def test_a_precision_that_runs_as_asked_is_recorded_alone(synthetic, base_model, tmp_path, caplog):
    from tinygpt.train.stage import run_stage

    with caplog.at_level(logging.WARNING, logger="tinygpt.train"):
        out = run_stage(load_config(STAGE3, small(synthetic, tmp_path, base_model, "run.precision=fp32")))
    summary = json.loads((out / "train_summary.json").read_text())["summary"]
    assert summary["precision"] == "fp32" and "precision_requested" not in summary
    assert "precision" not in caplog.text


@pytest.mark.parametrize("asked, ran", [("fp16", "bf16"), ("bf16", "bf16")])
def test_the_bench_records_the_precision_that_ran(capsys, asked, ran):
    from tinygpt.train.bench import main

    code = main(["--cfg-path", str(STAGE3), "--steps", "1", "--random-weights", "--json", "--text-tokens", "4",
                 "--options", "data.datasets.cc_sbu_align.batch_size=1", "model.max_txt_len=8", "run.cpu=true",
                 f"run.precision={asked}"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["precision"] == ran
    assert result.get("precision_requested") == (asked if asked != ran else None)
