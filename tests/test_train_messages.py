"""What a user reads about training: the non-finite stop advises only what is not in effect yet, the progress bar says
that steps are skipped instead of repeating an old loss, a config conflict names where each value came from, and the
end-of-run summary counts the bad records of all DataLoader workers together (which also judge the 1% limit
together)."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from tinygpt.config import load_config
from tinygpt.data.bad_records import BadRecordCounter, BadRecordPolicy
from tinygpt.errors import UserError

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "train_configs" / "tiny"


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


def write_jsonl(folder: Path, records: int, missing_every: int = 0) -> Path:
    """A generic_jsonl file of ``records`` one-image captions; every ``missing_every``-th image is not written."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(records):
        if not (missing_every and i % missing_every == 0):
            Image.new("RGB", (16, 16), (10 * i % 256, 40, 90)).save(folder / f"{i}.png")
        lines.append(json.dumps({"images": [f"{i}.png"],
                                 "conversations": [{"user": "<image>", "assistant": f"shape {i}"}]}))
    path = folder / "train.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def stage_options(tmp_path: Path, base_model: Path, data: Path, steps: int, **extra) -> list[str]:
    """Tiny stage 1 on one generic_jsonl dataset in tmp_path (no data/ or outputs/ of the checkout)."""
    mine = f"{{kind: generic_jsonl, sample_ratio: 1, batch_size: 2, params: {{path: {data}}}}}"
    opts = [f"model.init_from={base_model}", f"vars.output_root={tmp_path / 'out'}", "data.datasets.laion=null",
            "data.datasets.cc_sbu=null", f"data.datasets.mine={mine}", f"schedule.total_steps={steps}",
            "schedule.warmup_steps=1", "run.progress=false", "run.resume=false", "run.save_every=0",
            "model.max_txt_len=24"]
    return opts + [f"{key.replace('__', '.')}={value}" for key, value in extra.items()]


def run_stage1(opts: list[str]) -> Path:
    from tinygpt.train.stage import run_stage

    return run_stage(load_config(TINY / "stage1.yaml", opts))


# ---- 1. the non-finite stop advises only what is not in effect -------------------------------------------------

def test_nonfinite_stop_leaves_out_advice_already_in_effect(tmp_path, base_model, monkeypatch):
    from tinygpt.train import loop

    real = loop.compute_loss
    monkeypatch.setattr(loop, "compute_loss", lambda *args: real(*args) * float("nan"))
    data = write_jsonl(tmp_path / "data", 8)
    opts = stage_options(tmp_path, base_model, data, steps=4, optim__max_grad_norm=1.0, run__precision="fp32",
                         run__max_nonfinite=2)
    with pytest.raises(loop.TrainingStopped) as info:
        run_stage1(opts)
    message = str(info.value)
    assert message.startswith("training stopped at step 2: 2 non-finite losses in a row; no checkpoint")
    assert message.endswith("try: lower schedule.init_lr (now 0.001)")  # tiny stage 1's init_lr
    assert "max_grad_norm" not in message and "precision" not in message


def test_nonfinite_advice_names_what_is_not_set():
    from tinygpt.train.loop import nonfinite_advice

    plain = load_config(TINY / "stage1.yaml", ["optim.max_grad_norm=null"])  # the shipped configs clip at 1.0
    assert nonfinite_advice(plain, "fp16") == ("lower schedule.init_lr (now 0.001), set optim.max_grad_norm "
                                               "(e.g. 1.0) or use run.precision bf16 or fp32")
    assert nonfinite_advice(plain, "bf16").endswith("or use run.precision fp32")
    clipped = load_config(TINY / "stage1.yaml")
    assert nonfinite_advice(clipped, "no") == "lower schedule.init_lr (now 0.001)"
    assert nonfinite_advice(clipped, "bf16") == "lower schedule.init_lr (now 0.001) or use run.precision fp32"


# ---- 2. the progress bar says that steps are skipped -------------------------------------------------------------

def test_progress_bar_shows_skipped_steps_not_a_stale_loss():
    from tinygpt.train.progress import Progress

    progress = Progress(total_steps=10, start_step=0, enabled=True, show_bar=True, device=torch.device("cpu"),
                        log_every=100)
    try:
        progress.step(0, 1.5, 1e-3, 2, {})
        assert progress.bar.postfix.startswith("loss 1.5000 lr")
        progress.step(1, None, 1e-3, 2, {})
        progress.step(2, None, 1e-3, 2, {})
        assert progress.bar.postfix.startswith("loss skipped: non-finite (2 in a row) lr")
        assert "1.5000" not in progress.bar.postfix
        progress.step(3, 2.5, 1e-3, 2, {})
        assert progress.bar.postfix.startswith("loss 2.0000 lr")  # the mean of the finite losses again
    finally:
        progress.close()


def test_progress_log_line_shows_skipped_steps(caplog):
    from tinygpt.train.progress import Progress

    progress = Progress(total_steps=6, start_step=0, enabled=True, show_bar=False, device=torch.device("cpu"),
                        log_every=2)
    with caplog.at_level(logging.INFO, logger="tinygpt.train"):
        for step, loss in enumerate([1.0, 3.0, 5.0, None, None, 7.0]):
            progress.step(step, loss, 1e-3, 2, {})
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    assert lines[0].startswith("step 2/6 loss 2.0000 lr")
    assert lines[1].startswith("step 4/6 loss skipped: non-finite (1 in a row) lr")
    assert lines[2].startswith("step 6/6 loss 6.0000 (1 skipped since the last line) lr")  # mean of 5 and 7


# ---- 3. a conflict between two keys names where each came from ---------------------------------------------------

