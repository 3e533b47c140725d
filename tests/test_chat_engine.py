"""The chat engine (tinygpt.chat): message parsing, the PyTorch and GGUF backends agreeing on one tiny model,
streaming, stop strings, seeds, the image cache, task prompts, box parsing and candidate scoring."""

from __future__ import annotations

import base64
import io
import threading

import numpy as np
import pytest
from PIL import Image

from tinygpt.chat import ChatEngine, GenerationSettings, answer_boxes, parse_messages, task_prompt
from tinygpt.errors import UserError

TAG = "<Img><ImageHere></Img>"


def _png(seed: int, size=(90, 130)) -> Image.Image:
    return Image.fromarray((np.random.default_rng(seed).random((*size, 3)) * 255).astype(np.uint8))


def _data_uri(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _user(*parts):
    """Strings are text parts; PIL images and Paths are image parts."""
    return {"role": "user", "content": [{"type": "text", "text": p} if isinstance(p, str) else
                                        {"type": "image", "image": p} for p in parts]}


# ------------------------------------------------------------------------------------------------ messages
def test_parse_text_images_turns_and_data_uris(tmp_path):
    a, b = _png(0), _png(1)
    a.save(tmp_path / "a.png")
    conv = parse_messages([{"role": "user", "content": "hello"}])
    assert [(t.user, t.images, t.assistant) for t in conv.turns] == [("hello", (), None)]

    conv = parse_messages([
        {"role": "system", "content": "Be brief."},
        _user(tmp_path / "a.png", "compare", b, "please"),
        {"role": "assistant", "content": [{"type": "text", "text": "They differ."}]},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": _data_uri(a)}},
                                     {"type": "text", "text": "and this?"}]},
    ])
    first, second = conv.turns
    assert first.user == f"Be brief. {TAG} compare {TAG} please" and first.assistant == "They differ."
    assert second.user == f"{TAG} and this?" and second.assistant is None
    assert len(first.images) == 2 and len(second.images) == 1
    # the file bytes and the data URI of the same PNG bytes need not match, but the same source always does
    again = parse_messages([{"role": "user", "content": [{"type": "image", "image": str(tmp_path / "a.png")}]}])
    assert again.turns[0].images[0].key == first.images[0].key
    assert parse_messages([_user(a)]).turns[0].images[0].key == parse_messages([_user(a.copy())]).turns[0].images[0].key
    assert second.images[0].open().size == a.size


@pytest.mark.parametrize("messages, field", [
    ([], "messages"),
    ([{"role": "bot", "content": "x"}], "messages[0].role"),
    ([{"role": "user"}], "messages[0].content"),
    ([{"role": "user", "content": 3}], "messages[0].content"),
    ([{"role": "user", "content": [{"type": "video", "video": "x"}]}], "messages[0].content[0].type"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/y.png"}}]}],
     "messages[0].content[0].image_url.url"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@"}}]}],
     "messages[0].content[0].image_url.url"),
    ([{"role": "user", "content": [{"type": "image", "image": "/no/such.png"}]}], "messages[0].content[0].image"),
    ([{"role": "user", "content": [{"type": "text", "text": 5}]}], "messages[0].content[0].text"),
    ([{"role": "user", "content": "a <ImageHere> b"}], "messages[0].content"),
    ([{"role": "assistant", "content": "hi"}, {"role": "user", "content": "x"}], "messages[0].role"),
    ([{"role": "user", "content": "x"}, {"role": "system", "content": "s"}], "messages[1].role"),
    ([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], "messages[1].role"),
])
def test_bad_message_shapes_name_the_field(messages, field):
    with pytest.raises(UserError) as err:
        parse_messages(messages)
    assert str(err.value).startswith(field + ":"), str(err.value)


def test_settings_validate():
    with pytest.raises(UserError, match="top_p"):
        GenerationSettings(top_p=0)
    with pytest.raises(UserError, match="max_new_tokens"):
        GenerationSettings(max_new_tokens=0)
    assert GenerationSettings(stop="##").stop == ("##",)


# ------------------------------------------------------------------------------------------------ boxes and tasks
def test_answer_boxes_on_hand_written_answers():
    text = "<p>a cat</p> {<10><20><50><60>}<delim>{<0><0><100><100>} and <p>dog</p>{<50><50><40><90>} <1><2><3><4>"
    assert answer_boxes(text, 200, 100) == [("a cat", (20.0, 20.0, 100.0, 60.0)), ("a cat", (0.0, 0.0, 200.0, 100.0)),
                                            ("dog", (2.0, 2.0, 6.0, 4.0))]  # the inverted dog box is left out
    assert answer_boxes("no boxes here", 10, 10) == []


