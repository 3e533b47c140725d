"""Resume fixes, settings and ownership: every setting that changes a resumed run's result is in the fingerprint
(precision, packing, max_txt_len, init_from, LoRA, MoE, prompt template, end symbol, attention, 4-bit loading, each
dataset's kind; with a stream among the datasets also num_workers
and save_every), a checkpoint whose fingerprint predates them still resumes without a warning, a fresh start keeps
the earlier run's checkpoints until its own first one is written, and a run that shares another's
run.checkpoint_dir is told whose lock it meets."""

from __future__ import annotations

import logging
import os
import re

import pytest

from test_resume_fixes_runs import check_main
from test_run_guard import STAGE1, _cfg, _checkpoint
from test_write_safety import copy_run, stage_options, synthetic, train_main, trained  # noqa: F401  (fixtures)
from tinygpt.config import load_config
from tinygpt.errors import UserError
from tinygpt.train.run_guard import ADDED_LATER, changed_settings, check_resume, run_fingerprint, run_lock

STAGE4 = STAGE1.with_name("stage4.yaml")  # map-style datasets only: no stream


# ------------------------------------------------------------------ 1: what the fingerprint holds
def test_settings_that_change_the_result_are_named(tmp_path):
    before = run_fingerprint(_cfg(tmp_path))
    after = run_fingerprint(_cfg(tmp_path, "run.precision=bf16", "run.packing.enabled=true", "model.max_txt_len=48",
                                 "model.init_from=/models/other", "data.datasets.laion.kind=generic_jsonl",
                                 "data.num_workers=5", "run.save_every=7"))
    assert changed_settings(before, after) == [
        "run.precision: 'fp32' -> 'bf16'", "run.packing.enabled: False -> True", "model.max_txt_len: 32 -> 48",
        "model.init_from: 'builtin:tiny' -> '/models/other'", "run.packing.tokens_per_row: None -> 2048",
        "data.num_workers: 0 -> 5", "run.save_every: 100 -> 7",
        "data.datasets.laion.kind: 'webdataset_pairs' -> 'generic_jsonl'"]


def test_the_model_settings_that_change_the_result_are_named(tmp_path):
    """LoRA, MoE, the prompt template, the end symbol, the attention kind and 4-bit loading change what the remaining
    steps compute: a resume with another value warns (they were missing from the fingerprint); a checkpoint from
    before they joined it (it has run.precision, not model.end_sym) is not told they changed."""
    stage2 = STAGE1.with_name("stage2.yaml")

    def fingerprint(*extra):
        return run_fingerprint(load_config(stage2, [f"run.output_dir={tmp_path / 'out'}", *extra]))

    before = fingerprint()
    assert changed_settings(before, fingerprint(
        "model.lora.alpha=64", "model.lora.dropout=0.0", 'model.prompt_template="[INST] {} [/INST]"',
        'model.end_sym="###"', "model.attention=mmca", "model.load_in_4bit=true")) == [
        "model.end_sym: '\\n' -> '###'", "model.prompt_template: '{}' -> '[INST] {} [/INST]'",
        "model.attention: None -> 'mmca'", "model.load_in_4bit: False -> True", "model.lora.alpha: 16.0 -> 64.0",
        "model.lora.dropout: 0.05 -> 0.0"]
    assert changed_settings(before, fingerprint("model.lora=null", "model.trainable=stage1")) == [
        "model.lora.r: 64 -> None", "model.lora.alpha: 16.0 -> None", "model.lora.dropout: 0.05 -> None",
        "model.lora.target_modules: ['qkv', 'dense'] -> None"]
    earlier = {key: value for key, value in before.items() if not key.startswith(("model.end_sym", "model.prompt",
                                                                                   "model.attention", "model.load",
                                                                                   "model.lora", "model.moe"))}
    assert "run.precision" in earlier and changed_settings(earlier, fingerprint("model.lora.alpha=64")) == []


def test_workers_and_save_every_count_only_with_a_stream(tmp_path):
    def fingerprint(*extra):
        return run_fingerprint(load_config(STAGE4, [f"run.output_dir={tmp_path / 'out'}", *extra]))

    assert changed_settings(fingerprint(), fingerprint("data.num_workers=5", "run.save_every=7")) == []


def test_a_checkpoint_from_before_the_new_settings_resumes_without_a_warning(tmp_path):
    now = run_fingerprint(_cfg(tmp_path))
    old = {key: value for key, value in now.items()
           if not (key.startswith(ADDED_LATER) or re.fullmatch(r"data\.datasets\.\w+\.kind", key))}
    assert len(old) < len(now) and changed_settings(old, now) == []
    assert changed_settings(old, run_fingerprint(_cfg(tmp_path, "data.datasets.cc_sbu=null"))) == [
        "data.datasets.cc_sbu.batch_size: 16 -> None", "data.datasets.cc_sbu.sample_ratio: 14.0 -> None"]
    found = _checkpoint(tmp_path, 100, fingerprint=old)  # a finished run: any setting named changed would refuse it
    assert check_resume(_cfg(tmp_path, "run.resume=auto")) == found


# ------------------------------------------------------------------ 2: a fresh start keeps the old checkpoints
def test_a_fresh_start_removes_the_old_checkpoints_only_with_its_first(trained, synthetic, base_model,  # noqa: F811
                                                                      tmp_path, monkeypatch, caplog):
    from tinygpt.train import checkpoint as ckpt

    root = copy_run(trained, tmp_path / "run")
    folder = root / "stage1-checkpoints" / "checkpoints"
    seen, save = [], ckpt.save_checkpoint

    def spy(*args, **kwargs):
        seen.append(sorted(p.name for p in folder.iterdir()))
        return save(*args, **kwargs)

    monkeypatch.setattr(ckpt, "save_checkpoint", spy)
    opts = stage_options(synthetic, root, base_model, 1, run__save_every=1, run__keep_last=2, run__resume="false")
    line = (f"starting fresh: 2 checkpoints of an earlier run in {folder} are kept until this run writes its first "
            "checkpoint, then removed")
    caplog.set_level(logging.WARNING, logger="tinygpt.train")
    assert check_main(opts) == 0  # --check says it too
    assert caplog.messages == [line]
    caplog.clear()
    assert train_main(opts) == 0
    assert seen == [["step_00000002", "step_00000003"]]  # still there as the first new checkpoint is written
    assert sorted(p.name for p in folder.iterdir()) == ["step_00000001"]  # then gone; keep_last kept the new one
    assert line in caplog.messages


# ------------------------------------------------------------------ 3: a shared run.checkpoint_dir
def test_a_shared_checkpoint_dir_names_the_lock_and_its_holder(tmp_path):
    shared = f"run.checkpoint_dir={tmp_path / 'shared'}"
    first = _cfg(tmp_path, shared)
    second = load_config(STAGE1, [f"run.output_dir={tmp_path / 'other'}", shared])
    lock = tmp_path / "shared" / "run.lock"
    with run_lock(first):
        assert lock.read_text().splitlines() == [str(os.getpid()), str(tmp_path / "out")]
        with pytest.raises(UserError) as info:
            with run_lock(second):
                pass
    assert str(info.value) == (
        f"--options: run.checkpoint_dir: another run (process {os.getpid()}, training into {tmp_path / 'out'}) "
        f"holds {lock}: it shares this run's checkpoint directory {tmp_path / 'shared'} (this run trains into "
        f"{tmp_path / 'other'}); wait for it, or give this run its own run.checkpoint_dir")
    with run_lock(second):  # released when the first run ends
        pass
