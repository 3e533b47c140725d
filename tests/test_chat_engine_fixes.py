"""The PyTorch chat backend's counts, streaming and stop strings, on a tiny model whose answers are scripted.

`Script` forces the greedy choice of each step (a hook on the LM head), so an answer is exactly the token ids a test
asks for: 20 ``<`` tokens (whose text re-tokenizes to 10 ``<<``), a box ``{<66><36><91><60>}`` without a space, an
answer that ends with the end token or the model's ``###``. Covered: ``usage`` / ``finish_reason`` come from the ids
generated (`last_stats`, tinygpt.serve.usage.measure), streamed pieces arrive token by token (never half a UTF-8
character) and join to the answer, and a caller's stop string keeps the text before it exactly."""

from __future__ import annotations

import pytest

from tinygpt.chat import ChatEngine, GenerationSettings
from tinygpt.chat.backend import AnswerCutter, GenerationStats, PromptInfo
from tinygpt.chat.torch_backend import TorchBackend
from tinygpt.serve.usage import Usage, measure

EOS = 50256
LT = 27  # "<"; two of them re-tokenize to one "<<" (16791)
BOX = [90, 27, 2791, 6927, 2623, 6927, 6420, 6927, 1899, 29, 92]  # "{<66><36><91><60>}", one token each piece
NIHON = [33768, 98, 17312, 105]  # "日本": each character is two tokens, the first of which decodes to U+FFFD
SMALL_BLUE = [257, 1402, 4171, 9197, 13]  # " a small blue circle."
MARK = 21017  # "###", the tiny model's end symbol and stop string


class Script:
    """Forces each generation step's greedy token: row b of a batch follows rows[b] (its last id repeats)."""

    def __init__(self, model, *rows: list[int]):
        self.rows, self.step = list(rows), 0
        model.language_model.lm_head.register_forward_hook(self)

    def __call__(self, module, args, out):
        out = out.clone()
        for b in range(out.shape[0]):
            row = self.rows[min(b, len(self.rows) - 1)]
            out[b, -1] = -1e4
            out[b, -1, row[min(self.step, len(row) - 1)]] = 1e4
        self.step += 1
        return out


@pytest.fixture
def scripted(tiny_vlm):
    """(engine, script setter): `play(*rows)` scripts the next generation."""
    model = tiny_vlm()
    script = Script(model, [EOS])
    engine = ChatEngine(TorchBackend(model))

    def play(*rows):
        script.rows, script.step = list(rows), 0

    return engine, play


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def chat_and_stream(engine, play, rows, messages, settings):
    """(answer, streamed pieces, stats of the chat, stats of the stream) of one script."""
    play(*rows)
    answer = engine.chat(messages, settings)
    chat_stats = getattr(engine.backend, "last_stats", None)
    play(*rows)
    pieces = list(engine.stream(messages, settings))
    return answer, pieces, chat_stats, getattr(engine.backend, "last_stats", None)


# ------------------------------------------------------------------------------------------------ usage
def test_usage_counts_the_ids_generated_and_a_budget_stop_is_length(scripted):
    engine, play = scripted
    messages, settings = user("[grounding] describe this image in detail"), GenerationSettings(max_new_tokens=20)
    prompt = engine.backend.prompt_length(engine._encode(engine._conversation(messages)))
    answer, pieces, chat_stats, stream_stats = chat_and_stream(engine, play, [[LT]], messages, settings)
    assert answer == "<" * 20 and "".join(pieces) == answer
    conversation = engine._conversation(messages)
    assert measure(engine, conversation, answer, settings) == (Usage(prompt, 20), "length")  # not 10 "<<"
    assert chat_stats == stream_stats == GenerationStats(prompt, 20, "max_new_tokens")


def test_usage_when_the_context_fills(scripted):
    """max_tokens far beyond the room: the context ends the answer; prompt + completion = the context."""
    engine, play = scripted
    messages = user("word " * 1000)
    play([LT])
    answer = engine.chat(messages, GenerationSettings(max_new_tokens=5000))
    usage, finish = measure(engine, engine._conversation(messages), answer, GenerationSettings(max_new_tokens=5000))
    assert finish == "length" and usage.prompt_tokens + usage.completion_tokens == engine.context_length
    assert usage.completion_tokens == len(answer) > 1


@pytest.mark.parametrize("rows, want, generated, why", [
    ([BOX + [EOS]], "{<66><36><91><60>}", len(BOX) + 1, "eos"),  # the end token counts, as on the GGUF runtime
    ([SMALL_BLUE + [MARK]], "a small blue circle.", len(SMALL_BLUE) + 1, "stop string"),
    ([[EOS]], "", 1, "eos"),
])
def test_a_natural_stop_is_stop(scripted, rows, want, generated, why):
    engine, play = scripted
    messages, settings = user("[refer] the circle"), GenerationSettings(max_new_tokens=30)
    answer, pieces, chat_stats, stream_stats = chat_and_stream(engine, play, rows, messages, settings)
    assert answer == want and "".join(pieces) == want
    assert (chat_stats.generated_tokens, chat_stats.stopped_by) == (generated, why)
    assert stream_stats == chat_stats
    assert measure(engine, engine._conversation(messages), answer, settings)[1] == "stop"