def test_task_prompts():
    assert task_prompt("vqa", "what colour?") == "[vqa] what colour?"
    assert task_prompt("caption") == "[caption] Briefly describe this image."
    assert task_prompt("grounding").startswith("[grounding] ")
    assert task_prompt("refer", "the red cup") == "[refer] the red cup"
    assert task_prompt("detection", "cats") == "[detection] cats"
    assert task_prompt("identify", box=(20, 10, 100, 50), size=(200, 100)) == "[identify] {<10><10><50><50>}"
    assert task_prompt("identify", "what is", (0, 0, 200, 100), (200, 100)) == "[identify] what is {<0><0><100><100>}"
    for bad in [("identify", None, None, None), ("vqa", None, None, None), ("nope", "x", None, None)]:
        with pytest.raises(UserError):
            task_prompt(*bad)


# ------------------------------------------------------------------------------------------------ two backends
@pytest.fixture(scope="module")
def engines(chat_model):
    """One engine per backend over the session's decisive tiny model (conftest.chat_model): PyTorch and its F16
    GGUF export (GGUF vision in fp32 so both see nearly the same vectors)."""
    from tinygpt.chat.gguf_backend import GGUFBackend
    from tinygpt.chat.torch_backend import TorchBackend
    from tinygpt.model import load_vlm

    model_dir, gguf_dir = chat_model
    return ChatEngine(TorchBackend(load_vlm(model_dir))), ChatEngine(GGUFBackend.load(gguf_dir, vision_int8=False))


def _conversations():
    a, b = _png(0), _png(1, (64, 64))
    return [
        [_user("Hello there")],
        [_user(a, "What is in the picture?")],
        [_user(a, "compare", b), {"role": "assistant", "content": "the same"}, _user("and now?", b)],
    ]


GREEDY = GenerationSettings(max_new_tokens=10)


def _talkative(engine):
    """The first test conversation this random model answers with some text (some prompts stop at once)."""
    for messages in _conversations():
        if len(engine.chat(messages, GREEDY)) >= 4:
            return messages
    pytest.skip("the random model answers every test conversation with (almost) nothing")


def test_pytorch_and_gguf_give_the_same_greedy_answers_and_streams(engines):
    torch_engine, gguf_engine = engines
    answers = []
    for messages in _conversations():
        want = torch_engine.chat(messages, GREEDY)
        answers.append(want)
        assert gguf_engine.chat(messages, GREEDY) == want
        for engine in engines:
            assert "".join(engine.stream(messages, GREEDY)) == want
    assert any(answers)  # random weights may stop at once on some prompts, not on all


