"""Training on the tiny model, CPU: the four tiny stages chain, freezing is exact, kill-and-resume is bit-identical,
non-finite losses are skipped and stop the run, and two processes match one process with the same global batch."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from tinygpt.config import load_config
from tinygpt.errors import UserError

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "train_configs" / "tiny"
PYTHON = sys.executable


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


@pytest.fixture(scope="module")
def synthetic(tiny_synthetic_data) -> Path:
    return tiny_synthetic_data  # conftest: generated once for the session


def options(stage: int, synthetic: Path, out: Path, steps: int = 2, batch: int = 2, **extra) -> list[str]:
    """Tiny stage overrides for a fast test: small batches, a few steps, no progress bar."""
    cfg = load_config(TINY / f"stage{stage}.yaml")
    opts = [f"vars.data_root={synthetic}", f"vars.output_root={out}", f"schedule.total_steps={steps}",
            "schedule.warmup_steps=1", "run.progress=false", "run.resume=false", "model.max_txt_len=24"]
    opts += [f"data.datasets.{name}.batch_size={batch}" for name in cfg.active_datasets()]
    opts += [f"{key.replace('__', '.')}={value}" for key, value in extra.items()]
    return opts


def run(stage: int, opts: list[str]) -> Path:
    from tinygpt.train.stage import run_stage

    return run_stage(load_config(TINY / f"stage{stage}.yaml", opts))


def trainable_names(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.slow
def test_tiny_stages_chain_and_freeze_exactly(synthetic, base_model, tmp_path):
    from tinygpt.model import load_vlm
    from tinygpt.model.trainable import is_trainable

    out = tmp_path / "out"
    s1 = run(1, options(1, synthetic, out, model__init_from=base_model, run__save_mode="whole"))
    before, after = load_file(str(base_model / "model.safetensors")), load_file(str(s1 / "model.safetensors"))
    assert before.keys() == after.keys()
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    stage1_set = {n for n in before if is_trainable(n, "stage1")}
    assert changed == stage1_set  # every stage-1 tensor moved, every other tensor is bit-identical
    summary = json.loads((s1 / "train_summary.json").read_text())["summary"]
    assert summary["trainable_params"] == sum(before[n].numel() for n in stage1_set)
    assert sum(summary["counts"].values()) == 2

    s2 = run(2, options(2, synthetic, out))
    config2 = json.loads((s2 / "config.json").read_text())
    assert config2["base_model"] == "../stage1" and config2["lora"]["r"] == 64
    m1, m2 = load_vlm(s1), load_vlm(s2)
    state1, state2 = m1.state_dict(), m2.state_dict()
    for name, value in state2.items():
        plain = name.replace(".base_layer.", ".")
        if ".lora_" in name:
            continue
        if is_trainable(name, "lora"):
            assert not torch.equal(value, state1[plain]), name
        else:
            assert torch.equal(value, state1[plain]), name  # stage 2 started from stage 1's output

    s3 = run(3, options(3, synthetic, out))
    m3 = load_vlm(s3)
    assert (m3.config.prompt_template, m3.config.end_sym) == ("###Human: {} ###Assistant: ", "###")
    s4 = run(4, options(4, synthetic, out, batch=1, model__image_size=224))  # the real 2x resize
    m4 = load_vlm(s4)
    assert m4.config.image_size == 224 and m4.config.prompt_template == "[INST] {} [/INST]"
    assert m4.vision_model.embeddings.position_embedding.shape[1] == 1 + 16 * 16
    # still trainable-only over stage 3's 112-px model: loading redoes the position-embedding resize
    assert json.loads((s4 / "train_summary.json").read_text())["save_mode"] == "trainable_only"
    assert json.loads((s4 / "config.json").read_text())["base_model"] == "../stage3"


KILL_SCRIPT = textwrap.dedent("""
    import json, os, signal, sys
    from tinygpt.config import load_config
    from tinygpt.train import checkpoint, stage
    path, opts, kill_at = json.loads(sys.argv[1])
    real_save = checkpoint.save_checkpoint
    def save_then_die(accelerator, model, optimizer, step, *args, **kwargs):
        out = real_save(accelerator, model, optimizer, step, *args, **kwargs)
        if step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return out
    checkpoint.save_checkpoint = save_then_die
    stage.run_stage(load_config(path, opts))
