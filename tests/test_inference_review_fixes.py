"""Fixes from a review of the user-facing inference layers (tinygpt.chat, tinygpt.demo, tinygpt.serve): each test
reproduces what a user or an API client could do that once raised (a traceback in the UI, a 500) or answered
wrongly."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from fastapi.testclient import TestClient

from tinygpt.chat import ChatEngine, GenerationSettings
from tinygpt.chat.launch import LaunchConfig, Limits, ModelChoice
from tinygpt.demo.handlers import Handlers
from tinygpt.errors import UserError
from tinygpt.serve.app import create_app

NAME = "tiny"


@pytest.fixture(scope="module")
def torch_engine(chat_model):
    return ChatEngine.from_model_dir(chat_model[0], device="cpu", settings=GenerationSettings(max_new_tokens=6))


def _client(engine) -> TestClient:
    return TestClient(create_app(engine, NAME, Limits(max_images=4, queue_size=2)), raise_server_exceptions=False)


def _demo_config() -> LaunchConfig:
    return LaunchConfig(Path("test.yaml"), ModelChoice("torch", "unused"), GenerationSettings(max_new_tokens=12),
                        Limits())


class _NoEngine:
    """The demo handlers below never generate."""

    def stream(self, messages, settings=None, cancel=None):
        raise AssertionError("not expected to generate")

    def prepare(self, messages):
        pass


# -------------------------------------------------------------------- 1: a typed region with huge numbers (the demo)
HUGE = "9" * 30  # a finite float far beyond any pixel: PIL's drawing raised ValueError
INFINITE = "9" * 400  # float() of it is infinity: round() and the grid conversion raised OverflowError


@pytest.mark.parametrize("first", [HUGE, INFINITE, "-" + INFINITE], ids=["huge", "infinite", "-infinite"])
def test_a_typed_region_with_huge_numbers_never_raises(tmp_path, first):
    image_path = tmp_path / "scene.png"
    Image.new("RGB", (64, 48), (200, 10, 10)).save(image_path)
    h = Handlers(_NoEngine(), _demo_config(), drawn_dir=tmp_path)
    history = [{"role": "user", "content": [{"path": str(image_path)}, "what is it?"]},
               {"role": "assistant", "content": "a square"}]
    region = f"{first}, 0, 5, 5"

    view = h.redraw(None, history, region)  # the region textbox's change event
    assert isinstance(view, Image.Image)
    half = h.pick(None, history, f"{first}, 1", _Click((10, 10)))  # a click after a typed corner
    assert isinstance(half, str)

    if first == HUGE:  # on the grid the box is clamped to the image: it is sent
        box, shown = h.add_message({"text": "", "files": []}, history, "identify", region)
        assert shown[-1]["role"] == "user"
    else:  # a notice in the chat and a gr.Warning (outside an event: a UserWarning), not a traceback
        with pytest.warns(UserWarning, match="too large"):
            box, shown = h.add_message({"text": "", "files": []}, history, "identify", region)
        assert shown[-1]["metadata"]["title"] == "⚠️ Not sent"
        assert "too large" in shown[-1]["content"]


class _Click:
    def __init__(self, index):
        self.index = index


# ------------------------------------------------------------- 2: a repetition penalty so small the logits overflow
@pytest.mark.parametrize("stream", [False, True])
def test_a_tiny_repetition_penalty_is_a_400_not_a_500(torch_engine, stream):
    """1e-320 passed `> 0`; dividing the logits by it gave inf, and sampling raised on NaN probabilities (a 500, or
    an error event after the stream's 200)."""
    body = {"model": NAME, "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 4,
            "temperature": 1.0, "seed": 1, "repetition_penalty": 1e-320, "stream": stream}
    response = _client(torch_engine).post("/v1/chat/completions", json=body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "repetition_penalty"
    with pytest.raises(UserError, match="repetition_penalty"):
        GenerationSettings(repetition_penalty=1e-320)
    assert GenerationSettings(repetition_penalty=1.3).repetition_penalty == 1.3  # a usual value still passes


# ------------------------------------------------- 3: the conversation's image file is gone when the next turn is sent
def test_a_follow_up_after_the_image_file_is_gone_is_sent_not_raised(tmp_path):
    """add_message read the size of the conversation's newest image for every message; a file no longer there (a
    cleaned temp dir, a history sent through the /add_message API) raised AttributeError on None."""
    image_path = tmp_path / "scene.png"
    Image.new("RGB", (40, 30)).save(image_path)
    h = Handlers(_NoEngine(), _demo_config(), drawn_dir=tmp_path)
    history = [{"role": "user", "content": [{"path": str(image_path)}, "what is it?"]},
               {"role": "assistant", "content": "a square"}]
    image_path.unlink()

    _, shown = h.add_message({"text": "and its colour?", "files": []}, history, "vqa", "")
    assert shown[-1] == {"role": "user", "content": ["[vqa] and its colour?"]}
    with pytest.warns(UserWarning, match="attach an image"):  # gr.Warning, outside an event
        _, shown = h.add_message({"text": "", "files": []}, history, "identify", "1, 1, 5, 5")
    assert shown[-1]["metadata"]["title"] == "⚠️ Not sent"  # nothing to mark the region on: a notice


# ---------------------------------------------------------------- 4: an [identify] region wholly outside the image
@pytest.mark.parametrize("region", ["500, 500, 600, 600", "-10, -10, 0, 5", "64, 0, 70, 5"])
def test_an_identify_region_outside_the_image_is_a_notice(tmp_path, region):
    """It was clamped onto the grid's edge and sent as a box of no area, ``[identify] {<100><100><100><100>}``."""
    image_path = tmp_path / "scene.png"
    Image.new("RGB", (64, 48)).save(image_path)
    h = Handlers(_NoEngine(), _demo_config(), drawn_dir=tmp_path)
    with pytest.warns(UserWarning, match="outside the 64x48 image"):  # gr.Warning, outside an event
        _, shown = h.add_message({"text": "", "files": [str(image_path)]}, [], "identify", region)
    assert shown[-1]["metadata"]["title"] == "⚠️ Not sent"
    assert "outside the 64x48 image" in shown[-1]["content"]
    _, shown = h.add_message({"text": "", "files": [str(image_path)]}, [], "identify", "-5, -5, 30, 30")
    assert shown[-1] == {"role": "user", "content": [{"path": str(image_path)}, "[identify] {&lt;0&gt;&lt;0&gt;"
                                                                                  "&lt;46&gt;&lt;62&gt;}"]}


# ------------------------------------------------------------------- 5: chat_batch over a generator of conversations
def test_chat_batch_answers_a_generator_of_conversations(torch_engine):
    """The check for a lone message dict ran `any()` over the argument, using a generator up: the answers were []."""
    conversations = [[{"role": "user", "content": "a"}], [{"role": "user", "content": "b"}]]
    expected = torch_engine.chat_batch(conversations)
    assert len(expected) == 2
    assert torch_engine.chat_batch(c for c in conversations) == expected


def test_score_takes_a_generator_of_candidates(torch_engine):
    """The same with `score`: `all()` over the candidates used a generator up, and the scores were []."""
    messages = [{"role": "user", "content": "a"}]
    expected = torch_engine.score(messages, ["yes", "no"])
    assert len(expected) == 2
    assert torch_engine.score(messages, (c for c in ["yes", "no"])) == expected
    with pytest.raises(UserError, match="candidates"):
        torch_engine.score(messages, "yes")


# ------------------------------------------------------------- 6: an identify box that is not four finite numbers
@pytest.mark.parametrize("box", [(0, 0, float("nan"), 5), (0, 0, float("inf"), 5), (0, 0, "a", 5), (0, 0, None, 5)],
                         ids=["nan", "inf", "text", "none"])
def test_an_identify_box_that_is_not_four_finite_numbers_is_a_user_error(box):
    """`task_prompt` (ChatEngine.ask) raised ValueError / OverflowError / TypeError from the grid conversion."""
    from tinygpt.chat import task_prompt

    with pytest.raises(UserError, match="box: expected"):
        task_prompt("identify", None, box, (10, 10))
    assert task_prompt("identify", None, (0, 0, 5, 5), (10, 10)) == "[identify] {<0><0><50><50>}"


@pytest.mark.parametrize("value", [1e-320, 1e300])
def test_the_runtime_sampler_refuses_a_repetition_penalty_that_overflows(value):
    """`python -m quantize chat --repetition-penalty 1e-320` got past `> 0` and failed later on NaN probabilities."""
    import numpy as np

    from quantize.sampler import Sampler, SamplingParams

    with pytest.raises(UserError, match=r"--repetition-penalty must be in 0.01 .. 100.0 \(1: none\)"):
        SamplingParams(temperature=1.0, repetition_penalty=value).validate()
    params = SamplingParams(temperature=1.0, repetition_penalty=100.0, seed=1).validate()
    logits = np.linspace(-3.0, 3.0, 16)
    assert 0 <= Sampler(params)(logits, [3, 15]) < 16  # the end of the range still samples
