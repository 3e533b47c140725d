"""Sequence packing and shape bucketing (tinygpt.model.packing, run.packing, run.pad_to_multiple): the packed layout
itself, and a packed or bucketed batch giving the loss and gradients of the same samples unpacked."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tinygpt.config import load_config
from tinygpt.errors import UserError
from tinygpt.model.packing import PackedInputs, RowLayout, pack, padding_tokens, plan_rows
from tinygpt.model.sequence import IGNORE, IMAGE_SLOT
from tinygpt.train.speed import row_layout

LORA = {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["qkv", "dense"]}
# four samples of different lengths: one image, text only, two images and two turns, one image (grounding)
TURNS = [
    [{"user": "<Img><ImageHere></Img> Describe this image.",
      "assistant": "a red circle and a blue square near the top"}],
    [{"user": "What is two plus two?", "assistant": "four"}],
    [{"user": "<ImageHere> and <ImageHere>: the same?", "assistant": "no"},
     {"user": "Which one is larger?", "assistant": "the left one, clearly"}],
    [{"user": "<Img><ImageHere></Img> Where is the circle?", "assistant": "{<10><20><30><40>}"}],
]
COUNTS = [1, 0, 2, 1]


def test_rows_are_the_fewest_consecutive_groups_and_balanced():
    assert plan_rows([50, 50, 50, 50], 100) == [[0, 1], [2, 3]]
    assert plan_rows([30, 30, 30], 1000) == [[0, 1, 2]]
    # 3 rows are needed at 100; the narrowest width that still needs 3 is 80, not one full row and a short one
    assert plan_rows([40, 40, 40, 40, 40], 100) == [[0, 1], [2, 3], [4]]
    assert plan_rows([60, 20, 20, 60], 100) == [[0, 1], [2, 3]]
    assert plan_rows([150, 10, 10], 100) == [[0], [1, 2]]  # longer than the budget: a row of its own


@pytest.fixture
def model(tiny_vlm):
    """A tiny VLM with LoRA (no dropout: nothing random), stage-2 trainable set, in training mode."""
    from tinygpt.model.trainable import apply_trainable_set

    m = tiny_vlm(lora=LORA, lora_b_std=0.02)  # a trained-like B: LoRA A's gradients are compared too
    apply_trainable_set(m, "lora")
    m.train()
    m.vision_model.eval()
    m.qformer.eval()
    return m


def test_packed_rows_keep_each_sample_in_its_own_causal_block(model):
    inputs = model.prepare_inputs(TURNS, COUNTS, max_txt_len=24)
    lengths = inputs.attention_mask.sum(1).tolist()
    assert lengths[0] + lengths[1] < lengths[2] + lengths[3]
    packed = pack(inputs, tokens_per_row=lengths[2] + lengths[3])
    assert isinstance(packed, PackedInputs) and packed.rows == [[0, 1], [2, 3]]
    width = packed.input_ids.shape[1]
    assert width == max(lengths[0] + lengths[1], lengths[2] + lengths[3])
    a, b = lengths[2], lengths[3]
    row = packed.attention_mask[1, 0]
    assert row[:a, :a].equal(torch.ones(a, a, dtype=torch.bool).tril())      # sample 2: causal in itself
    assert row[a:a + b, a:a + b].equal(torch.ones(b, b, dtype=torch.bool).tril())  # sample 3 too
    assert not row[a:a + b, :a].any() and not row[:a, a:].any()              # and neither sees the other
    assert packed.position_ids[1, :a].tolist() == list(range(a))
    assert packed.position_ids[1, a:a + b].tolist() == list(range(b))        # RoPE restarts per sample
    assert packed.input_ids[1, a:a + b].equal(inputs.input_ids[3, :b])
    assert packed.labels[1, a] == IGNORE                                      # first label: never predicted
    assert packed.labels[1, a + 1:a + b].equal(inputs.labels[3, 1:b])
    # image slots come in sample order, so the image embeddings land in their own sample's block
    slots = [int((packed.input_ids[r] == IMAGE_SLOT).sum()) for r in range(2)]
    assert slots == [32, 3 * 32]
    real, pad = padding_tokens(packed)
    assert real == sum(lengths) and pad == 2 * width - sum(lengths)
    assert padding_tokens(inputs) == (sum(lengths), 4 * max(lengths) - sum(lengths))


def test_bucketing_pads_the_width_to_a_multiple(model):
    inputs = model.prepare_inputs(TURNS, COUNTS, max_txt_len=24)
    bucketed = RowLayout(pad_to_multiple=64).apply(inputs)
    assert bucketed.input_ids.shape[1] % 64 == 0 and bucketed.input_ids.shape[1] - inputs.input_ids.shape[1] < 64
    assert bucketed.attention_mask.sum() == inputs.attention_mask.sum()
    packed = RowLayout(tokens_per_row=100, pad_to_multiple=64).apply(inputs)
    assert packed.input_ids.shape[1] % 64 == 0


def _loss_and_grads(model, layout, loss_only=True):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    pixels = torch.randn(sum(COUNTS), 3, 112, 112, generator=torch.Generator().manual_seed(1))
    loss = model(turns=TURNS, image_counts=COUNTS, pixel_values=pixels, max_txt_len=24, loss_only=loss_only,
                 row_layout=layout).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


LAYOUTS = {"two rows": RowLayout(tokens_per_row=100), "one row": RowLayout(tokens_per_row=2048),
           "budget below every sample": RowLayout(tokens_per_row=8), "bucketed": RowLayout(pad_to_multiple=64),
           "packed and bucketed": RowLayout(tokens_per_row=100, pad_to_multiple=64)}


def test_packed_batch_gives_the_unpacked_loss_and_gradients(model):
    """Same tokens, same supervised positions, same mean: only float summation order differs (row widths change how
    the fp32 matrix products and the softmax sums are blocked). Each such sum of n terms is exact to about n x 6e-8;
    over a few hundred terms and 4 layers that stays below 1e-5 of the largest gradient entry (measured: at most
    8e-7), while one sample seeing another (a wrong mask) or a wrong position moves gradients by percent."""
    loss0, grads0 = _loss_and_grads(model, None)
    assert any(".lora_A." in n for n in grads0) and "proj1.weight" in grads0
    for label, layout in LAYOUTS.items():
        loss, grads = _loss_and_grads(model, layout)
        assert grads.keys() == grads0.keys(), label
        torch.testing.assert_close(loss, loss0, rtol=1e-6, atol=0, msg=label)
        for name, grad in grads.items():
            scale = grads0[name].abs().max()
            assert scale > 0, name
            torch.testing.assert_close(grad, grads0[name], rtol=0, atol=1e-5 * float(scale), msg=f"{label}: {name}")
    loss_full, _ = _loss_and_grads(model, LAYOUTS["two rows"], loss_only=False)  # the full-logits path agrees too
    torch.testing.assert_close(loss_full, loss0, rtol=1e-6, atol=0)


def test_a_leaking_mask_would_be_caught(model, monkeypatch):
    """The tolerance above is tight enough to see one sample attending to another: a packing whose mask is plain
    causal over the whole row moves the loss far beyond it."""
    from tinygpt.model import packing

    def leaky(inputs, tokens_per_row, pad_to_multiple=1):
        packed = pack(inputs, tokens_per_row, pad_to_multiple)
        width = packed.input_ids.shape[1]
        packed.attention_mask = torch.ones(width, width, dtype=torch.bool).tril()[None, None].expand_as(
            packed.attention_mask)
        return packed

    loss0, _ = _loss_and_grads(model, None)
    monkeypatch.setattr(packing, "pack", leaky)
    loss, _ = _loss_and_grads(model, RowLayout(tokens_per_row=2048))
    assert abs(float(loss - loss0)) > 1e-3


def test_a_four_d_mask_needs_position_ids(model):
    embeds = torch.zeros(1, 4, model.config.text_config.hidden_size)
    mask = torch.ones(1, 1, 4, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match="4-D attention_mask needs position_ids"):
        model.language_model(inputs_embeds=embeds, attention_mask=mask, use_cache=False)


REPO = Path(__file__).resolve().parents[1]
STAGE3 = REPO / "train_configs" / "tiny" / "stage3.yaml"


def test_config_switches_are_on_for_full_size_stages_and_off_for_the_twin():
    """Measured on an H200 (docs/benchmarks.md, "Speed switches"): together they win on every full-size stage."""
    for n in (1, 2, 3, 4):
        full = load_config(REPO / "train_configs" / f"stage{n}.yaml")
        assert full.run.packing.enabled and full.run.pad_to_multiple == 64
        assert full.run.compile.llm and full.run.compile.vision and full.optim.fused
        tiny = load_config(REPO / "train_configs" / "tiny" / f"stage{n}.yaml")
        assert not tiny.run.packing.enabled and tiny.run.pad_to_multiple == 1 and row_layout(tiny.run) is None
        assert not tiny.run.compile.llm and not tiny.run.compile.vision and not tiny.optim.fused
    # the documented low-memory optimizer still works with the full-size default (8-bit AdamW has no fused flag)
    cfg = load_config(REPO / "train_configs" / "stage4.yaml", ["optim.name=adamw8bit"])
    assert cfg.optim.name == "adamw8bit" and cfg.optim.fused


def test_config_switches_are_validated_and_off_by_default():
    cfg = load_config(STAGE3)
    assert not cfg.run.packing.enabled and cfg.run.pad_to_multiple == 1 and row_layout(cfg.run) is None
    assert not cfg.run.compile.llm and not cfg.run.compile.vision and not cfg.optim.fused
    cfg = load_config(STAGE3, ["run.packing.enabled=true", "run.packing.tokens_per_row=512", "run.pad_to_multiple=64"])
    assert row_layout(cfg.run) == RowLayout(tokens_per_row=512, pad_to_multiple=64)
    with pytest.raises(UserError, match=r"^--options: run.packing.tokens_per_row: must be >= 1"):
        load_config(STAGE3, ["run.packing.tokens_per_row=0"])
    with pytest.raises(UserError, match=r"^--options: run.pad_to_multiple: must be >= 1"):
        load_config(STAGE3, ["run.pad_to_multiple=0"])
    with pytest.raises(UserError, match=r"^--options: unknown key 'run.packing.tokens'.*tokens_per_row"):
        load_config(STAGE3, ["run.packing.tokens=5"])
    with pytest.raises(UserError, match=r"^--options: run.packing.enabled: expected true/false"):
        load_config(STAGE3, ["run.packing.enabled=maybe"])



def test_an_moe_stage_with_a_capacity_gives_the_unpacked_loss_in_every_layout(tiny_vlm):
    """MoE layers route only real tokens: padding used to take expert slots (capacity counted over every position in
    row order), so a row's padding dropped real tokens of later rows and packing or bucketing moved the loss by ~1e-3.
    With top-2 of 4 experts and capacity factor 1.0 (tokens are dropped), every layout gives the unpacked loss and
    gradients to float rounding, the balancing loss included."""
    from tinygpt.model.moe import upcycle
    from tinygpt.model.trainable import apply_trainable_set

    m = tiny_vlm()
    upcycle(m.language_model, {"num_experts": 4, "top_k": 2, "layers": "all", "aux_loss_weight": 0.01,
                               "capacity_factor": 1.0}, seed=0)
    with torch.no_grad():  # experts and routers that differ, as trained ones do
        generator = torch.Generator().manual_seed(3)
        for name, p in m.named_parameters():
            if ".experts." in name:
                p.add_(torch.randn(p.shape, generator=generator) * 0.05)
            elif ".router." in name:
                p.normal_(0.0, 0.5, generator=generator)
    apply_trainable_set(m, "moe")
    m.train()
    m.vision_model.eval()
    m.qformer.eval()
    loss0, grads0 = _loss_and_grads(m, None)
    assert any(".router." in n for n in grads0)
    for label, layout in LAYOUTS.items():
        loss, grads = _loss_and_grads(m, layout)
        torch.testing.assert_close(loss, loss0, rtol=1e-6, atol=0, msg=label)
        for name, grad in grads.items():
            torch.testing.assert_close(grad, grads0[name], rtol=0, atol=1e-5 * float(grads0[name].abs().max()),
                                       msg=f"{label}: {name}")
