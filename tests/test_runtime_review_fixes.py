"""CPU runtime: regressions found in review (quantize/ session, backends, files)."""
from __future__ import annotations

import re
import signal
import struct
import threading

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
ggml_llm = pytest.importorskip("quantize.ggml_llm")

from gguf_reference import image_vectors  # noqa: E402

from quantize import gguf_names as names  # noqa: E402
from quantize.gguf_file import chat_format, open_gguf  # noqa: E402
from quantize.gguf_tokenizer import load_tokenizer  # noqa: E402
from quantize.sampler import SamplingParams  # noqa: E402
from quantize.session import ChatSession  # noqa: E402


def _session(path) -> ChatSession:
    f = open_gguf(path, names.ARCH_LLM)
    return ChatSession(llm=ggml_llm.GgmlLLM(f, kv_type="f32"), tokenizer=load_tokenizer(f), fmt=chat_format(f),
                       sampling=SamplingParams(temperature=0.0, repetition_penalty=1.0, max_new_tokens=4))


def _first_logits(session: ChatSession) -> list:
    seen, inner = [], session.sampler

    def spy(logits, previous=()):
        seen.append(np.array(logits))
        return inner(logits, previous)

    session.sampler = spy
    return seen


class _Cancel(Exception):
    pass


def _cancel(_text):
    raise _Cancel


def test_an_image_of_a_cancelled_turn_does_not_leave_its_rows_for_the_next_image(llm_files):
    """A cancelled answer forgets its image, so the next image gets the same index: the KV cache must not serve the
    forgotten image's rows for it (it did: the next answer was computed over the wrong image)."""
    s = _session(llm_files["f32"])
    with pytest.raises(_Cancel):
        s.ask("what is it?", images=[image_vectors(1)], on_text=_cancel)
    assert s.image_vectors == []
    seen = _first_logits(s)
    s.ask("what is it?", images=[image_vectors(2)])
    fresh = _session(llm_files["f32"])
    want = _first_logits(fresh)
    fresh.ask("what is it?", images=[image_vectors(2)])
    assert np.abs(seen[0] - want[0]).max() < 1e-4
    first_row = next(k for k, item in enumerate(s.layout(s.turns)) if isinstance(item, tuple))
    assert s.last_stats.reused_tokens <= first_row  # the new image's rows were evaluated, not taken from the cache


class _SlowPrepare:
    """A session whose prepare() runs until `release` is set."""

    def __init__(self):
        self.started, self.release, self.done = threading.Event(), threading.Event(), False

    def prepare(self, paths):
        self.started.set()
        self.release.wait(10)
        self.done = True
        return list(range(len(paths)))


def test_ctrl_c_while_waiting_for_an_attached_image_keeps_waiting_for_it_next_time():
    """Ctrl-C while a question waited for its image's prefill dropped that job: the next question then ran the model
    while the worker thread was still prefilling the image into the same KV cache."""
    from quantize.chat import Attachments

    session = _SlowPrepare()
    attached = Attachments(session)
    # Python's own Ctrl-C handler, as `python -m quantize chat` has it: another test in this worker process may have
    # left its own (gradio's server installs one), and then no KeyboardInterrupt comes
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        attached.add(["a.png"])
        assert session.started.wait(10)
        # to the waiting thread itself: a signal sent to the process may land on another thread, which leaves this
        # one blocked in its lock until the prefill ends
        threading.Timer(0.2, signal.pthread_kill, (threading.get_ident(), signal.SIGINT)).start()
        with pytest.raises(KeyboardInterrupt):
            attached.take()
        threading.Timer(0.2, session.release.set).start()
        assert attached.take() == [0] and session.done  # the next question waits for the prefill
    finally:
        signal.signal(signal.SIGINT, previous)
        session.release.set()
        attached.close()


def _gguf_string(text: str) -> bytes:
    return struct.pack("<Q", len(text.encode())) + text.encode()


def test_a_gguf_file_with_alignment_zero_is_one_user_error(tmp_path):
    """general.alignment = 0 (wrong metadata) raised a bare ZeroDivisionError instead of naming the damaged file."""
    from tinygpt.errors import UserError

    kv = (_gguf_string("general.architecture") + struct.pack("<I", 8) + _gguf_string(names.ARCH_LLM)
          + _gguf_string("general.alignment") + struct.pack("<II", 4, 0))
    path = tmp_path / "llm-q8_0.gguf"
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 2) + kv)
    with pytest.raises(UserError, match="general.alignment"):
        open_gguf(path, names.ARCH_LLM)


@pytest.mark.parametrize("override, message", [({"layers": 1}, "block_count=1 but the file has tensors of block 1"),
                                               ({"heads": 0}, "must be at least 1"),
                                               ({"rot": 23}, "rope 23: an even count")])
def test_a_block_head_or_rope_count_that_does_not_fit_is_one_user_error(tmp_path, tiny_weights, override, message):
    """block_count 1 in a file of 2 blocks was accepted (the runtime silently ran one block: garbage); head_count 0
    raised a bare ZeroDivisionError; an odd rope dimension count aborted the process in ggml (GGML_ASSERT)."""
    from gguf_reference import T, write_llm_gguf
    from tinygpt.errors import UserError

    from quantize.gguf_file import llm_hyperparams

    path = write_llm_gguf(tmp_path / "llm-f32.gguf", tiny_weights, T.F32, **override)
    with pytest.raises(UserError, match=re.escape(message)):
        llm_hyperparams(open_gguf(path, names.ARCH_LLM))
