"""The lmms-eval plugin (tinygpt/evaluation/lmms_model.py) on fabricated requests: answers and scores equal the chat
engine's, gen_kwargs and stop strings, the RefCOCO box conversion, batching, model-arg errors. Everything but the
last test runs without lmms-eval; that one uses lmms-eval's own Instance and model registry when it is installed."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tinygpt.chat import ChatEngine, GenerationSettings
from tinygpt.errors import UserError
from tinygpt.evaluation.lmms_model import (TinyGPTLmms, generation_settings, open_pretrained, refcoco_answer,
                                           refcoco_prompt, request_messages)

ROOT = Path(__file__).resolve().parents[1]
REFCOCO_CONTEXT = ("Bounding box coordinates are specified in the format (top-left x, top-left y, bottom-right x, "
                   "bottom-right y). All values are floating point numbers bounded between 0 and 1. Please provide "
                   "the bounding box coordinate of the region this sentence describes: the man on the left")
GREEDY = {"max_new_tokens": 8, "temperature": 0, "do_sample": False, "top_p": 0, "num_beams": 1}


@dataclass
class FakeRequest:
    """What the plugin reads of an lmms-eval Instance: `.args`."""

    args: tuple


def _png(seed: int, size=(90, 130)) -> Image.Image:
    return Image.fromarray((np.random.default_rng(seed).random((*size, 3)) * 255).astype(np.uint8))


DOCS = [{"image": _png(0)}, {"image": _png(1, (64, 64))}, {"image": _png(2)}]
QUESTIONS = ["What is in the picture?", "Is there a cat?", "Describe it."]


def _visual(doc):
    return [doc["image"]]


def _gen(context, doc_id, gen_kwargs=None, task="t", visual=_visual):
    return FakeRequest((context, dict(gen_kwargs or GREEDY), visual, doc_id, task, "test"))


def evaluator_view(outputs) -> list:
    """The outputs as lmms-eval's evaluator hands them to its tasks (its `unwrap_generation_output`: 0.7.3 turns a
    plain (loss, is_greedy) tuple into its str()), or as they are without lmms-eval."""
    try:
        from lmms_eval.api.instance import unwrap_generation_output
    except ImportError:
        return list(outputs)
    return [unwrap_generation_output(output)[0] for output in outputs]


def _plugin(engine, **kw) -> TinyGPTLmms:
    plugin = TinyGPTLmms(engine=engine, **kw)
    plugin.task_dict = {"t": {"test": DOCS}, "refcoco_bbox_rec_val": {"test": DOCS}}
    return plugin


@pytest.fixture(scope="module")
def engine(chat_model):
    return ChatEngine.from_model_dir(chat_model[0], device="cpu")


# ------------------------------------------------------------------------------------------------ plain functions
@pytest.mark.parametrize("gen_kwargs, want", [
    ({}, GenerationSettings()),
    (GREEDY, GenerationSettings(max_new_tokens=8)),
    ({"until": "ASSISTANT:"}, GenerationSettings(stop=("ASSISTANT:",))),
    ({"until": ["\n", "", "###"]}, GenerationSettings(stop=("\n", "###"))),
    ({"temperature": 0.7, "top_p": 0.5}, GenerationSettings(temperature=0.7, top_p=0.5)),
    ({"do_sample": True}, GenerationSettings(temperature=1.0)),
    ({"do_sample": False, "temperature": 0.9}, GenerationSettings()),
    ({"num_beams": 3, "repetition_penalty": 1.1, "image_aspect_ratio": "pad"},
     GenerationSettings(num_beams=3, repetition_penalty=1.1)),
])
def test_gen_kwargs_become_settings(gen_kwargs, want):
    assert generation_settings(gen_kwargs, GenerationSettings()) == want


def test_gen_kwargs_keep_the_config_defaults_and_its_stops():
    base = GenerationSettings(max_new_tokens=50, stop=("</s>",), seed=3)
    got = generation_settings({"until": ["</s>", "\n\n"]}, base)
    assert got == GenerationSettings(max_new_tokens=50, stop=("</s>", "\n\n"), seed=3)


@pytest.mark.parametrize("gen_kwargs, field", [
    ({"until": 5}, "gen_kwargs.until"),
    ({"until": ["a", 3]}, "gen_kwargs.until"),
    ({"max_new_tokens": 0}, "gen_kwargs.max_new_tokens"),
    ({"temperature": 0.5, "top_p": 0}, "gen_kwargs.top_p"),
    ({"num_beams": 0}, "gen_kwargs.num_beams"),
])
def test_bad_gen_kwargs_name_the_field(gen_kwargs, field):
    with pytest.raises(UserError, match=re.escape(field)):
        generation_settings(gen_kwargs, GenerationSettings())


def test_request_messages_put_images_first():
    a, b = _png(0), _png(1)
    assert request_messages("q?", [[a], b]) == [{"role": "user", "content": [
        {"type": "image", "image": a}, {"type": "image", "image": b}, {"type": "text", "text": "q?"}]}]
    assert request_messages("q?", None) == [{"role": "user", "content": [{"type": "text", "text": "q?"}]}]


def test_refcoco_prompt_and_answer_conversion():
    assert refcoco_prompt(REFCOCO_CONTEXT) == "[refer] the man on the left"
    assert refcoco_answer("<p>the man</p> {<10><20><55><90>}") == "[0.10, 0.20, 0.55, 0.90]"
    assert refcoco_answer("{<0><0><100><100>}<delim>{<1><2><3><4>}") == "[0.00, 0.00, 1.00, 1.00]"  # the first
    assert refcoco_answer("{<60><20><50><90>} {<5><6><7><8>}") == "[0.05, 0.06, 0.07, 0.08]"  # inverted: skipped
    assert refcoco_answer("no box here") == "no box here"
    assert refcoco_answer("{<10><20><155><90>}") == "{<10><20><155><90>}"  # off the grid: not a box


# ------------------------------------------------------------------------------------------------ on the tiny model
@pytest.fixture(scope="module")
def answers(engine):
    """The engine's own greedy answer (8 tokens) to each question about its document's image."""
    return [engine.chat(request_messages(q, [DOCS[i]["image"]]), GenerationSettings(max_new_tokens=8))
            for i, q in enumerate(QUESTIONS)]


def test_generate_until_equals_the_chat_engine(engine, answers):
    plugin = _plugin(engine)
    requests = [_gen(q, i) for i, q in enumerate(QUESTIONS)] + [_gen("Hello there", 0, visual=None)]
    hello = engine.chat(request_messages("Hello there"), GenerationSettings(max_new_tokens=8))
    assert plugin.generate_until(requests) == [*answers, hello]
    assert any(answers), "the tiny model answered every request with nothing"
    # batch_size 2: through ChatEngine.chat_batch (where the engine has it); greedy answers must not change
    batches = []
    if hasattr(engine, "chat_batch"):
        real = engine.chat_batch
        engine.chat_batch = lambda convs, settings: batches.append(len(convs)) or real(convs, settings)
    try:
        assert _plugin(engine, batch_size=2).generate_until(requests) == [*answers, hello]
    finally:
        engine.__dict__.pop("chat_batch", None)
    assert batches == ([2, 2] if hasattr(engine, "chat_batch") else [])


def test_until_stops_the_answer(engine, answers):
    i = int(np.argmax([len(a) for a in answers]))
    text = answers[i]
    assert len(text) >= 4, "the tiny model answers every question with (almost) nothing"
    stop = text[len(text) // 2: len(text) // 2 + 2]
    got = _plugin(engine).generate_until([_gen(QUESTIONS[i], i, {**GREEDY, "until": [stop]})])[0]
    assert got == text[: text.index(stop)].strip()


def test_loglikelihood_equals_score_and_is_greedy_is_measured(engine, answers):
    plugin = _plugin(engine)
    i = next((k for k, a in enumerate(answers) if a), None)
    assert i is not None, "the tiny model answers every question with nothing"
    question, greedy, other = QUESTIONS[i], answers[i], "zebra crossing"
    assert not greedy.startswith(other)
    requests = [FakeRequest((question, " " + greedy, _visual, i, "t", "test")),
                FakeRequest((question, " " + other, _visual, i, "t", "test")),
                FakeRequest((question, lambda doc: other, _visual, i, "t", "test")),  # doc_to_target
                FakeRequest((question, " ", _visual, i, "t", "test")),
                FakeRequest(("", "yes"))]  # lmms-eval's unconditional request: no image, empty context
    got = evaluator_view(plugin.loglikelihood(requests))  # (loss = minus the score, is_greedy): the lowest loss wins
    want = engine.score(request_messages(question, [DOCS[i]["image"]]), [greedy, other])
    assert got[0] == (pytest.approx(-want[0]), True)
    assert got[1] == (pytest.approx(-want[1]), False)
    assert got[2] == got[1]
    assert got[3] == (0.0, True)
    assert got[4][0] == pytest.approx(-engine.score(request_messages(""), ["yes"])[0])
    assert all(loss >= 0 for loss, _ in got)


def test_gguf_directory_and_launch_config_open(chat_model, tmp_path):
    model_dir, gguf_dir = chat_model
    assert TinyGPTLmms(pretrained=str(gguf_dir)).engine.name.startswith("gguf")
    cfg = tmp_path / "mine.yaml"
    cfg.write_text(f"model:\n  backend: torch\n  path: {model_dir}\n  device: auto\ngeneration:\n  max_new_tokens: 7\n")
    plugin = TinyGPTLmms(pretrained=str(cfg), device="cpu", batch_size="1")
    assert plugin.engine.settings.max_new_tokens == 7 and plugin.engine.name == "torch:cpu"


# ------------------------------------------------------------------------------------------------ a stand-in engine
class StubEngine:
    """Answers with a fixed text and records what it was asked (chat_batch only when `batched`)."""

    def __init__(self, answer="<p>man</p> {<10><20><55><90>}", batched=False):
        self.answer, self.calls, self.settings = answer, [], GenerationSettings()
        if batched:
            self.chat_batch = lambda convs, settings: [self._one(c, settings, len(convs)) for c in convs]

    def _one(self, messages, settings, batch=1):
        self.calls.append((messages[0]["content"][-1]["text"], settings, batch))
        return f"{self.answer} #{len(self.calls)}"

    def chat(self, messages, settings=None):
        return self._one(messages, settings)


def test_refcoco_requests_are_asked_in_the_training_wording_and_answer_fractions():
    stub = StubEngine()
    plugin = _plugin(stub)
    got = plugin.generate_until([_gen(REFCOCO_CONTEXT, 0, {"until": ["ASSISTANT:"]}, task="refcoco_bbox_rec_val"),
                                 _gen("What is it?", 1)])
    assert got == ["[0.10, 0.20, 0.55, 0.90]", "<p>man</p> {<10><20><55><90>} #2"]
    assert stub.calls[0][0] == "[refer] the man on the left"
    plain = _plugin(StubEngine(), refer_prompt=False)
    plain.generate_until([_gen(REFCOCO_CONTEXT, 0, task="refcoco_bbox_rec_val")])
    assert plain.engine.calls[0][0] == REFCOCO_CONTEXT


def test_batches_group_equal_settings_and_keep_request_order():
    stub = StubEngine(answer="a", batched=True)
    plugin = _plugin(stub, batch_size=2)
    other = {"max_new_tokens": 3}
    requests = [_gen("q0", 0), _gen("q1", 1, other), _gen("q2", 2), _gen("q3", 0), _gen("q4", 1, other)]
    got = plugin.generate_until(requests)
    asked = [text for text, _, _ in stub.calls]
    assert asked == ["q0", "q2", "q3", "q1", "q4"]  # by settings, in chunks of 2: [q0 q2] [q3] [q1 q4]
    assert [batch for _, _, batch in stub.calls] == [2, 2, 1, 2, 2]
    assert got == ["a #1", "a #4", "a #2", "a #3", "a #5"]
    one_by_one = StubEngine(answer="a")  # no chat_batch: one chat call per request, same answers
    assert _plugin(one_by_one, batch_size=2).generate_until(requests) == got


def test_multi_round_is_refused():
    with pytest.raises(NotImplementedError, match="generate_until_multi_round"):
        _plugin(StubEngine()).generate_until_multi_round([])


# ------------------------------------------------------------------------------------------------ model-arg errors
def test_model_arg_errors_name_the_argument(chat_model, tmp_path):
    model_dir, gguf_dir = chat_model
    cfg = tmp_path / "torch.yaml"
    cfg.write_text(f"model:\n  backend: torch\n  path: {model_dir}\n")
    cases = [
        (dict(), "pretrained: required"),
        (dict(pretrained=str(tmp_path / "nowhere")), "neither a launch config"),
        (dict(pretrained=str(tmp_path)), "holds no config.json .a saved model. or llm-"),
        (dict(pretrained=str(model_dir), backend="gguf"), "holds no llm-"),
        (dict(pretrained=str(gguf_dir), backend="torch"), "holds no config.json"),
        (dict(pretrained=str(model_dir), backend="onnx"), "backend: expected torch or gguf"),
        (dict(pretrained=str(cfg), backend="gguf"), "model.backend: torch"),
        (dict(pretrained=str(tmp_path / "missing.yaml")), "launch config does not exist"),
        (dict(pretrained=str(model_dir), device="gpu"), "device: expected auto, cpu, cuda"),
        (dict(pretrained=str(gguf_dir), threads=0), "threads: expected an integer"),
        (dict(pretrained=str(model_dir), pretrain="x"), "unknown argument 'pretrain'"),
        (dict(pretrained=str(model_dir), batch_size="auto"), "--batch_size: expected an integer"),
        (dict(pretrained=str(model_dir), refer_prompt="yes"), "refer_prompt: expected true or false"),
    ]
    for kwargs, message in cases:
        with pytest.raises(UserError, match=message):
            TinyGPTLmms(**kwargs)
    with pytest.raises(UserError, match="did you mean 'pretrained'"):
        TinyGPTLmms(pretrained=str(model_dir), pretrain="x")
    with pytest.raises(UserError, match="no document 9 in task 't'"):
        _plugin(StubEngine()).generate_until([_gen("q", 9)])
    assert open_pretrained(str(model_dir), device="cpu").name == "torch:cpu"


# ------------------------------------------------------------------------------------------------ with lmms-eval
def test_lmms_eval_registry_builds_the_model_and_answers_its_instances(chat_model):
    pytest.importorskip("lmms_eval")
    import importlib

    import tomllib
    from lmms_eval.api.instance import Instance
    from lmms_eval.api.model import lmms
    from lmms_eval.models.registry_v2 import ModelRegistryV2
    from lmms_eval.tasks.refcoco.utils_rec import parse_float_sequence_within

    target = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]["lmms_eval.models"]
    module, attr = target["tinygpt"].split(":")
    registry = ModelRegistryV2()
    registry.register_manifest(getattr(importlib.import_module(module), attr)())
    cls = registry.get_model_class("tinygpt")  # checks the lmms subclass and is_simple
    assert cls is TinyGPTLmms and issubclass(cls, lmms)
    plugin = cls.create_from_arg_string(f"pretrained={chat_model[0]},device=cpu",
                                        {"batch_size": "1", "device": None, "max_batch_size": None})
    plugin.task_dict = {"t": {"test": DOCS}}

    def instance(kind, args, i):
        return Instance(request_type=kind, arguments=args, idx=i, metadata={"task": "t", "doc_id": i, "repeats": 1})

    gens = [instance("generate_until", (q, dict(GREEDY), _visual, i, "t", "test"), i) for i, q in enumerate(QUESTIONS)]
    want = [plugin.engine.chat(request_messages(q, [DOCS[i]["image"]]), GenerationSettings(max_new_tokens=8))
            for i, q in enumerate(QUESTIONS)]
    assert plugin.generate_until(gens) == want
    lls = [instance("loglikelihood", (QUESTIONS[0], f" {c}", _visual, 0, "t", "test"), k)
           for k, c in enumerate(["yes", "no"])]
    scores = plugin.engine.score(request_messages(QUESTIONS[0], [DOCS[0]["image"]]), ["yes", "no"])
    assert [s for s, _ in evaluator_view(plugin.loglikelihood(lls))] == pytest.approx([-s for s in scores])  # losses
    assert parse_float_sequence_within(refcoco_answer("{<10><20><55><90>}")) == [0.10, 0.20, 0.55, 0.90]
