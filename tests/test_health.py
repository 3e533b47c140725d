"""No silent garbage: the decoding self-check and the floors (``tinygpt.evaluation.health``)."""

from __future__ import annotations

import pytest
import torch

from tinygpt.evaluation.health import (CANARY_COMMAND, FLOORS, broken_message, generation_problems, score_problems,
                                       versions_text)
from tinygpt.model import TinyGPTPhiConfig, TinyGPTPhiForCausalLM


@pytest.fixture
def lm():
    torch.manual_seed(0)
    return TinyGPTPhiForCausalLM(TinyGPTPhiConfig(
        vocab_size=120, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
        rotary_dim=6, resid_pdrop=0.0, bos_token_id=0, eos_token_id=119, pad_token_id=0)).eval()


def test_a_working_decoder_passes_the_self_check(lm):
    assert generation_problems(lm) == []


def test_the_self_check_sees_a_cache_that_is_not_taken(lm, monkeypatch):
    """The transformers 5.25 failure: the model ignores the cache it is handed (under a new name), so each step
    decodes without its past."""
    import tinygpt.model.phi as phi

    monkeypatch.setattr(phi, "take_cache", lambda explicit, kwargs: [kwargs.pop(n, None) for n in
                                                                     ("cache", "past_key_values")] and None)
    problems = generation_problems(lm)
    assert len(problems) == 1
    assert problems[0].startswith("generation with the KV cache disagrees with a plain forward pass (")
    assert "a working install gives 100%" in problems[0]


def test_floors_pass_every_working_build_and_catch_the_broken_install():
    worst_working = {"vqa_accuracy": 0.797, "grounding_accuracy": 0.512, "vqa_unparsed": 0.02,
                     "grounding_unparsed": 0.0}
    assert score_problems(worst_working) == []
    broken = {"vqa_accuracy": 0.103, "grounding_accuracy": 0.0, "vqa_unparsed": 0.8, "grounding_unparsed": 0.9}
    assert score_problems(broken, label="stage 4") == [
        "stage 4 VQA 10.3% < floor 50%", "stage 4 grounding 0.0% < floor 25%",
        "stage 4 80% VQA answers outside the answer set (> 50%)", "stage 4 90% grounding answers without a box (> 50%)"]
    at_floor = {"vqa_accuracy": FLOORS.vqa, "grounding_accuracy": FLOORS.grounding, "grounding_unparsed": 0.5}
    assert score_problems(at_floor) == []  # the floors themselves pass; just under them does not
    assert len(score_problems({"vqa_accuracy": FLOORS.vqa - 0.001})) == 1


def test_the_message_is_one_line_with_versions_and_the_canary():
    message = broken_message(["a", "b"], "out/results.json")
    assert "\n" not in message
    assert message.startswith("out/results.json: the results are not believable: a; b (installed: torch ")
    assert versions_text() in message and message.endswith(CANARY_COMMAND)
