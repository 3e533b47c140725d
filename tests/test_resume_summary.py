"""train_summary.json of a resumed run covers the whole run: ``bad_records`` (per dataset file) and ``seconds`` go on
from the checkpoint's (``seconds_this_segment`` is the last segment alone), as ``moe_load_share`` does; a checkpoint
written before it kept them still resumes, and the summary says from which step they count."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from test_train_messages import fresh_accelerate_state, run_stage1, stage_options, write_jsonl  # noqa: F401
from tinygpt.train.interrupt import TrainingInterrupted


def summary_of(out: Path) -> dict:
    return json.loads((out / "stage1" / "train_summary.json").read_text())["summary"]


def interrupted_in_step(opts: list[str], monkeypatch, step: int = 3) -> None:
    """The run stopped by Ctrl-C in its third step (or `step`; one micro-batch per step), after the checkpoints of
    steps 1 and 2."""
    from tinygpt.train import loop

    real, calls = loop.compute_loss, []

    def ctrl_c_in_that_step(model, batch, model_cfg):
        calls.append(1)
        if len(calls) == step:
            raise KeyboardInterrupt
        return real(model, batch, model_cfg)

    monkeypatch.setattr(loop, "compute_loss", ctrl_c_in_that_step)
    with pytest.raises(TrainingInterrupted):
        run_stage1(opts)
    monkeypatch.setattr(loop, "compute_loss", real)


def test_a_resumed_run_s_summary_covers_the_whole_run(tmp_path, base_model, monkeypatch, caplog):
    """4 steps of a file whose every 4th image is missing: straight, and stopped in step 3 then resumed (the same
    samples in the same order): the same bad-record counts, the records of the file counted once."""
    data = write_jsonl(tmp_path / "data", 24, missing_every=4)

    def opts(name: str, *extra: str) -> list[str]:
        return stage_options(tmp_path / name, base_model, data, steps=4, data__max_bad_fraction=0.5,
                             data__num_workers=0, run__save_every=1) + list(extra)

    run_stage1(opts("straight"))
    straight = summary_of(tmp_path / "straight" / "out")
    assert straight["seconds"] == straight["seconds_this_segment"] > 0
    images = straight["bad_records"]["mine"][1]
    assert images["what"] == "images" and images["bad"] > 0

    interrupted_in_step(opts("resumed"), monkeypatch)
    old = tmp_path / "old" / "out" / "stage1-checkpoints"
    shutil.copytree(tmp_path / "resumed" / "out" / "stage1-checkpoints", old)
    run_stage1(opts("resumed", "run.resume=auto"))
    resumed = summary_of(tmp_path / "resumed" / "out")
    assert resumed["start_step"] == 2
    assert resumed["bad_records"] == straight["bad_records"]
    assert resumed["seconds"] > resumed["seconds_this_segment"] > 0
    assert not any(key.endswith("_from_step") for key in resumed)

    # a checkpoint written before the totals were kept: they count from its step, as the log and the summary say
    state_file = old / "checkpoints" / "step_00000002" / "state.json"
    state = json.loads(state_file.read_text())
    assert state["bad_records"]["mine"][0]["what"] == "images"  # the records of the file are counted at every start
    del state["seconds"], state["bad_records"]
    state_file.write_text(json.dumps(state))
    with caplog.at_level(logging.WARNING, logger="tinygpt.train"):
        run_stage1(opts("old", "run.resume=auto"))
    since = summary_of(tmp_path / "old" / "out")
    assert since["seconds_from_step"] == since["bad_records_from_step"] == 2
    assert since["seconds"] == since["seconds_this_segment"]
    records, images_since = since["bad_records"]["mine"]
    assert records == straight["bad_records"]["mine"][0]
    assert images_since["seen"] < images["seen"]
    assert (f"{state_file.parent} holds no seconds or bad_records (written by an older tinygpt): the summary's count "
            "only the steps after step 2") in caplog.messages