def test_stop_strings_stop(engines):
    for engine in engines:
        messages = _talkative(engine)
        full = engine.chat(messages, GREEDY)
        stop = full[len(full) // 2: len(full) // 2 + 2]
        cut = full[: full.index(stop)]  # exactly the text before a user stop string (OpenAI, vLLM)
        settings = GREEDY.with_(stop=(stop,))
        assert engine.chat(messages, settings) == cut
        assert "".join(engine.stream(messages, settings)) == cut


def test_seeded_sampling_repeats(engines):
    for engine in engines:
        messages = _talkative(engine)
        hot = GREEDY.with_(temperature=1.5, top_p=1.0, seed=7)
        first = engine.chat(messages, hot)
        assert engine.chat(messages, hot) == first
        assert "".join(engine.stream(messages, hot)) == first
        others = {engine.chat(messages, hot.with_(seed=s)) for s in range(8, 12)}
        assert others - {first}, "different seeds never changed the sample"


def test_image_cache_encodes_one_image_once(engines):
    for engine in engines:
        calls = []
        real = engine.backend.encode_image
        engine.backend.encode_image = lambda im: calls.append(1) or real(im)
        try:
            image = _png(42)
            for q in ("what?", "where?", "why?"):
                engine.chat([_user(image, q)], GREEDY.with_(max_new_tokens=2))
            answer = engine.ask(image, "identify", box=(10, 10, 60, 40), settings=GREEDY.with_(max_new_tokens=2))
            assert answer.prompt == "[identify] {<7><11><46><44>}"  # 130 x 90 px
            engine.score([_user(image, "yes or no?")], ["yes", "no"])
        finally:
            del engine.backend.encode_image
        assert len(calls) == 1


def test_prepare_ahead_of_the_question_changes_no_answer_and_leaves_only_the_question(engines):
    """engine.prepare on the conversation so far plus the attached image (no text yet) encodes the image once; the
    answer to the question that follows is the one a cold chat gives, and on the GGUF runtime that question evaluates
    only its own tokens (the prompt up to the image's last row was evaluated by prepare)."""
    torch_engine, gguf_engine = engines
    history = [_user("Hello there"), {"role": "assistant", "content": "hi"}]
    for n, engine in enumerate(engines):
        image = _png(50 + n)
        want = engine.chat([*history, _user(image, "What is in the picture?")], GREEDY)
        fresh = _png(60 + n)  # not in the image cache, not in the KV cache
        cold = engine.chat([*history, _user(fresh, "What is in the picture?")], GREEDY)
        again = _png(60 + n)
        before = engine.encode_count
        engine.chat([_user("something else")], GREEDY.with_(max_new_tokens=1))  # the KV cache moves away
        engine.prepare([*history, {"role": "user", "content": [{"type": "image", "image": again}]}])
        assert engine.encode_count == before  # encoded by the cold chat above: cached, not encoded again
        other = _png(70 + n)
        engine.prepare([*history, {"role": "user", "content": [{"type": "image", "image": other}]}])
        assert engine.encode_count == before + 1
        assert engine.chat([*history, _user(again, "What is in the picture?")], GREEDY) == cold
        assert engine.chat([*history, _user(image, "What is in the picture?")], GREEDY) == want
    session = gguf_engine.backend.session
    image = _png(80)
    messages = [*history, {"role": "user", "content": [{"type": "image", "image": image}]}]
    gguf_engine.prepare(messages)
    prefix = session.llm.n_past
    gguf_engine.chat([*history, _user(image, "What is in the picture?")], GREEDY)
    question = len(session.tokenizer.encode("</Img> What is in the picture? ###Assistant: ",
                                            add_special_tokens=False).ids)
    assert session.last_stats.reused_tokens == prefix and session.last_stats.prompt_tokens == question
    assert session.fmt.image_token_count < prefix


def test_score_prefers_the_greedy_answer_and_backends_agree(engines):
    torch_engine, gguf_engine = engines
    tok = torch_engine.backend.tokenizer
    messages = _talkative(torch_engine)
    greedy = torch_engine.chat(messages, GenerationSettings(max_new_tokens=3))
    ids = tok(greedy, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == greedy
    # same prefix, a different last token: the greedy one must score highest
    others = [tok.decode(ids[:-1] + [t]) for t in (11, 1000, 5000)]
    others = [o for o in others if tok(o, add_special_tokens=False)["input_ids"][:-1] == ids[:-1]]
    candidates = [greedy, *others]
    got_torch = torch_engine.score(messages, candidates)
    got_gguf = gguf_engine.score(messages, candidates)
    assert all(s <= 0 for s in got_torch + got_gguf)
    assert int(np.argmax(got_torch)) == 0 and int(np.argmax(got_gguf)) == 0
    np.testing.assert_allclose(got_gguf, got_torch, atol=0.05 * len(ids), rtol=0.02)


def test_context_check_and_cancel(engines):
    for engine in engines:
        with pytest.raises(UserError, match="prompt too long"):
            engine.chat([_user("word " * (engine.context_length + 5))], GREEDY)
        with pytest.raises(UserError, match="prompt too long"):
            next(engine.stream([_user("word " * (engine.context_length + 5))], GREEDY))
        cancel = threading.Event()
        long = GenerationSettings(max_new_tokens=200)
        stream = engine.stream(_conversations()[0], long, cancel=cancel)
        first = next(stream)
        cancel.set()
        rest = list(stream)
        stats = engine.backend.last_stats  # a cancelled generation still counts what it generated (usage)
        assert stats.stopped_by == "cancelled" and 1 <= stats.generated_tokens < long.max_new_tokens, stats
        assert len(first + "".join(rest)) < len(engine.chat(_conversations()[0], long))
        stream = engine.stream(_conversations()[0], long)  # closing early releases the engine
        next(stream)
        stream.close()
        assert engine.chat(_conversations()[0], GREEDY)


def test_beams_are_pytorch_only(engines):
    torch_engine, gguf_engine = engines
    assert isinstance(torch_engine.chat(_conversations()[1], GREEDY.with_(num_beams=2)), str)
    with pytest.raises(UserError, match="num_beams"):
        gguf_engine.chat(_conversations()[1], GREEDY.with_(num_beams=2))
