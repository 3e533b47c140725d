"""Why an answer stopped when the context window ended it: ``stopped_by`` is "context full" (not "max_new_tokens")
on both backends, through `ChatEngine` (which cuts `max_new_tokens` to the room the prompt leaves before the
backend sees it), for chat, stream, a batch and a raw-prompt completion; an answer ended by the caller's budget
with room left in the context stays "max_new_tokens". Both are finish_reason "length".

The answers are scripted (the PyTorch model's LM head is hooked, the GGUF session's sampler replaced) so that no
end token or stop string can end them early, and the contexts are made small so that filling them is quick."""

from __future__ import annotations

import pytest

from tinygpt.chat import ChatEngine, GenerationSettings
from tinygpt.chat.torch_backend import TorchBackend

LT = 27  # "<" in the builtin tokenizer: no stop string or end symbol is made of it
ROOM = 6  # positions the small contexts leave after the longest prompt


def _user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


SHORT, LONG = _user("Hi"), _user("a much longer question about the picture, with many more words in it")


class _Always:
    """Forces every greedy step of the PyTorch model to `token` (a hook on the LM head)."""

    def __init__(self, model, token: int):
        self.token = token
        model.language_model.lm_head.register_forward_hook(self)

    def __call__(self, module, args, out):
        out = out.clone()
        out[:, -1] = -1e4
        out[:, -1, self.token] = 1e4
        return out


def _prompt_length(engine, messages) -> int:
    return engine.backend.prompt_length(engine._encode(engine._conversation(messages)))


def _reasons(engine, messages, settings) -> list[tuple[str, int]]:
    """(stopped_by, generated tokens) of chat and of stream."""
    out = []
    engine.chat(messages, settings)
    out.append((engine.backend.last_stats.stopped_by, engine.backend.last_stats.generated_tokens))
    list(engine.stream(messages, settings))
    out.append((engine.backend.last_stats.stopped_by, engine.backend.last_stats.generated_tokens))
    return out


# ------------------------------------------------------------------------------------------------ PyTorch
@pytest.fixture
def torch_engine(tiny_vlm):
    model = tiny_vlm()
    _Always(model, LT)
    backend = TorchBackend(model)
    engine = ChatEngine(backend)
    backend.context_length = _prompt_length(engine, LONG) + ROOM  # a small context, filled in a few steps
    return engine


def test_torch_batch_rows_cut_by_the_context(torch_engine):
    engine, backend = torch_engine, torch_engine.backend
    room_short = backend.context_length - _prompt_length(engine, SHORT)
    engine.chat_batch([SHORT, LONG], GenerationSettings(max_new_tokens=room_short + 50))
    # the engine cuts each conversation's budget to its own room: two groups, one generate each; the last is LONG's
    assert [(s.stopped_by, s.generated_tokens) for s in backend.last_batch_stats] == [("context full", ROOM)]
    engine.chat_batch([SHORT, LONG], GenerationSettings(max_new_tokens=ROOM - 1))  # one group, room left for both
    assert [s.stopped_by for s in backend.last_batch_stats] == ["max_new_tokens"] * 2


# ------------------------------------------------------------------------------------------------ GGUF
class _AlwaysSampler:
    """Stands in for quantize.sampler.Sampler: every step picks `token`."""

    token = 0

    def __init__(self, params):
        self.params = params

    def __call__(self, logits, previous=()):
        return self.token


@pytest.fixture(scope="module")
def gguf_engine(chat_model):
    from tinygpt.chat.gguf_backend import GGUFBackend

    _, gguf_dir = chat_model
    probe = ChatEngine(GGUFBackend.load(gguf_dir, vision_int8=False, with_vision=False, n_ctx=256))
    n_ctx = _prompt_length(probe, LONG) + ROOM
    return ChatEngine(GGUFBackend.load(gguf_dir, vision_int8=False, with_vision=False, n_ctx=n_ctx))