def test_total_steps_from_options_against_warmup_from_the_file_blames_options():
    stage3 = os.path.abspath(TINY / "stage3.yaml")
    with pytest.raises(UserError) as info:
        load_config(TINY / "stage3.yaml", ["schedule.total_steps=2"])
    assert str(info.value) == ("--options: schedule.total_steps: 2 is below warmup_steps 5 (the warm-up must fit in "
                               f"the run); schedule.warmup_steps comes from {stage3}")
    with pytest.raises(UserError) as info:
        load_config(TINY / "stage3.yaml", ["schedule.init_lr=1e-5"])
    assert str(info.value).startswith("--options: schedule.init_lr: 1e-05 is below min_lr 0.0001")
    assert str(info.value).endswith(f"; schedule.min_lr comes from {stage3}")


def test_conflict_between_two_files_names_both(tmp_path):
    top = tmp_path / "top.yaml"
    top.write_text(f"extends: [{os.path.relpath(TINY / 'stage3.yaml', tmp_path)}]\nschedule:\n  total_steps: 3\n")
    with pytest.raises(UserError) as info:
        load_config(top)
    assert str(info.value) == (f"{os.path.abspath(TINY / 'stage3.yaml')}: schedule.warmup_steps: must be in "
                               f"[0, total_steps=3]; schedule.total_steps comes from {top}")
    with pytest.raises(UserError) as info:  # both on the command line: one place, named once
        load_config(top, ["schedule.total_steps=2", "schedule.warmup_steps=3"])
    assert str(info.value) == "--options: schedule.warmup_steps: must be in [0, total_steps=2]"


# ---- 4. bad records: counted over all workers, judged together, summed up at the end ---------------------------

SHARED_COUNTS = """
import multiprocessing, sys
from tinygpt.data.bad_records import BadRecordCounter

if __name__ == "__main__":
    multiprocessing.set_start_method(sys.argv[1])  # the start method DataLoader workers then use
    counter = BadRecordCounter("data.jsonl")
    counter.ok()
    workers = [multiprocessing.Process(target=counter.ok) for _ in range(2)]
    workers.append(multiprocessing.Process(target=counter.skip, args=("data.jsonl:3", "no image")))
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    print((counter.seen, counter.bad))
"""


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_bad_record_counts_are_shared_by_worker_processes(tmp_path, method):
    """The counts live in shared memory made before the workers start: forked workers inherit them, spawned ones get
    them with the pickled dataset; either way the main process reads what every worker added."""
    script = tmp_path / "shared_counts.py"
    script.write_text(SHARED_COUNTS)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, str(script), method], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "(4, 1)"


def test_bad_record_limit_judges_all_workers_together():
    """Worker A reads 60 samples, 8 bad (13%, too few to judge: 10 / 10% = 100 samples); worker B then reads 40, 4 bad
    (10%, not over the limit either). Together they are 100 with 12 bad: over the limit, and B stops."""
    counter = BadRecordCounter("shards/{0..9}.tar", BadRecordPolicy(max_bad_fraction=0.1, min_records=5), "samples")

    def read(count: int, bad_every: int) -> None:
        for i in range(1, count + 1):
            counter.skip(f"x:{i}", "broken") if i % bad_every == 0 else counter.ok()
            counter.check_running()

    worker_a = multiprocessing.get_context("fork").Process(target=read, args=(60, 7))
    worker_a.start()
    worker_a.join()
    assert worker_a.exitcode == 0 and (counter.seen, counter.bad) == (60, 8)
    with pytest.raises(UserError, match=r"shards/\{0\.\.9\}\.tar: 12 of 100 samples are bad \(12\.0% > limit 10\.0%\)"):
        read(40, 10)


def test_dataloader_workers_add_to_the_counts_the_main_process_reads(tmp_path):
    from torch.utils.data import DataLoader

    from tinygpt.data.collate import collate_batch
    from tinygpt.data.formats.generic_jsonl import GenericJsonl

    dataset = GenericJsonl(str(write_jsonl(tmp_path, 8, missing_every=4)), image_size=14, seed=0,
                           bad_records=BadRecordPolicy(max_bad_fraction=0.5))
    batches = list(DataLoader(dataset, batch_size=2, num_workers=2, collate_fn=collate_batch))
    assert sum(len(b["turns"]) for b in batches) == 8
    # worker 0 reads indices 0-1 and 4-5: it skips the missing images 0 and 4 (reading 1 and 5 instead); worker 1
    # reads 2-3 and 6-7. The main process, which read nothing, sees both workers' counts.
    assert (dataset.image_counter.seen, dataset.image_counter.bad) == (10, 2)


def test_run_summary_lists_bad_records_of_all_workers(tmp_path, base_model, caplog):
    data = write_jsonl(tmp_path / "data", 24, missing_every=4)
    opts = stage_options(tmp_path, base_model, data, steps=3, data__num_workers=2, data__max_bad_fraction=0.5)
    with caplog.at_level(logging.INFO, logger="tinygpt.train"):
        out = run_stage1(opts)
    bad = json.loads((out / "train_summary.json").read_text())["summary"]["bad_records"]
    records, images = bad["mine"]
    assert records == {"source": str(data), "what": "records", "bad": 0, "seen": 24}
    assert images["what"] == "images" and images["seen"] >= 6 + images["bad"] and images["bad"] >= 1
    summary = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("trained steps"))
    share = f"{images['bad'] / images['seen']:.1%}"
    assert (f"bad records per dataset file (all data workers of this process; bad of seen):\n  mine: {data}: "
            f"records 0 of 24, images {images['bad']} of {images['seen']} ({share})") in summary
