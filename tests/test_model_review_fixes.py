"""Fixes from a review of tinygpt/model: each test failed before its fix."""

from __future__ import annotations

import json

import pytest
import torch

from tinygpt.errors import UserError
from tinygpt.model import TinyGPTPhiConfig, TinyGPTPhiForCausalLM, load_vlm, save_vlm


def small_lm() -> TinyGPTPhiForCausalLM:
    config = TinyGPTPhiConfig(vocab_size=120, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                              num_attention_heads=4, rotary_dim=6, resid_pdrop=0.0, bos_token_id=0, eos_token_id=119,
                              pad_token_id=0)
    torch.manual_seed(0)
    model = TinyGPTPhiForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)  # decisive greedy choices
    return model


def test_generating_in_training_mode_with_gradient_checkpointing_keeps_the_kv_cache():
    """Checkpointing drops the cache only where a backward will replay the layers; generating (no grad) from a model
    left in training mode used to lose the past at every step and return other tokens, silently."""
    model = small_lm().eval()
    ids = torch.randint(1, 119, (1, 6), generator=torch.Generator().manual_seed(0))
    want = model.generate(ids, max_new_tokens=8, do_sample=False)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()  # resid_pdrop 0: training mode computes the same function
    assert torch.equal(model.generate(ids, max_new_tokens=8, do_sample=False), want)
    embeds = model.get_input_embeddings()(ids).detach()
    from_embeds = model.generate(inputs_embeds=embeds, attention_mask=torch.ones_like(ids), max_new_tokens=8,
                                 do_sample=False)
    assert torch.equal(from_embeds[0], want[0, ids.shape[1]:])
    with torch.no_grad():
        assert model(ids, use_cache=True).cache is not None
    assert model(ids, use_cache=True).cache is None  # with gradients the cache is still dropped (replay)


def test_vlm_generate_takes_a_single_stop_string(tiny_vlm):
    """transformers' ``stop_strings`` may be one string; it used to be split into characters, each a stop."""
    model = tiny_vlm()
    with torch.no_grad():
        model.language_model.lm_head.weight.mul_(50.0)
    turns = [[{"user": "hello there", "assistant": None}]]
    free = model.generate(turns, max_new_tokens=8, do_sample=False, stop_strings=[])
    text = model.tokenizer.decode(free[0])
    stop = text.strip()[0] + "\u2603\u2603"  # starts like the answer, never occurs in it
    assert stop not in text
    assert torch.equal(model.generate(turns, max_new_tokens=8, do_sample=False, stop_strings=stop), free)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda raw: [raw], "not a model config"),
        (lambda raw: {**raw, "text_config": "phi"}, "text_config must be an object"),
        (lambda raw: {**raw, "text_config": {**raw["text_config"], "num_attention_heads": 3}},
         "text_config: hidden_size 256 is not divisible by num_attention_heads 3"),
        (lambda raw: {**raw, "text_config": {**raw["text_config"], "attention": "flash"}},
         "text_config: attention: 'flash' is not one of"),
        (lambda raw: {**raw, "text_config": {**raw["text_config"], "hidden_size": "abc"}},
         "text_config: hidden_size must be a positive integer, got 'abc'"),
        (lambda raw: {**raw, "text_config": {**raw["text_config"], "num_attention_heads": 0}},
         "text_config: num_attention_heads must be a positive integer, got 0"),
    ],
)
def test_a_damaged_config_json_is_one_user_error_naming_the_file(tiny_vlm, tmp_path, edit, message):
    """These used to end in an AttributeError or ValueError traceback from deep inside the model's construction."""
    directory = save_vlm(tiny_vlm(), tmp_path / "m")
    path = directory / "config.json"
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))
    with pytest.raises(UserError, match="config.json: " + message.replace("(", r"\(")):
        load_vlm(directory)
