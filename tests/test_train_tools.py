"""Q-Former feature cache (same loss as from pixels, trains as a dataset kind), mixing and optimizer groups, bench."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tinygpt.config import load_config

REPO = Path(__file__).resolve().parents[1]
STAGE3 = REPO / "train_configs" / "tiny" / "stage3.yaml"


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


@pytest.fixture(scope="module")
def align_root(tmp_path_factory) -> Path:
    """A small cc_sbu_align folder: filter_cap.json + image/{id}.jpg."""
    root = tmp_path_factory.mktemp("align")
    (root / "image").mkdir()
    rng = np.random.default_rng(0)
    annotations = []
    for i in range(1, 9):
        pixels = rng.integers(0, 255, size=(40, 56, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "image" / f"{i}.jpg")
        annotations.append({"image_id": str(i), "caption": f"picture number {i} with some noise."})
    (root / "filter_cap.json").write_text(json.dumps({"annotations": annotations}))
    return root


def stage3_options(align_root: Path, base_model: Path, out: Path) -> list[str]:
    return [f"data.datasets.cc_sbu_align.params.root={align_root}", f"model.init_from={base_model}",
            f"run.output_dir={out}", "data.datasets.cc_sbu_align.batch_size=2", "schedule.total_steps=2",
            "schedule.warmup_steps=1", "run.progress=false", "run.resume=false", "model.lora.dropout=0.0"]


def test_cached_features_give_the_same_loss_and_train(align_root, base_model, tmp_path):
    from tinygpt.data.collate import collate_batch, collate_features
    from tinygpt.data.formats.qformer_features import FeatureDataset
    from tinygpt.model import load_vlm
    from tinygpt.train.features import write_features
    from tinygpt.train.loop import compute_loss
    from tinygpt.train.stage import build_datasets, run_stage

    cfg = load_config(STAGE3, stage3_options(align_root, base_model, tmp_path / "unused"))
    dataset = build_datasets(cfg, 112)[0].dataset
    model = load_vlm(base_model)
    cache = write_features(model, dataset, tmp_path / "cache", "cc_sbu_align", str(base_model), batch_size=3,
                           shard_size=5, progress=False)
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["samples"] == 8 and len(manifest["shards"]) == 2
    cached = FeatureDataset(str(cache))
    assert len(cached) == 8
    with torch.no_grad():
        pixels = collate_batch([dataset[i] for i in (6, 1)])
        features = collate_features([cached[i] for i in (6, 1)])
        assert features["turns"] == pixels["turns"] and features["image_counts"] == [1, 1]
        torch.testing.assert_close(features["image_features"], model.qformer_features(pixels["images"]),
                                   atol=1e-5, rtol=1e-5)
        loss_pixels = compute_loss(model, pixels, cfg.model)
        loss_cached = compute_loss(model, features, cfg.model)
    torch.testing.assert_close(loss_cached, loss_pixels, atol=1e-5, rtol=1e-5)

    opts = stage3_options(align_root, base_model, tmp_path / "out")
    opts += ["data.datasets.cc_sbu_align.kind=qformer_features", f"data.datasets.cc_sbu_align.params={{root: {cache}}}"]
    out = run_stage(load_config(STAGE3, opts))
    summary = json.loads((out / "train_summary.json").read_text())["summary"]
    assert summary["counts"] == {"cc_sbu_align": 2} and summary["last_loss"] > 0


def test_mixing_follows_ratios_and_splits_slots_across_processes():
    from tinygpt.train.mixing import draw_table

    table = draw_table([115, 14], seed=42, total_steps=20000, slots=1)
    share = (table == 0).mean()
    assert abs(share - 115 / 129) < 0.01
    assert np.array_equal(table, draw_table([115, 14], seed=42, total_steps=20000, slots=1))
    assert not np.array_equal(table, draw_table([115, 14], seed=43, total_steps=20000, slots=1))
    # 2 slots per step: the table is the same whether 1 process accumulates 2 micro-batches or 2 processes run 1
    assert draw_table([1, 1, 2], seed=0, total_steps=50, slots=2).shape == (50, 2)


def test_a_stream_without_one_readable_sample_is_a_user_error():
    """A finite stream (resampled: false) whose every shard is unreadable ends at once, pass after pass: one
    UserError naming the dataset, not a StopIteration out of the training loop."""
    import torch

    from tinygpt.errors import UserError
    from tinygpt.train.mixing import DataMixer, MixEntry

    class Empty(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(())

        def set_epoch(self, epoch):  # as WebDatasetPairs
            pass

    mixer = DataMixer([MixEntry(name="laion", dataset=Empty(), batch_size=2, ratio=1.0)], seed=0, total_steps=3,
                      world_size=1, rank=0, grad_accum_steps=1, num_workers=0, collate=list)
    mixer.start(0)
    with pytest.raises(UserError, match="dataset laion: a whole pass over its shards gave no readable sample"):
        mixer.next_batch(0, 0)


def test_map_style_draws_cover_each_epoch_once():
    from tinygpt.train.mixing import MixEntry, _DrawBatches

    entry = MixEntry(name="d", dataset=list(range(10)), batch_size=3, ratio=1.0)
    table = np.zeros((9, 1), dtype=np.int32)  # always dataset 0: 3 batches per epoch (drop_last)
    batches = list(_DrawBatches(entry, 0, table, 0, [0], seed=1))
    assert [b[0][0] for b in batches] == [0, 0, 0, 1, 1, 1, 2, 2, 2]  # epochs
    for epoch in range(3):
        indices = [i for b in batches[3 * epoch:3 * epoch + 3] for _, i in b]
        assert len(set(indices)) == 9
    resumed = list(_DrawBatches(entry, 0, table, 4, [0], seed=1))
    assert resumed == batches[4:]
    rank0 = list(_DrawBatches(entry, 0, np.zeros((4, 2), dtype=np.int32), 0, [0], seed=1))
    rank1 = list(_DrawBatches(entry, 0, np.zeros((4, 2), dtype=np.int32), 0, [1], seed=1))
    assert [x for pair in zip(rank0, rank1) for x in pair] == batches[:8]


def test_weight_decay_groups_match_the_original_rule(tiny_vlm):
    from tinygpt.config.schema import OptimSection
    from tinygpt.model.trainable import apply_trainable_set
    from tinygpt.train.optim import build_optimizer, decays

    model = tiny_vlm(lora={})
    apply_trainable_set(model, "lora")
    optimizer = build_optimizer(model, OptimSection(), lr=1e-4)
    named = {id(p): n for n, p in model.named_parameters()}
    decayed = {named[id(p)] for p in optimizer.param_groups[0]["params"]}
    plain = {named[id(p)] for p in optimizer.param_groups[1]["params"]}
    assert optimizer.param_groups[0]["weight_decay"] == 0.05 and optimizer.param_groups[1]["weight_decay"] == 0.0
    assert "proj1.weight" in decayed and "proj1.bias" in plain
    assert any(".lora_A." in n for n in decayed)
    assert all("norm" in n or n.endswith("bias") for n in plain)
    assert not decays("language_model.model.final_layernorm.weight", torch.zeros(4))


def test_a_resume_trains_on_with_this_runs_optimizer_settings():
    """Loading optimizer.pt used to put the checkpoint's weight decay, betas, eps and fused back into the optimizer
    the resumed run built from its config: a resume warned "optim.weight_decay: 0.05 -> 5.0" and then trained with
    0.05, bit for bit. The moments and step counts come from the checkpoint, the settings from this run."""
    from types import SimpleNamespace

    from torch import nn

    from tinygpt.config.schema import OptimSection
    from tinygpt.train.optim import build_optimizer
    from tinygpt.train.sharded import load_optimizer_state

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    before = build_optimizer(model, OptimSection(weight_decay=0.05), lr=1e-3)
    model(torch.randn(2, 4)).sum().backward()
    before.step()
    saved = before.state_dict()
    after = build_optimizer(model, OptimSection(weight_decay=5.0, betas=[0.8, 0.95], eps=1e-6), lr=1e-3)
    load_optimizer_state(SimpleNamespace(distributed_type=SimpleNamespace(name="NO")), model, after, saved)
    assert [(g["weight_decay"], g["betas"], g["eps"]) for g in after.param_groups] == [
        (5.0, (0.8, 0.95), 1e-6), (0.0, (0.8, 0.95), 1e-6)]
    weight = model[0].weight
    assert torch.equal(after.state[weight]["exp_avg"], before.state[weight]["exp_avg"])
    assert float(after.state[weight]["step"]) == 1.0


def test_bench_reports_step_time_memory_and_cache_ratio(capsys):
    from tinygpt.train.bench import main

    code = main(["--cfg-path", str(STAGE3), "--steps", "1", "--random-weights", "--json", "--text-tokens", "12",
                 "--options", "data.datasets.cc_sbu_align.batch_size=2", "model.max_txt_len=16"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["batch_size"] == 2 and result["image_size"] == 112 and result["text_tokens"] == 12
    assert result["seconds_per_step"] > 0 and result["peak_memory_gb"] > 0
    assert result["cached_features_step_ratio"] > 0  # a measured ratio of one step each: no bound on a busy host


def test_bench_refuses_an_answer_longer_than_max_txt_len(capsys):
    from tinygpt.train.bench import main

    code = main(["--cfg-path", str(STAGE3), "--random-weights", "--text-tokens", "17",
                 "--options", "model.max_txt_len=16"])
    assert code == 2
    assert "--text-tokens must be in 1..16 (model.max_txt_len of" in capsys.readouterr().err


def test_bench_flops_count_weight_gradients_only_for_trainable_llm_weights(tiny_vlm):
    from tinygpt.train.bench import model_flops_per_sample

    model = tiny_vlm()
    model.requires_grad_(False)
    frozen = model_flops_per_sample(model, text_tokens=10)
    model.language_model.requires_grad_(True)
    trainable = model_flops_per_sample(model, text_tokens=10)
    llm = sum(p.numel() for n, p in model.language_model.named_parameters() if "embed_tokens" not in n)
    tokens = 1 + model.config.num_query_tokens + 10 + 16
    assert trainable - frozen == pytest.approx(2.0 * llm * tokens)  # 6N vs 4N per token


def test_qlora_keeps_every_other_frozen_weight_in_the_compute_dtype(base_model, align_root, tmp_path):
    pytest.importorskip("bitsandbytes")
    from tinygpt.train.build import build_model

    cfg = load_config(STAGE3, stage3_options(align_root, base_model, tmp_path / "out") + ["model.load_in_4bit=true"])
    model = build_model(cfg, frozen_dtype=torch.bfloat16).model
    frozen = {n: p for n, p in model.named_parameters() if not p.requires_grad}
    four_bit = [n for n, p in frozen.items() if p.dtype == torch.uint8]
    assert any("mlp.fc1" in n for n in four_bit) and any("qkv.base_layer" in n for n in four_bit)
    floating = {n: p.dtype for n, p in frozen.items() if p.dtype.is_floating_point}
    assert "vision_model.embeddings.patch_embedding.weight" in floating  # the ViT, Q-Former, embeddings, lm_head...
    assert set(floating.values()) == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)


def test_qlora_trains_lora_over_4bit_frozen_weights(align_root, base_model, tmp_path):
    pytest.importorskip("bitsandbytes")
    from safetensors.torch import load_file

    from tinygpt.model import load_vlm
    from tinygpt.train.stage import run_stage

    opts = stage3_options(align_root, base_model, tmp_path / "out") + ["model.load_in_4bit=true",
                                                                      "schedule.total_steps=1"]
    out = run_stage(load_config(STAGE3, opts))
    saved = load_file(str(out / "model.safetensors"))
    assert any(".lora_B." in name for name in saved)
    assert not any(name.endswith("mlp.fc1.weight") for name in saved)  # the 4-bit base is never written back
    assert any(saved[n].abs().sum() > 0 for n in saved if ".lora_B." in n)  # LoRA B left zero-init: it trained
    model = load_vlm(out)  # full-precision base + trained deltas
    assert model.config.lora["r"] == 64


def test_a_finite_stream_reads_each_pass_whole_across_checkpoints_and_resumes_exactly(tmp_path):
    """A finite stream (resampled: false) is not restarted at checkpoints: that began a new shuffled pass each time,
    so with a checkpoint every 5 of a 20-sample pass half the samples were read twice and half never. Each pass now
    reads every sample once, and a resume from any checkpoint's state (mid-pass, or after a pass ended) reads on
    exactly as the run did."""
    import collections
    import io
    import json
    import tarfile

    from PIL import Image

    from tinygpt.data.collate import collate_batch
    from tinygpt.data.formats.webdataset_pairs import WebDatasetPairs
    from tinygpt.train.mixing import DataMixer, MixEntry

    jpeg = io.BytesIO()
    Image.new("RGB", (16, 16)).save(jpeg, format="JPEG")
    for shard in range(4):
        with tarfile.open(tmp_path / f"{shard:02d}.tar", "w") as tar:
            for k in range(5):
                caption = json.dumps({"caption": f"s{shard} n{k}"}).encode()
                for ext, data in (("jpg", jpeg.getvalue()), ("json", caption)):
                    info = tarfile.TarInfo(f"{shard}{k:03d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))

    def mixer():
        dataset = WebDatasetPairs(str(tmp_path / "{00..03}.tar"), image_size=14, seed=0, resampled=False,
                                  shuffle_buffer=4, name="w", process_text=False)
        return DataMixer([MixEntry("w", dataset, 1, 1.0)], seed=0, total_steps=50, world_size=1, rank=0,
                         grad_accum_steps=1, num_workers=0, collate=collate_batch)

    def read(m, steps, states):
        answers = []
        for step in steps:
            answers.append(m.next_batch(step, 0)[1]["turns"][0][0]["assistant"])
            if step % 5 == 4:  # save_every 5: the loop checkpoints, then restarts the streams
                states[step + 1] = json.loads(json.dumps(m.state()))
                m.restart_streams(step + 1)
        return answers

    run, states = mixer(), {}
    run.start(0)
    answers = read(run, range(50), states)
    for first in (0, 20, 40):  # passes 1, 2, 3 (the third half read)
        passed = collections.Counter(answers[first:first + 20])
        assert len(passed) == min(20, 50 - first) and set(passed.values()) == {1}
    assert answers[:20] != answers[20:40]  # each pass its own order
    for step in (15, 25, 35):  # mid-pass, and 5 steps after a pass ended
        resumed = mixer()
        resumed.start(step, states[step])
        assert read(resumed, range(step, 50), {}) == answers[step:], step


def test_gradient_accumulation_is_refused_under_deepspeed():
    """accelerate's DeepSpeed backward steps the engine at every micro-batch the loop does not mark (it marks none),
    so grad_accum_steps 2 would silently step twice per step: refused with the key, before any model loads."""
    from types import SimpleNamespace

    from tinygpt.errors import UserError
    from tinygpt.train.loop import check_deepspeed

    deepspeed = SimpleNamespace(distributed_type=SimpleNamespace(name="DEEPSPEED"))
    with pytest.raises(UserError, match=r"^--options: run.grad_accum_steps: 2 is not supported under DeepSpeed"):
        check_deepspeed(load_config(STAGE3, ["run.grad_accum_steps=2"]), deepspeed)
    check_deepspeed(load_config(STAGE3, ["run.grad_accum_steps=1"]), deepspeed)
    check_deepspeed(load_config(STAGE3, ["run.grad_accum_steps=2"]),
                    SimpleNamespace(distributed_type=SimpleNamespace(name="MULTI_GPU")))
