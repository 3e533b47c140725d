"""The shipped FSDP config on a machine without a GPU: the documented command (``accelerate launch --config_file
train_configs/accelerate/fsdp.yaml train.py --cfg-path ...``) trains FSDP on the CPU processes, with no extra flag.
accelerate refuses the config's ``fsdp_sync_module_states`` on a CPU (a traceback before this fix) and would otherwise
set the launch up as plain data parallel; ``tinygpt.train.sharded`` turns the one off and the other into FSDP. The
checkpoint and the stage output gather their full state dicts through torch.distributed.checkpoint's API, so no
"FSDP.state_dict_type() ... deprecated" FutureWarning is printed (twice per process and save before)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import test_train
from tinygpt.config.schema import RunSection

fresh_accelerate_state, synthetic = test_train.fresh_accelerate_state, test_train.synthetic  # shared fixtures
REPO = Path(__file__).resolve().parents[1]
FSDP_YAML = REPO / "train_configs" / "accelerate" / "fsdp.yaml"


def test_an_fsdp_launch_without_a_gpu_turns_sync_module_states_off(monkeypatch, caplog):
    """What ``accelerate launch --config_file fsdp.yaml`` puts in the environment, on a CPU: the accelerator is made
    (accelerate raised "FSDP parameter initialization with `sync_module_states=True` is not supported on cpu")."""
    from tinygpt.train.loop import make_accelerator

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_SYNC_MODULE_STATES", "true")
    monkeypatch.delenv("FSDP_CPU_RAM_EFFICIENT_LOADING", raising=False)  # restored after the test
    monkeypatch.delenv("RANK", raising=False)
    with caplog.at_level("INFO", logger="tinygpt.train"):
        accelerator = make_accelerator(RunSection(output_dir="unused", precision="fp32", cpu=True))
    assert accelerator.device.type == "cpu"
    assert os.environ["FSDP_SYNC_MODULE_STATES"] == "false"
    assert ("FSDP on the CPU: fsdp_sync_module_states turned off (accelerate allows it only on a GPU; every process "
            "loads the same initial weights)") in caplog.text


@pytest.mark.slow
def test_the_shipped_fsdp_config_trains_fsdp_on_two_cpu_processes(synthetic, base_model, tmp_path):
    opts = [f"vars.data_root={synthetic}", f"vars.output_root={tmp_path}", f"model.init_from={base_model}",
            "schedule.total_steps=2", "schedule.warmup_steps=1", "run.progress=false", "run.resume=false",
            "run.save_every=1", "model.max_txt_len=24", "data.datasets.cc_sbu_align.batch_size=2"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    command = [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file", str(FSDP_YAML),
               "--num_processes", "2", "--main_process_port", "29563", str(REPO / "train.py"),
               "--cfg-path", str(REPO / "train_configs" / "tiny" / "stage3.yaml"), "--options", *opts]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr and "FutureWarning" not in proc.stderr
    assert (tmp_path / "stage3-checkpoints" / "checkpoints" / "step_00000001" / "optimizer.pt").is_file()
    summary = json.loads((tmp_path / "stage3" / "train_summary.json").read_text())["summary"]
    assert summary["processes"] == 2 and summary["distributed_type"] == "FSDP"