@pytest.fixture
def scripted_gguf(gguf_engine, monkeypatch):
    import tinygpt.chat.gguf_backend as gguf_backend

    tokenizer = gguf_engine.backend.session.tokenizer
    monkeypatch.setattr(_AlwaysSampler, "token", tokenizer.encode("<", add_special_tokens=False).ids[0])
    monkeypatch.setattr(gguf_backend, "Sampler", _AlwaysSampler)
    return gguf_engine


# ------------------------------------------------------------------------------------------------ both backends
@pytest.fixture(params=["torch_engine", "scripted_gguf"])
def any_engine(request):
    return request.getfixturevalue(request.param)


def test_an_answer_the_context_cut_is_context_full(any_engine):
    engine = any_engine
    assert engine.context_length == _prompt_length(engine, LONG) + ROOM
    for budget in (ROOM + 50, ROOM):  # far beyond the room, and exactly the room: either way the context is full
        settings = GenerationSettings(max_new_tokens=budget)
        assert _reasons(engine, LONG, settings) == [("context full", ROOM)] * 2
        assert engine.backend.last_stats.finish_reason == "length"


def test_a_budget_stop_with_room_left_is_max_new_tokens(any_engine):
    settings = GenerationSettings(max_new_tokens=ROOM - 2)
    assert _reasons(any_engine, LONG, settings) == [("max_new_tokens", ROOM - 2)] * 2
    assert any_engine.backend.last_stats.finish_reason == "length"


def test_a_raw_prompt_cut_by_the_context(any_engine):
    engine, backend = any_engine, any_engine.backend
    prompt = "Once upon a time"
    room = engine.context_length - backend.text_length(prompt)
    engine.complete(prompt, GenerationSettings(max_new_tokens=room + 20))
    assert (backend.last_stats.stopped_by, backend.last_stats.generated_tokens) == ("context full", room)
    "".join(engine.complete_stream(prompt, GenerationSettings(max_new_tokens=room + 20)))
    assert (backend.last_stats.stopped_by, backend.last_stats.generated_tokens) == ("context full", room)
    engine.complete(prompt, GenerationSettings(max_new_tokens=room - 1))
    assert backend.last_stats.stopped_by == "max_new_tokens"


def test_the_terminal_chat_says_when_the_context_cut_the_answer(torch_engine):
    import io

    from tinygpt.chat.cli import TerminalChat

    engine = torch_engine
    engine.settings = engine.settings.with_(max_new_tokens=ROOM - 2)  # room left: no note
    out, err = io.StringIO(), io.StringIO()
    chat = TerminalChat(engine, out, err)
    try:
        chat.ask(LONG[0]["content"])
        assert err.getvalue() == ""
        chat.reset()
        engine.settings = engine.settings.with_(max_new_tokens=ROOM + 50)
        chat.ask(LONG[0]["content"])
        assert "cut where it filled the model's context" in err.getvalue() and "/reset" in err.getvalue()
    finally:
        chat.close()


def test_the_demo_shows_a_notice_when_the_context_cut_the_answer(torch_engine, tmp_path):
    from tinygpt.chat.launch import LaunchConfig, Limits, ModelChoice
    from tinygpt.demo.handlers import Handlers

    launch = LaunchConfig("test", ModelChoice(path="unused", backend="torch"), GenerationSettings(), Limits())
    h = Handlers(torch_engine, launch, tmp_path)
    history = [{"role": "user", "content": LONG[0]["content"]}]
    *_, (room_left, _, _) = h.respond(history, ROOM - 2, 0.0, 0.9, 1.0, 0)
    assert room_left[-1]["role"] == "assistant" and "metadata" not in room_left[-1]
    *_, (cut, _, _) = h.respond(history, ROOM + 50, 0.0, 0.9, 1.0, 0)
    assert cut[-2]["role"] == "assistant" and "metadata" not in cut[-2]  # the answer, then the notice
    assert cut[-1]["metadata"]["title"] == "✂️ Answer cut" and "Clear starts a new one" in cut[-1]["content"]
