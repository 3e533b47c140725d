"""The MoE stage's whole-run expert load (``moe_load_share`` of the train summary) survives a resume: the counts go
into each checkpoint's state.json and a resume continues them; an older checkpoint without them still resumes, and the
log and the summary say that the shares cover only the steps since the resume."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from tinygpt.config import load_config
from tinygpt.errors import UserError
from tinygpt.model import TinyGPTVForConditionalGeneration, build_config, save_vlm
from tinygpt.model.moe import upcycle
from tinygpt.train.moe_log import MoELoad

STAGE5 = Path(__file__).resolve().parents[1] / "train_configs" / "tiny" / "stage5_moe.yaml"


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


def moe_model():
    model = TinyGPTVForConditionalGeneration(build_config("tiny"))
    upcycle(model.language_model, {"num_experts": 4, "top_k": 2, "layers": "alternate"}, seed=0)
    return model


def test_counts_round_trip_through_state():
    model = moe_model()
    first = MoELoad(model)
    for i, block in first.modules:
        block.last_counts, block.last_aux_loss = torch.tensor([3, 1, 0, 4]) * (i + 1), torch.tensor(0.01)
    first.add()
    resumed = MoELoad(model)
    resumed.resume(json.loads(json.dumps(first.state())), Path("ckpt"), step=2)
    assert resumed.summary() == first.summary() and "moe_load_share_from_step" not in resumed.summary()
    assert first.state() == {"1": [6, 2, 0, 8], "3": [12, 4, 0, 16]}


def test_a_checkpoint_without_counts_resumes_and_says_so(caplog):
    load = MoELoad(moe_model())
    with caplog.at_level(logging.WARNING, logger="tinygpt.train"):
        load.resume(None, Path("old/step_00000002"), step=2)
    assert load.summary()["moe_load_share_from_step"] == 2
    assert [r.getMessage() for r in caplog.records] == [
        "old/step_00000002 holds no MoE load counts (written by an older tinygpt): the summary's moe_load_share "
        "covers only the steps after step 2"]


@pytest.mark.parametrize("saved", [{"1": [1, 2, 3, 4]}, {"1": [1, 2, 3], "3": [1, 2, 3, 4]},
                                   {"1": [1, 2, 3, 4], "3": ["x", 2, 3, 4]}, [1, 2]])
def test_counts_of_another_model_are_refused(saved):
    with pytest.raises(UserError, match=r"^ckpt/state\.json: moe_load does not match this model's MoE layers"):
        MoELoad(moe_model()).resume(saved, Path("ckpt"), step=2)


@pytest.mark.slow
def test_the_summary_share_covers_the_whole_run_after_a_resume(tmp_path, caplog, tiny_synthetic_data):
    from tinygpt.tokenizer import load_tokenizer
    from tinygpt.train.stage import run_stage

    data = tiny_synthetic_data
    torch.manual_seed(0)
    dense = TinyGPTVForConditionalGeneration(build_config("tiny", lora={}))
    dense.tokenizer = load_tokenizer(None)
    stage4 = save_vlm(dense, tmp_path / "stage4")
    cfg = load_config(STAGE5, [f"vars.data_root={data}", f"vars.output_root={tmp_path}"])
    opts = [f"vars.data_root={data}", f"vars.output_root={tmp_path}", f"model.init_from={stage4}",
            "schedule.total_steps=4", "schedule.warmup_steps=1", "run.save_every=2", "run.log_every=2",
            "run.progress=false", "model.max_txt_len=24", "run.resume=false"]
    opts += [f"data.datasets.{name}.batch_size=1" for name in cfg.active_datasets()]

    def summary(*extra: str) -> dict:
        out = run_stage(load_config(STAGE5, opts + list(extra)))
        return json.loads((out / "train_summary.json").read_text())["summary"]

    whole = summary()
    step2 = tmp_path / "stage5_moe-checkpoints" / "checkpoints" / "step_00000002"
    state = json.loads((step2 / "state.json").read_text())
    assert set(state["moe_load"]) == {"1", "3"} and all(sum(c) > 0 for c in state["moe_load"].values())

    resumed = summary(f"run.resume={step2}")  # named: auto would find the finished run's step 4 and not retrain
    assert resumed["start_step"] == 2 and resumed["moe_load_share"] == whole["moe_load_share"]
    assert "moe_load_share_from_step" not in resumed

    del state["moe_load"]  # as a checkpoint written before the counts were saved
    (step2 / "state.json").write_text(json.dumps(state))
    with caplog.at_level(logging.WARNING, logger="tinygpt.train"):
        older = summary(f"run.resume={step2}")
    assert older["start_step"] == 2 and older["moe_load_share_from_step"] == 2
    assert set(older["moe_load_share"]) == {"1", "3"}
    assert any("holds no MoE load counts" in r.getMessage() for r in caplog.records)
