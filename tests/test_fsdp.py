"""The shipped FSDP config (train_configs/accelerate/fsdp.yaml) on 2 CPU processes (gloo), launched with the documented
command (``accelerate launch --config_file train_configs/accelerate/fsdp.yaml train.py --cfg-path ... --options ...``):
a tiny stage trains with no traceback or warning, writes full-shape checkpoints and output, matches one process with
the same global batch, and resumes bit-identically.

On a CPU accelerate would set the launch up as plain data parallel (MULTI_CPU) and refuse the config's
``sync_module_states``; tinygpt's own switch (tinygpt.train.sharded: cpu_fsdp_launch, fsdp_on_cpu) makes the same
launch, with no extra flag, train FSDP on the CPU processes, so everything here (accelerate's FSDP wrapping, the loop,
checkpoints, the stage output) runs the code a GPU launch runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import test_train
from tinygpt.config import load_config

fresh_accelerate_state, synthetic = test_train.fresh_accelerate_state, test_train.synthetic  # shared fixtures
REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "train_configs" / "tiny" / "stage3.yaml"
FSDP_YAML = REPO / "train_configs" / "accelerate" / "fsdp.yaml"
PYTHON = sys.executable

def options(synthetic: Path, out: Path, base_model: Path, *extra: str) -> list[str]:
    """Tiny stage 3, 3 steps of 2 samples per process, a checkpoint at step 2, no dropout (nothing random differs
    between the runs compared)."""
    return [f"vars.data_root={synthetic}", f"vars.output_root={out}", f"model.init_from={base_model}",
            "schedule.total_steps=3", "schedule.warmup_steps=1", "run.progress=false", "run.resume=false",
            "model.max_txt_len=24", "data.datasets.cc_sbu_align.batch_size=2", "model.lora.dropout=0.0",
            "run.save_every=2", "run.keep_last=5", *extra]


def launch_fsdp(opts: list[str], port: int) -> subprocess.CompletedProcess:
    """The documented FSDP command, on 2 processes; it must finish cleanly: no traceback, and no FutureWarning (the
    checkpoint and the stage output gather full state dicts through torch.distributed.checkpoint's API, where
    ``FSDP.state_dict_type()`` printed a deprecation warning twice per process and save)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    command = [str(Path(PYTHON).parent / "accelerate"), "launch", "--config_file", str(FSDP_YAML),
               "--num_processes", "2", "--main_process_port", str(port), str(REPO / "train.py"),
               "--cfg-path", str(CONFIG), "--options", *opts]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr and "FutureWarning" not in proc.stderr, proc.stderr[-4000:]
    return proc


def checkpoint(root: Path, step: int) -> Path:
    return root / "stage3-checkpoints" / "checkpoints" / f"step_{step:08d}"


@pytest.mark.slow
def test_fsdp_matches_one_process_and_resumes(synthetic, base_model, tmp_path):
    """2 FSDP processes x batch 2 vs 1 process x batch 2 x accumulation 2: the same 4 samples per step in the same
    slots (mixing.py), the same mean gradient. What differs is float summation order: FSDP reduce-scatters (sums the
    two processes' flat gradients, then divides) where one process accumulates, and its clipping norm adds per-shard
    squares; each is ~1e-7 relative, and Adam's normalised steps (each at most ~lr = 3e-4) keep the weights after
    3 steps within 1e-6 (measured: 8e-8), while the runs move weights by > 1e-4. Clipping each process's shard by
    its own norm instead of the global one (what accelerate does unless handed all parameters) lands at 1.1e-5."""
    from tinygpt.train.stage import run_stage

    one = run_stage(load_config(CONFIG, options(synthetic, tmp_path / "one", base_model, "run.grad_accum_steps=2")))
    launch_fsdp(options(synthetic, tmp_path / "two", base_model), 29541)
    two = tmp_path / "two" / "stage3"
    summary = json.loads((two / "train_summary.json").read_text())["summary"]
    assert summary["processes"] == 2 and summary["distributed_type"] == "FSDP"

    a, b = load_file(str(one / "model.safetensors")), load_file(str(two / "model.safetensors"))
    assert a.keys() == b.keys() and any(".lora_A." in n for n in a)  # plain names, no FSDP prefixes
    start = load_file(str(base_model / "model.safetensors"))
    moved = 0.0
    for name in a:
        assert a[name].shape == b[name].shape, name  # full tensors, not one process's flat shard
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=0)
        if name in start:
            moved = max(moved, (a[name] - start[name]).abs().max().item())
    assert moved > 1e-4  # the runs did train: the match is not between two untouched models

    ckpt_one = load_file(str(checkpoint(tmp_path / "one", 2) / "trainable.safetensors"))
    ckpt_two = load_file(str(checkpoint(tmp_path / "two", 2) / "trainable.safetensors"))
    assert ckpt_one.keys() == ckpt_two.keys()
    for name in ckpt_one:
        torch.testing.assert_close(ckpt_one[name], ckpt_two[name], atol=1e-6, rtol=0)
    optim = torch.load(checkpoint(tmp_path / "two", 2) / "optimizer.pt", weights_only=True)
    lora = next(n for n in optim["state"] if ".lora_A." in n)  # gathered, keyed by parameter name
    assert optim["state"][lora]["exp_avg"].shape == ckpt_two[lora].shape

    # resume the FSDP run from its step-2 checkpoint: step 3 again, bit for bit
    resumed = options(synthetic, tmp_path / "three", base_model, f"run.resume={checkpoint(tmp_path / 'two', 2)}")
    launch_fsdp(resumed, 29542)
    three = tmp_path / "three" / "stage3"
    assert json.loads((three / "train_summary.json").read_text())["summary"]["start_step"] == 2
    c = load_file(str(three / "model.safetensors"))
    for name in b:
        assert torch.equal(b[name], c[name]), name
