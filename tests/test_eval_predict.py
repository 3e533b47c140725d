"""Batched prediction: `ChatEngine.chat_batch` against `chat` on each conversation (both backends, the decisive tiny
model of conftest.chat_model), the fallback for backends without batch methods, context checks per conversation,
and `tinygpt.evaluation.predict.predict` (prompts, batches, order, scores, progress)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from tinygpt.chat import ChatEngine, GenerationSettings
from tinygpt.chat.backend import EncodedTurn
from tinygpt.errors import UserError
from tinygpt.evaluation.benchmark import Sample
from tinygpt.evaluation.predict import conversation, predict

TAG = "<Img><ImageHere></Img>"
GREEDY = GenerationSettings(max_new_tokens=8)


def _png(seed: int, size=(90, 130)) -> Image.Image:
    return Image.fromarray((np.random.default_rng(seed).random((*size, 3)) * 255).astype(np.uint8))


def _user(*parts):
    return {"role": "user", "content": [{"type": "text", "text": p} if isinstance(p, str) else
                                        {"type": "image", "image": p} for p in parts]}


@pytest.fixture(scope="module", params=["torch", "gguf"])
def engine(request, chat_model):
    from tinygpt.chat.gguf_backend import GGUFBackend
    from tinygpt.chat.torch_backend import TorchBackend
    from tinygpt.model import load_vlm

    model_dir, gguf_dir = chat_model
    if request.param == "torch":
        return ChatEngine(TorchBackend(load_vlm(model_dir)))
    return ChatEngine(GGUFBackend.load(gguf_dir, vision_int8=False))


class Spy:
    """Records the calls of one backend method (the engine looks methods up on the backend at each call)."""

    def __init__(self, backend, name):
        self.backend, self.name, self.calls = backend, name, []
        self.real = getattr(backend, name)

    def __enter__(self):
        setattr(self.backend, self.name, lambda *args: self.calls.append(args) or self.real(*args))
        return self

    def __exit__(self, *exc):
        delattr(self.backend, self.name)


def _conversations():
    a, b = _png(0), _png(1, (64, 64))
    return [
        [_user(a, "What is in the picture?")],
        [_user("Hello there")],                                     # no image, among image prompts
        [_user(b, "and this one?")],
        [_user(a, "compare", b), {"role": "assistant", "content": "the same"}, _user("and now?", a)],
        [_user(a, "What colour?")],
    ]


def test_chat_batch_equals_chat_on_each_and_encodes_each_image_once(engine):
    fresh = ChatEngine(engine.backend)  # an empty image cache
    with Spy(fresh.backend, "encode_images") as spy:
        answers = fresh.chat_batch(_conversations(), GREEDY)
    assert fresh.encode_count == 2 and len(spy.calls) == 1 and len(spy.calls[0][0]) == 2
    assert answers == [engine.chat(messages, GREEDY) for messages in _conversations()]
    assert sum(bool(a) for a in answers) >= 2  # random weights may stop at once on some prompts, not on most
    assert fresh.chat_batch([], GREEDY) == []


def test_the_fallback_without_batch_methods_gives_the_same_answers(engine):
    class Plain:  # the ChatBackend protocol only
        def __init__(self, backend):
            self.inner = backend
            self.name, self.prompt, self.context_length = backend.name, backend.prompt, backend.context_length

        def __getattr__(self, name):
            if name in ("encode_images", "generate_batch"):
                raise AttributeError(name)
            return getattr(self.inner, name)

    plain = ChatEngine(Plain(engine.backend))
    assert plain.chat_batch(_conversations(), GREEDY) == engine.chat_batch(_conversations(), GREEDY)
    assert plain.encode_count == 2


def test_a_too_long_conversation_is_named_before_anything_is_generated(engine):
    long = [_user("word " * (engine.context_length + 5))]
    batch = [_conversations()[0], long, _conversations()[1]]
    with Spy(engine.backend, "generate_batch") as spy, pytest.raises(UserError) as err:
        engine.chat_batch(batch, GREEDY)
    assert str(err.value).startswith("conversations[1]: prompt too long") and spy.calls == []
    with pytest.raises(UserError, match=r"conversations\[2\]: .*last message"):
        engine.chat_batch([_conversations()[0], _conversations()[1],
                           [_user("hi"), {"role": "assistant", "content": "hello"}]], GREEDY)
    with pytest.raises(UserError, match="conversations: expected a list of conversations"):
        engine.chat_batch(_conversations()[0], GREEDY)


def test_a_conversation_near_the_context_gets_fewer_tokens_alone(engine):
    """max_new_tokens is cut to the room each conversation leaves; the others keep theirs (separate groups)."""
    def length(words: int) -> int:
        return engine.backend.prompt_length([EncodedTurn(" ".join(["word"] * words), (), None)])

    per_word = (length(80) - length(40)) / 40
    words = int((engine.context_length - 8 - length(40)) / per_word) + 40
    near = [_user(" ".join(["word"] * words))]
    settings = GenerationSettings(max_new_tokens=16)
    room = engine.context_length - length(words)
    assert 0 < room < 16, room
    batch = [_conversations()[0], near, _conversations()[1]]
    with Spy(engine.backend, "generate_batch") as spy:
        answers = engine.chat_batch(batch, settings)
    assert sorted(call[1].max_new_tokens for call in spy.calls) == [room, 16]
    assert answers == [engine.chat(messages, settings) for messages in batch]


# ---- predict -------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[str]:
    d = tmp_path_factory.mktemp("predict-images")
    paths = []
    for k in range(3):
        _png(10 + k).save(d / f"{k}.png")
        paths.append(str(d / f"{k}.png"))
    return paths


def _samples(images):
    a, b, c = images
    return [
        Sample("s0", (a,), f"{TAG} [vqa] what is it? ", max_new_tokens=6),
        Sample("s1", (b,), "what colour is it?", max_new_tokens=6),            # no mark: the image goes first
        Sample("s2", (), "say something", max_new_tokens=6),                   # no image
        Sample("s3", (a,), f"{TAG} yes or no? ", generate=False, choices=("yes", "no")),  # scored only
        Sample("s4", (c, a), f"{TAG} and {TAG} differ? ", max_new_tokens=6, choices=("yes", "no")),
        Sample("s5", (b,), f"{TAG} [refer] the thing ", max_new_tokens=9),    # another length: a new batch
        Sample("s6", (c,), "<ImageHere>", max_new_tokens=9),                   # a bare image (stage 1-2 captions)
    ]


def test_conversation_keeps_the_prompt_and_puts_unmarked_images_first(images):
    s0, s1, s2, _, s4, _, s6 = _samples(images)
    assert conversation(s0).turns[0].user == f"{TAG} [vqa] what is it? "  # spaces kept: the training wording
    assert conversation(s1).turns[0].user == f"{TAG} what colour is it?"
    assert conversation(s2).turns[0].user == "say something" and conversation(s2).turns[0].images == ()
    assert conversation(s4).turns[0].images[0].key == conversation(s6).turns[0].images[0].key  # same file, same key
    assert conversation(s6).turns[0].user == "<ImageHere>"
    with pytest.raises(UserError, match=r"sample x: prompt: 2 <ImageHere> mark\(s\) for 1 image"):
        conversation(Sample("x", (images[0],), f"{TAG} {TAG}"))
    with pytest.raises(UserError, match=r"sample y: images\[0\]: image file not found"):
        conversation(Sample("y", (str(Path(images[0]).with_name("none.png")),), "x"))


def test_predict_batches_in_order_and_equals_one_at_a_time(engine, images):
    samples = _samples(images)
    seen, batches = [], []
    real = engine.chat_batch
    engine.chat_batch = lambda convs, settings: batches.append((len(convs), settings.max_new_tokens)) or real(
        convs, settings)
    try:
        predictions = list(predict(engine, samples, 2, progress=lambda done, total: seen.append((done, total))))
    finally:
        del engine.chat_batch
    assert [p.id for p in predictions] == [s.id for s in samples]
    # runs: [s0 s1] [s2 s3 s4] (s3 is scored only) [s5 s6] (9 tokens)
    assert batches == [(2, 6), (2, 6), (2, 9)] and seen == [(2, 7), (5, 7), (7, 7)]
    for sample, prediction in zip(samples, predictions):
        one = GenerationSettings(max_new_tokens=sample.max_new_tokens)
        want_text = engine.chat(conversation(sample), one) if sample.generate else None
        want_scores = tuple(engine.score(conversation(sample), list(sample.choices))) if sample.choices else None
        assert (prediction.text, prediction.scores) == (want_text, want_scores), sample.id
    assert all(s <= 0 for s in predictions[3].scores) and len(predictions[4].scores) == 2
    assert sum(bool(p.text) for p in predictions) >= 3


def test_predict_stops_at_a_blank_end_symbol_and_checks_the_batch_size(images):
    asked = []
    fake = SimpleNamespace(backend=SimpleNamespace(prompt=SimpleNamespace(end_sym="\n")), stop_strings=(),
                           chat_batch=lambda convs, settings: asked.append(settings) or ["a"] * len(convs))
    assert [p.text for p in predict(fake, _samples(images)[:2], 8)] == ["a", "a"]
    assert asked[0].stop == ("\n",) and asked[0].greedy and asked[0].max_new_tokens == 6
    fake.stop_strings = ("\n",)
    list(predict(fake, _samples(images)[:1], 8, GenerationSettings(stop=("END",), temperature=0.5)))
    assert asked[1].stop == ("END",) and asked[1].temperature == 0.5  # the model's own stops are not repeated
    with pytest.raises(UserError, match="batch_size"):
        list(predict(fake, _samples(images), 0))
