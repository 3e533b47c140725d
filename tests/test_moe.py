"""MoE-tuning: the routed FFN, sparse upcycling, the model.moe config section, the moe trainable set and stage 5."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch

from tinygpt.config import load_config
from tinygpt.errors import UserError
from tinygpt.model import TinyGPTPhiForCausalLM, build_config
from tinygpt.model.moe import MoEFeedForward, moe_modules, resolve_layers, upcycle
from test_train import fresh_accelerate_state, synthetic  # noqa: F401  (fixtures shared with the stage tests)

ROOT = Path(__file__).resolve().parents[1]
STAGE5 = ROOT / "train_configs" / "stage5_moe.yaml"
TINY_STAGE5 = ROOT / "train_configs" / "tiny" / "stage5_moe.yaml"


def tiny_phi(seed: int = 0) -> TinyGPTPhiForCausalLM:
    torch.manual_seed(seed)
    return TinyGPTPhiForCausalLM(copy.deepcopy(build_config("tiny").text_config)).eval()


def test_one_expert_top1_equals_the_dense_model():
    dense = tiny_phi()
    moe = copy.deepcopy(dense)
    upcycle(moe, {"num_experts": 1, "top_k": 1, "aux_loss_weight": 0.01}, seed=3)
    ids = torch.randint(0, 2000, (2, 11))
    assert torch.equal(dense(ids, use_cache=False).logits, moe(ids, use_cache=False).logits)
    # each layer's balancing term is E * f * P = 1 * 1 * 1: the loss is the dense loss + 4 layers x the weight
    dense_loss = dense(ids, labels=ids, use_cache=False).loss
    assert moe(ids, labels=ids, use_cache=False).loss.item() == pytest.approx(dense_loss.item() + 0.04, abs=1e-6)


def test_one_expert_top1_trains_exactly_like_the_dense_ffn():
    """The dense row of experiments/twin_moe.py: training a one-expert, top-1 MoE layer (trainable set ``moe``, the
    Switch loss on, training-mode capacity) is training that layer's dense fc1/fc2 with the same AdamW: the router gets
    a zero gradient (the softmax over one expert is 1 whatever its logit) and the balancing term is a constant."""
    from tinygpt.config.schema import OptimSection
    from tinygpt.train.optim import build_optimizer

    dense = tiny_phi().train()
    moe = copy.deepcopy(dense)
    upcycle(moe, {"num_experts": 1, "top_k": 1, "layers": [1], "capacity_factor": 1.5}, seed=3)
    for model, trained in ((dense, ".1.mlp.fc"), (moe, ".1.mlp.")):
        for name, p in model.named_parameters():
            p.requires_grad_(trained in name)
    optimizers = [build_optimizer(m, OptimSection(), lr=1e-3) for m in (dense, moe)]
    ids = torch.randint(0, 2000, (2, 11))
    for _ in range(3):
        for model, optimizer in zip((dense, moe), optimizers):
            torch.manual_seed(0)  # the same dropout masks
            model(ids, labels=ids, use_cache=False).loss.backward()
        block = moe.model.layers[1].mlp
        assert torch.count_nonzero(block.router.weight.grad) == 0
        for name in ("fc1", "fc2"):
            assert torch.equal(getattr(block.experts[0], name).weight.grad,
                               getattr(dense.model.layers[1].mlp, name).weight.grad)
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad()
    for name in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"):
        assert torch.equal(block.experts[0].get_parameter(name), dense.model.layers[1].mlp.get_parameter(name))
    assert not torch.equal(block.experts[0].fc1.weight, tiny_phi().model.layers[1].mlp.fc1.weight)  # it trained


def test_routed_ffn_matches_a_direct_per_token_formula():
    dense = tiny_phi()
    upcycle(dense, {"num_experts": 4, "top_k": 2, "layers": [2]}, seed=0)
    block = dense.model.layers[2].mlp
    with torch.no_grad():  # distinct experts, so a wrong expert or gate shows
        for expert in block.experts:
            expert.fc2.weight.add_(0.05 * torch.randn_like(expert.fc2.weight))
        block.router.weight.normal_(0, 0.5)
    x = torch.randn(3, 5, 256)
    got = block(x)
    want = torch.zeros_like(x)
    for b in range(3):
        for t in range(5):
            probs = torch.softmax(block.router.weight @ x[b, t], -1)
            top = probs.topk(2)
            gates = top.values / top.values.sum()
            for gate, e in zip(gates, top.indices):
                want[b, t] += gate * block.experts[int(e)](x[b, t])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    counts = block.last_counts
    assert counts.sum().item() == 3 * 5 * 2 and counts.shape == (4,)


def test_balancing_loss_is_switch_formula_and_capacity_drops_only_in_training():
    model = tiny_phi()
    upcycle(model, {"num_experts": 2, "top_k": 1, "layers": [0], "capacity_factor": 0.5}, seed=0)
    block = model.model.layers[0].mlp
    with torch.no_grad():
        block.router.weight.zero_()
        block.router.weight[0, 0] = 10.0  # tokens with x[0] > 0 go to expert 0
    x = torch.randn(1, 16, 256)
    x[0, :12, 0] = 1.0
    x[0, 12:, 0] = -1.0
    eval_out = block(x)
    probs = torch.softmax(x[0] @ block.router.weight.T, -1)
    share = torch.tensor([12 / 16, 4 / 16])
    want_aux = 0.01 * 2 * (share * probs.mean(0)).sum()
    assert block.last_aux_loss.item() == pytest.approx(want_aux.item(), rel=1e-5)
    assert block.last_counts.tolist() == [12, 4]
    block.train()
    train_out = block(x)
    cap = math.ceil(0.5 * 16 * 1 / 2)  # 4 slots per expert: tokens 4..11 of expert 0 are dropped
    assert torch.count_nonzero(eval_out[0, cap:12]) > 0
    torch.testing.assert_close(train_out[0, :cap], eval_out[0, :cap])  # kept (other matmul sizes: float rounding)
    assert torch.count_nonzero(train_out[0, cap:12]) == 0
    torch.testing.assert_close(train_out[0, 12:], eval_out[0, 12:])


def test_upcycling_copies_the_ffn_and_seeds_the_router():
    dense = tiny_phi()
    a, b, c = (copy.deepcopy(dense) for _ in range(3))
    assert upcycle(a, {"layers": "alternate"}, seed=5) == [1, 3]
    upcycle(b, {"layers": "alternate"}, seed=5)
    upcycle(c, {"layers": "alternate"}, seed=6)
    block = a.model.layers[1].mlp
    assert isinstance(block, MoEFeedForward) and not isinstance(a.model.layers[0].mlp, MoEFeedForward)
    for expert in block.experts:
        assert torch.equal(expert.fc1.weight, dense.model.layers[1].mlp.fc1.weight)
        assert torch.equal(expert.fc2.bias, dense.model.layers[1].mlp.fc2.bias)
    assert torch.equal(block.router.weight, b.model.layers[1].mlp.router.weight)
    assert not torch.equal(block.router.weight, c.model.layers[1].mlp.router.weight)
    assert 0.01 < block.router.weight.std().item() < 0.03
    assert [i for i, _ in moe_modules(a)] == [1, 3]
    with pytest.raises(UserError, match="already has MoE"):
        upcycle(a, {}, seed=0)


def test_layer_patterns_and_out_of_range_indices():
    assert resolve_layers("all", 4) == [0, 1, 2, 3]
    assert resolve_layers("alternate", 32) == list(range(1, 32, 2))
    assert resolve_layers([3, 1], 4) == [1, 3]
    with pytest.raises(UserError, match=r"model.moe.layers: layer indices \[7\] are outside the model's 0..3"):
        resolve_layers([1, 7], 4)


@pytest.mark.parametrize("option, message", [
    ("model.moe.top_k=5", r"model.moe.top_k: must be in \[1, num_experts=4\], got 5"),
    ("model.moe.layers=every", r"model.moe.layers: 'every' is not one of all, alternate"),
    ("model.moe.capacity_factor=0", "model.moe.capacity_factor: must be > 0 or null"),
    ("model.trainable=lora", "model.trainable: model.moe is set, so the stage trains the router and experts"),
    ("model.moe=null", "model.trainable: trainable set 'moe' needs MoE settings"),
])
def test_config_mistakes_name_the_file_and_key(option, message):
    with pytest.raises(UserError, match=message) as info:
        load_config(TINY_STAGE5, [option])
    assert "--options" in str(info.value) or "stage5_moe.yaml" in str(info.value)


def test_dense_configs_are_unchanged_by_the_option():
    cfg = load_config(ROOT / "train_configs" / "tiny" / "stage4.yaml")
    assert cfg.model.moe is None
    text = build_config("tiny").text_config
    assert text.moe is None and "moe" not in text.to_dict()


def full_size_meta_model(moe: dict | None, lora: dict | None = None):
    from tinygpt.model import TinyGPTVForConditionalGeneration
    from tinygpt.model.moe import moe_settings

    config = build_config("tinygptv", lora=lora)
    if moe is not None:
        config.text_config.moe = moe_settings(moe, config.text_config.num_hidden_layers)
    with torch.device("meta"):
        return TinyGPTVForConditionalGeneration(config)


def test_full_size_stage5_trainable_set_and_sizes_on_meta_device():
    from tinygpt.model.trainable import apply_trainable_set, check_trainable

    stage = load_config(STAGE5)
    moe = dataclasses_dict(stage.model.moe)
    model = full_size_meta_model(moe, lora={})
    assert apply_trainable_set(model, "moe") == 839_106_560 == check_trainable(model, "moe")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(".mlp.router." in n or ".mlp.experts." in n for n in trainable)
    assert len([n for n in trainable if n.endswith("router.weight")]) == 4
    llm = sum(p.numel() for n, p in model.named_parameters() if n.startswith("language_model."))
    assert llm == 2_779_776_000 + 31_457_280 + 3 * 4 * 52_441_600 + 4 * 4 * 2560  # + LoRA, 3 more experts, routers
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    assert frozen == 3_706_219_520  # ViT 985,952,256 + Q-Former 105,137,664 + queries, proj, the rest of the LLM
    # every layer MoE, as MoE-LLaVA: 8x the trainable parameters
    assert apply_trainable_set(full_size_meta_model(dict(moe, layers="all"), lora={}), "moe") == 6_712_852_480


def dataclasses_dict(settings) -> dict:
    import dataclasses

    return dataclasses.asdict(settings)


# ---- the tiny stage 5: trains, logs the load, resumes bit-identically, saves a directory that reloads -------------

@pytest.fixture(scope="module")
def stage4_like(tmp_path_factory):
    """A tiny dense model with stage 4's LoRA (non-zero deltas), saved whole: the stand-in for a stage-4 output."""
    from tinygpt.model import TinyGPTVForConditionalGeneration, save_vlm
    from tinygpt.tokenizer import load_tokenizer

    torch.manual_seed(0)
    model = TinyGPTVForConditionalGeneration(build_config("tiny", lora={}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 0.02)
    model.tokenizer = load_tokenizer(None)
    return save_vlm(model, tmp_path_factory.mktemp("stage4") / "stage4")


def probe_logits(model) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        inputs = model.prepare_inputs([[{"user": "what shape is red?", "assistant": "a circle"}]], [0])
        embeds = model.language_model.get_input_embeddings()(inputs.input_ids)
        return model.language_model(inputs_embeds=embeds, attention_mask=inputs.attention_mask).logits


@pytest.mark.slow
def test_tiny_moe_stage_trains_logs_resumes_and_reloads(synthetic, stage4_like, tmp_path, monkeypatch,  # noqa: F811
                                                        caplog):
    import json
    import logging
    import os
    import signal
    import subprocess

    from safetensors.torch import load_file
    from test_train import KILL_SCRIPT, PYTHON, REPO, options, run

    from tinygpt.model import load_vlm
    from tinygpt.train import stage as stage_module

    saved = {}
    real_save = stage_module.save_output

    def save_and_probe(cfg, model, *args, **kwargs):
        saved["logits"] = probe_logits(model)
        return real_save(cfg, model, *args, **kwargs)

    monkeypatch.setattr(stage_module, "save_output", save_and_probe)
    extra = [f"model.init_from={stage4_like}", "run.save_every=2", "run.log_every=2"]
    with caplog.at_level(logging.INFO, logger="tinygpt.train"):
        out_a = run("5_moe", options("5_moe", synthetic, tmp_path / "a", steps=5, batch=1) + extra)
    lines = [r.getMessage() for r in caplog.records if " moe layer " in r.getMessage()]
    assert len(lines) == 3 and lines[0].startswith("step 2 moe layer 1 load ") and "| layer 3 load " in lines[0]
    assert " | aux loss 0.0" in lines[0]
    summary = json.loads((out_a / "train_summary.json").read_text())["summary"]
    assert summary["trainable_params"] == 2 * 4 * (2 * 256 * 1024 + 1024 + 256 + 256)
    assert set(summary["moe_load_share"]) == {"1", "3"}
    for share in summary["moe_load_share"].values():
        assert sum(share) == pytest.approx(1.0, abs=1e-3) and len(share) == 4

    # trainable-only output over the dense stage 4: routers and experts only; it reloads to the same logits
    tensors = load_file(str(out_a / "model.safetensors"))
    assert tensors and all(".mlp.router." in n or ".mlp.experts." in n for n in tensors)
    reloaded = load_vlm(out_a)
    assert reloaded.config.text_config.moe["layers"] == [1, 3] and reloaded.config.lora is not None
    assert torch.equal(probe_logits(reloaded), saved["logits"])
    before = load_vlm(stage4_like)
    assert not torch.equal(probe_logits(before), saved["logits"])  # the experts trained
    lm_a, lm_0 = reloaded.language_model.model.layers, before.language_model.model.layers
    assert torch.equal(lm_a[0].mlp.fc1.weight, lm_0[0].mlp.fc1.weight)  # dense layers untouched
    assert torch.equal(lm_a[1].self_attn.qkv.lora_B.default.weight, lm_0[1].self_attn.qkv.lora_B.default.weight)

    # killed right after the checkpoint of step 4, then resumed: the same weights, bit for bit
    killed = options("5_moe", synthetic, tmp_path / "b", steps=5, batch=1) + extra
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([PYTHON, "-c", KILL_SCRIPT, json.dumps([str(TINY_STAGE5), killed, 4])],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    out_b = run("5_moe", killed + ["run.resume=auto"])
    assert json.loads((out_b / "train_summary.json").read_text())["summary"]["start_step"] == 4
    b = load_file(str(out_b / "model.safetensors"))
    assert tensors.keys() == b.keys()
    for name in tensors:
        assert torch.equal(tensors[name], b[name]), name


def test_moe_model_with_kv_cache_gives_the_full_forward_logits():
    model = tiny_phi()
    upcycle(model, {"num_experts": 4, "top_k": 2, "layers": "alternate"}, seed=0)
    with torch.no_grad():
        for _, block in moe_modules(model):
            block.router.weight.normal_(0, 0.5)
    ids = torch.randint(0, 2000, (2, 9))
    full = model(ids, use_cache=False).logits
    first = model(ids[:, :6], use_cache=True)
    rest = model(ids[:, 6:], cache=first.cache, use_cache=True).logits
    torch.testing.assert_close(torch.cat([first.logits, rest], 1), full, rtol=1e-5, atol=1e-5)
