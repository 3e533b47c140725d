"""Ctrl-C in a run of two processes (gloo, as torchrun starts them): the line saying where a rerun resumes is printed
once, by the main process; both exit 130."""

from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path

import torch.multiprocessing as mp

from test_train_env_bad_records import free_port
from test_train_messages import stage_options, write_jsonl

REPO = Path(__file__).resolve().parents[1]


def interrupted_process(rank: int, port: int, opts: list[str], out: str) -> None:
    """One process of the launch: train.py's main with Ctrl-C while the model loads (after the accelerator joined
    the two processes); its exit code and stderr go to ``out/<rank>.json``."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", OMP_NUM_THREADS="1")
    import train
    from tinygpt.train import stage

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    stage.build_model = ctrl_c
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = train.main(["--quiet", "--cfg-path", str(REPO / "train_configs" / "tiny" / "stage1.yaml"),
                           "--options", *opts])
    Path(out, f"{rank}.json").write_text(json.dumps({"code": code, "err": err.getvalue()}))


def test_only_the_main_process_says_where_a_rerun_resumes(tmp_path, base_model):
    data = write_jsonl(tmp_path / "data", 8)
    opts = stage_options(tmp_path, base_model, data, steps=2, run__resume="auto")
    mp.spawn(interrupted_process, args=(free_port(), opts, str(tmp_path)), nprocs=2, join=True)
    main, other = (json.loads((tmp_path / f"{rank}.json").read_text()) for rank in (0, 1))
    assert main["code"] == other["code"] == 130
    said = [[line for line in run["err"].splitlines() if "interrupted" in line] for run in (main, other)]
    assert said == [["interrupted; no checkpoint yet: a rerun starts at step 0"], []]
