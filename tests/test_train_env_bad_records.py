"""Bad records over several training processes: the 1% limit and the end-of-run totals count every process's share
(the loop hands each process the others' counts between steps), while a whole file that every process parsed at
construction is counted once. Before, each process judged and reported only its own share."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

import test_train_messages
from tinygpt.data.bad_records import BadRecordCounter, BadRecordPolicy, bad_record_totals, share_counts
from tinygpt.errors import UserError

REPO = Path(__file__).resolve().parents[1]
write_jsonl, stage_options = test_train_messages.write_jsonl, test_train_messages.stage_options


class Data:
    """What a map-style dataset holds: a counter of the file's records (judged whole at construction) and one of the
    images decoded while training."""

    def __init__(self) -> None:
        policy = BadRecordPolicy(max_bad_fraction=0.1, min_records=5)
        self.records = BadRecordCounter("data.jsonl", policy, "records")
        self.images = BadRecordCounter("data.jsonl", policy, "images")


def all_reduce_sum(values: list[int]) -> list[int]:
    import torch

    tensor = torch.tensor(values, dtype=torch.int64)
    dist.all_reduce(tensor)
    return tensor.tolist()


def one_process(rank: int, port: int, out: str) -> None:
    """Each process parses the same 50 records and decodes 60 images, 8 bad (13%: too few alone to judge, which
    takes 10 / 10% = 100); together 120 images, 16 bad, and one more bad image stops either process."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        data = Data()
        for i in range(50):
            data.records.ok()
        data.records.check_final()
        for i in range(1, 61):
            data.images.skip(f"data.jsonl:{i}", "missing image") if i % 7 == 0 else data.images.ok()
            data.images.check_running()
        share_counts({"mine": data}, all_reduce_sum)
        result = {"totals": bad_record_totals({"mine": data}), "own": data.images.counts()}
        data.images.skip("data.jsonl:61", "missing image")
        try:
            data.images.check_running()
        except UserError as exc:
            result["stopped"] = str(exc)
        Path(out, f"{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_processes_judge_and_total_their_bad_records_together(tmp_path):
    mp.spawn(one_process, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        result = json.loads((tmp_path / f"{rank}.json").read_text())
        assert result["own"] == [60, 8]
        records, images = result["totals"]["mine"]
        assert records == {"source": "data.jsonl", "what": "records", "bad": 0, "seen": 50}  # not 100: one file
        assert images == {"source": "data.jsonl", "what": "images", "bad": 16, "seen": 120}
        assert result["stopped"].startswith("data.jsonl: 17 of 121 images (all training processes) are bad "
                                            "(14.0% > limit 10.0%); first: data.jsonl:7: skipped bad record")


def test_one_process_alone_keeps_its_message():
    data = Data()
    for i in range(1, 101):
        data.images.skip(f"x:{i}", "broken") if i % 5 == 0 else data.images.ok()
    with pytest.raises(UserError, match=r"^data\.jsonl: 20 of 100 images are bad \(20\.0% > limit 10\.0%\)"):
        data.images.check_running()


@pytest.mark.slow
def test_the_run_summary_counts_the_bad_records_of_both_processes(tmp_path, base_model):
    """torchrun, 2 processes x 3 steps x 2 samples of a file whose every 4th image is missing: the summary counts the
    24 records once and the images both processes decoded (12 good ones and the missing ones they skipped)."""
    data = write_jsonl(tmp_path / "data", 24, missing_every=4)
    opts = stage_options(tmp_path, base_model, data, steps=3, data__max_bad_fraction=0.5, data__num_workers=0)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", "2",
                           "--master_port", str(free_port()), str(REPO / "train.py"),
                           "--cfg-path", str(REPO / "train_configs" / "tiny" / "stage1.yaml"), "--options", *opts],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((tmp_path / "out" / "stage1" / "train_summary.json").read_text())["summary"]
    records, images = summary["bad_records"]["mine"]
    assert records == {"source": str(data), "what": "records", "bad": 0, "seen": 24}
    assert images["seen"] - images["bad"] == 12 and images["bad"] >= 2
    assert (f"bad records per dataset file (all 2 processes and their data workers; bad of seen):\n  mine: {data}: "
            f"records 0 of 24, images {images['bad']} of {images['seen']}") in proc.stderr