def test_batch_rows_that_end_early_count_without_their_padding(scripted):
    engine, play = scripted
    backend = engine.backend
    short, long = user("Hi"), user("a much longer question about the picture, with many more words in it")
    play([LT, LT, EOS], [LT])  # row 0 ends after 3 ids (pad == eos here), row 1 runs to the budget
    answers = engine.chat_batch([short, long], GenerationSettings(max_new_tokens=9))
    assert answers == ["<<", "<" * 9]
    lengths = [backend.prompt_length(engine._encode(engine._conversation(m))) for m in (short, long)]
    assert backend.last_batch_stats == [GenerationStats(lengths[0], 3, "eos"),
                                        GenerationStats(lengths[1], 9, "max_new_tokens")]


# ------------------------------------------------------------------------------------------------ streaming
def test_a_box_streams_token_by_token(scripted):
    engine, play = scripted
    messages, settings = user("[refer] the circle"), GenerationSettings(max_new_tokens=30)
    answer, pieces, _, _ = chat_and_stream(engine, play, [BOX + [EOS]], messages, settings)
    assert pieces == ["{", "<", "66", "><", "36", "><", "91", "><", "60", ">", "}"]
    assert "".join(pieces) == answer


def test_no_piece_holds_half_a_character(scripted):
    engine, play = scripted
    messages, settings = user("Hello"), GenerationSettings(max_new_tokens=30)
    answer, pieces, _, _ = chat_and_stream(engine, play, [NIHON + [EOS]], messages, settings)
    assert pieces == ["日", "本"] and answer == "日本"


def test_a_long_answer_streams_in_many_pieces(scripted):
    engine, play = scripted
    answer, pieces, _, _ = chat_and_stream(engine, play, [[LT]], user("Hello"), GenerationSettings(max_new_tokens=40))
    assert len(pieces) == 40 and "".join(pieces) == answer == "<" * 40


# ------------------------------------------------------------------------------------------------ stop strings
PROMPT = PromptInfo("[INST] {} [/INST]", "###", ("###",), 32, 224)


@pytest.mark.parametrize("raw, stops, want", [
    (" <p>a small blue circle</p>###", ("blue circle",), "<p>a small "),  # the caller's: exactly the text before
    (" <p>a small blue circle</p>###", (), "<p>a small blue circle</p>"),
    (" a small ###", ("blue",), "a small"),  # the model's own end: its formatting whitespace dropped
    (" a small ###", ("###",), "a small"),  # the caller repeats the model's end symbol: still the model's own
    ("a small \n", ("\n",), "a small "),
    (" a small  ", ("blue",), "a small"),  # no stop string: the end token or the budget ended it
    ("a small blue", ("small",), "a "),
])
def test_answer_cutter(raw, stops, want):
    assert AnswerCutter(PROMPT, stops).answer(raw) == want
    for step in (1, 2, 3):  # streamed as the text grows, in pieces of a few characters
        cutter, pieces = AnswerCutter(PROMPT, stops), []
        for end in range(step, len(raw) + step, step):
            pieces.append(cutter.update(raw[:end]))
            if cutter.stopped:
                break
        else:
            pieces.append(cutter.update(raw, final=True))
        assert "".join(pieces) == want


def test_end_symbol_as_a_caller_stop_keeps_evaluation_answers():
    """tinygpt.evaluation.predict adds the end symbol to `stop` when the model's stop strings lack it (a blank end
    symbol such as stage 1's newline): it stays the model's own end, whitespace before it dropped."""
    blank = PromptInfo("{}", "\n", (), 32, 224)
    assert AnswerCutter(blank, ("\n",)).answer("a red circle \nmore") == "a red circle"
    assert AnswerCutter(blank, ()).answer(" a red circle \n") == "a red circle"


def test_a_callers_stop_string_keeps_the_text_before_it(scripted):
    engine, play = scripted
    messages = user("[grounding] describe this image in detail")
    settings = GenerationSettings(max_new_tokens=30, stop=("blue circle",))
    answer, pieces, stats, _ = chat_and_stream(engine, play, [SMALL_BLUE + [MARK]], messages, settings)
    assert answer == "a small " and "".join(pieces) == answer
    assert stats.stopped_by == "stop string" and stats.generated_tokens == 4
    plain, pieces, _, _ = chat_and_stream(engine, play, [SMALL_BLUE + [MARK]], messages, settings.with_(stop=()))
    assert plain == "a small blue circle." and "".join(pieces) == plain