""")


@pytest.mark.slow
def test_kill_and_resume_is_bit_identical(synthetic, base_model, tmp_path):
    """Stage 2 (LoRA dropout, a streaming and a map-style dataset): 5 steps straight vs killed right after the
    checkpoint of step 4 (streams restarted at steps 2 and 4), then resumed."""
    mix = ["data.datasets.align.kind=cc_sbu_align", "data.datasets.align.batch_size=2",
           f"data.datasets.align.params.root={synthetic}/cc_sbu_align", "run.save_every=2",
           f"model.init_from={base_model}"]
    straight = options(2, synthetic, tmp_path / "a", steps=5) + mix
    out_a = run(2, straight)

    killed = options(2, synthetic, tmp_path / "b", steps=5) + mix
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([PYTHON, "-c", KILL_SCRIPT, json.dumps([str(TINY / "stage2.yaml"), killed, 4])],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    checkpoints = sorted(p.name for p in (tmp_path / "b" / "stage2-checkpoints" / "checkpoints").iterdir())
    assert checkpoints == ["step_00000002", "step_00000004"]
    assert not (tmp_path / "b" / "stage2").exists()

    out_b = run(2, killed[:-len(mix)] + mix + ["run.resume=auto"])
    summary = json.loads((out_b / "train_summary.json").read_text())["summary"]
    assert summary["start_step"] == 4
    a, b = load_file(str(out_a / "model.safetensors")), load_file(str(out_b / "model.safetensors"))
    assert a.keys() == b.keys() and any(".lora_A." in n for n in a)
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_nonfinite_loss_is_skipped_and_counted(synthetic, base_model, tmp_path, monkeypatch):
    from tinygpt.train import loop

    real, calls = loop.compute_loss, []

    def nan_on_second_call(model, batch, model_cfg):
        calls.append(1)
        loss = real(model, batch, model_cfg)
        return loss * float("nan") if len(calls) == 2 else loss

    monkeypatch.setattr(loop, "compute_loss", nan_on_second_call)
    out = run(1, options(1, synthetic, tmp_path, steps=4, model__init_from=base_model))
    summary = json.loads((out / "train_summary.json").read_text())["summary"]
    assert summary["skipped_steps"] == 1 and len(calls) == 4
    weights = load_file(str(out / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in weights.values())


class SteppingInBackward:
    """A CPU accelerator that acts as accelerate does under DeepSpeed (grad_accum_steps 1): backward() steps the
    optimizer (the engine's step) and clears the gradients; the loop's own optimizer.step() then has nothing to do."""

    def __init__(self, real):
        self._real, self.distributed_type, self.optimizer = real, SimpleNamespace(name="DEEPSPEED"), None

    def __getattr__(self, name):
        return getattr(self._real, name)

    def prepare(self, model, optimizer):
        model, self.optimizer = self._real.prepare(model, optimizer)
        return model, self.optimizer

    def backward(self, loss):
        self._real.backward(loss)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def test_nonfinite_loss_is_skipped_when_the_engine_steps_inside_backward(synthetic, base_model, tmp_path,
                                                                         monkeypatch):
    """Under DeepSpeed the engine steps inside backward, before the loop's check: the loss is checked first."""
    from tinygpt.train import loop, stage

    real_loss, real_accelerator, calls = loop.compute_loss, stage.make_accelerator, []

    def nan_on_second_call(model, batch, model_cfg):
        calls.append(1)
        loss = real_loss(model, batch, model_cfg)
        return loss * float("nan") if len(calls) == 2 else loss

    monkeypatch.setattr(loop, "compute_loss", nan_on_second_call)
    monkeypatch.setattr(stage, "make_accelerator", lambda run, where="": SteppingInBackward(real_accelerator(run)))
    out = run(1, options(1, synthetic, tmp_path, steps=3, model__init_from=base_model))
    summary = json.loads((out / "train_summary.json").read_text())["summary"]
    assert summary["skipped_steps"] == 1 and len(calls) == 3
    weights = load_file(str(out / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in weights.values())


def test_nonfinite_losses_in_a_row_stop_with_last_good_checkpoint(synthetic, base_model, tmp_path, monkeypatch):
    from tinygpt.train import loop

    real, calls = loop.compute_loss, []

    def nan_from_third_call(model, batch, model_cfg):
        calls.append(1)
        loss = real(model, batch, model_cfg)
        return loss * float("nan") if len(calls) >= 3 else loss

    monkeypatch.setattr(loop, "compute_loss", nan_from_third_call)
    opts = options(1, synthetic, tmp_path, steps=8, model__init_from=base_model, run__save_every=2,
                   run__max_nonfinite=3)
    with pytest.raises(loop.TrainingStopped) as info:
        run(1, opts)
    last = tmp_path / "stage1-checkpoints" / "checkpoints" / "step_00000002"
    assert "training stopped at step 5: 3 non-finite losses in a row" in str(info.value)
    assert str(last) in str(info.value)
    weights = load_file(str(last / "trainable.safetensors"))
    assert all(torch.isfinite(t).all() for t in weights.values())
    assert not (tmp_path / "stage1").exists()


def test_bad_dataset_param_and_kind_name_file_and_key(synthetic, base_model, tmp_path):
    opts = options(3, synthetic, tmp_path, model__init_from=base_model)
    with pytest.raises(UserError) as info:
        run(3, opts + ["data.datasets.cc_sbu_align.params.rot=x"])
    assert str(info.value).startswith("--options: data.datasets.cc_sbu_align.params.rot: unknown param")
    assert "'root'" in str(info.value)
    with pytest.raises(UserError, match=r"stage3.yaml: data.datasets.cc_sbu_align.params.root: .* does not exist"):
        run(3, opts + ["vars.data_root=/nonexistent"])
    with pytest.raises(UserError, match=r"--options: data.datasets.cc_sbu_align.kind: .*did you mean 'cc_sbu_align'"):
        run(3, opts + ["data.datasets.cc_sbu_align.kind=cc_sbu_algn"])


@pytest.mark.slow
def test_two_processes_match_one_process_with_the_same_global_batch(synthetic, base_model, tmp_path):
    """2 processes x batch 2 (gloo) vs 1 process x batch 2 x accumulation 2: the same 4 samples per step in the same
    slots (mixing.py), the same mean of two micro-batch gradients. Dropout is off so nothing random differs; what
    remains is float summation order (all-reduce vs accumulation), ~1e-7 relative, which Adam's normalised steps
    (each at most ~lr = 3e-4) keep far below the 1e-5 tolerance after 3 steps."""
    common = [f"model.init_from={base_model}", "model.lora.dropout=0.0", "run.save_every=0"]
    one = run(3, options(3, synthetic, tmp_path / "one", steps=3) + common + ["run.grad_accum_steps=2"])
    two_opts = options(3, synthetic, tmp_path / "two", steps=3) + common
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([str(Path(PYTHON).parent / "torchrun"), "--nproc_per_node", "2", "--master_port", "29531",
                           str(REPO / "train.py"), "--quiet", "--cfg-path", str(TINY / "stage3.yaml"),
                           "--options", *two_opts], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = tmp_path / "two" / "stage3"
    summary = json.loads((two / "train_summary.json").read_text())["summary"]
    assert summary["processes"] == 2
    a, b = load_file(str(one / "model.safetensors")), load_file(str(two / "model.safetensors"))
    assert a.keys() == b.keys()
    start = load_file(str(base_model / "model.safetensors"))
    moved = 0.0
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-5, rtol=0)
        if name in start:
            moved = max(moved, (a[name] - start[name]).abs().max().item())
    assert moved > 1e-4  # the runs did train: the match is not between two untouched models
