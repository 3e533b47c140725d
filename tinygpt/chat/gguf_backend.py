"""The GGUF CPU backend: `quantize.session.ChatSession` (ggml decoder, PyTorch int8 vision, KV-cache reuse).

* an image is encoded once by the session's vision encoder and added to the session (`add_image`); its handle is
  its index there, so the same image keeps the same index and the KV cache is reused across calls (a follow-up
  question, or another question about the same image, evaluates only its own tokens);
* `generate` / `stream` set the session's sampler and stop strings for the call and run `ChatSession.respond`
  (`generate` with a `cancel` event runs the stream); `generate_text` / `stream_text` run `ChatSession.complete`, a
  raw prompt continued as it is (tinygpt.chat.backend), through the same stream;
  `generate_batch` and `encode_images` are loops (the runtime decodes one sequence at a time; the KV cache reuse
  makes a batch of questions about one image cheap);
  streaming runs it in a worker thread that hands the text over through a queue, and cancelling stops the decode
  loop at the next token;
* the session cuts the text off at a stop string; a matcher that remembers the text it found one in (`_Remembering`)
  gives `AnswerCutter` that text, which tells the caller's stop strings (the text before them kept exactly) from
  the model's own (whitespace before them dropped);
* `last_stats` is the session's own count of the last call (`ChatSession.last_stats`) as a `GenerationStats`;
* `score` is `ChatSession.score`: the prompt once, then each candidate's tokens after it, the cache cut back between
  candidates. Beam search is not available here (a UserError).
"""

from __future__ import annotations

import os
import queue
import threading
from typing import Iterator, Sequence

import numpy as np
from PIL import Image

from quantize.sampler import Sampler, SamplingParams, StopMatcher
from quantize.session import ChatSession, Turn, open_session

from ..data.image import ImageTransform
from ..errors import UserError
from .backend import AnswerCutter, EncodedTurn, GenerationStats, PromptInfo
from .settings import GenerationSettings


class _Cancelled(Exception):
    pass


class _Remembering(StopMatcher):
    """A StopMatcher that keeps the last text it found a stop string in (`hit`): the session stops there."""

    hit: str | None = None

    def find(self, text: str) -> int:
        cut = super().find(text)
        if cut >= 0:
            self.hit = text
        return cut


class GGUFBackend:
    def __init__(self, session: ChatSession, name: str = "gguf"):
        self.session = session
        fmt = session.fmt
        vision = session.vision
        size = int(vision.image_size) if vision is not None else 0
        self.prompt = PromptInfo(fmt.prompt_template, fmt.end_sym, tuple(fmt.stop_strings), fmt.image_token_count,
                                 size)
        self.context_length = int(session.llm.n_ctx)
        self.name = name
        self.transform = None
        if vision is not None:
            self.transform = ImageTransform(size)
            self.transform.mean = self.transform.mean.new_tensor(vision.mean).view(3, 1, 1)
            self.transform.std = self.transform.std.new_tensor(vision.std).view(3, 1, 1)

    @classmethod
    def load(cls, gguf_dir: str | os.PathLike, **session_options) -> "GGUFBackend":
        """open_session(gguf_dir, **session_options) (backend, qtype, n_ctx, n_threads, vision_int8, quiet...)."""
        session_options.setdefault("quiet", True)
        session = open_session(gguf_dir, **session_options)
        return cls(session, name=f"gguf:{os.fspath(gguf_dir)} ({type(session.llm).__name__})")

    # ---- images ----------------------------------------------------------------------------------------------
    def encode_image(self, image: Image.Image) -> int:
        if self.transform is None:
            raise UserError("image: this GGUF session has no vision model (vision.gguf was not loaded)")
        vectors = self.session.vision.encode_pixels(self.transform(image)[None])
        return self.session.add_image(vectors)

    def encode_images(self, images: Sequence[Image.Image]) -> list[int]:
        return [self.encode_image(image) for image in images]

    def release_image(self, handle: int) -> None:
        # indices are never reused, so a freed slot cannot alias another image in the KV cache
        self.session.image_vectors[handle] = np.zeros((0,), np.float32)

    # ---- prompt ------------------------------------------------------------------------------------------------
    def _turns(self, turns: Sequence[EncodedTurn]) -> list[Turn]:
        placeholder = self.session.fmt.image_placeholder
        return [Turn(t.user.replace("<ImageHere>", placeholder), list(t.images), t.assistant) for t in turns]

    def prefill_images(self, turns: Sequence[EncodedTurn]) -> None:
        """Evaluate the prompt of `turns` up to its last image (ChatSession.prefill_images), ahead of the question."""
        self.session.prefill_images(self._turns(turns))

    def prompt_length(self, turns: Sequence[EncodedTurn]) -> int:
        return len(self.session.layout(self._turns(turns)))

    @property
    def last_stats(self) -> GenerationStats:
        """The runtime's count of the last call: prompt positions (reused from the cache or evaluated), tokens
        generated (the end token included) and why it stopped ("" when cancelled)."""
        stats = self.session.last_stats
        return GenerationStats(stats.reused_tokens + stats.prompt_tokens, stats.generated_tokens,
                               stats.stopped_by or "cancelled")

    def _raw(self, text: str) -> str:
        """The generated text with the stop string that ended it (the session cut it off), else `text`."""
        hit = getattr(self.session.stop, "hit", None)
        return hit if self.session.last_stats.stopped_by == "stop string" and hit is not None else text

    def _configure(self, settings: GenerationSettings, continuation: bool = False) -> list[str]:
        if settings.num_beams > 1:
            raise UserError("num_beams: beam search is available with the PyTorch backend only")
        params = SamplingParams(temperature=settings.temperature, top_p=settings.top_p, top_k=settings.top_k,
                                repetition_penalty=settings.repetition_penalty,
                                max_new_tokens=settings.max_new_tokens, seed=settings.seed)
        stops = ([] if continuation else list(self.prompt.stop_strings)) + list(settings.stop)
        s = self.session
        s.sampling, s.sampler, s.stop = params, Sampler(params), _Remembering(stops)
        return stops

    # ---- generation ------------------------------------------------------------------------------------------
    def generate(self, turns: Sequence[EncodedTurn], settings: GenerationSettings,
                 cancel: threading.Event | None = None) -> str:
        if cancel is not None:  # the stream stops at the next token once it is set
            return "".join(self.stream(turns, settings, cancel))
        self._configure(settings)
        text = self.session.respond(self._turns(turns))
        return AnswerCutter(self.prompt, settings.stop).answer(self._raw(text))

    def generate_batch(self, conversations: Sequence[Sequence[EncodedTurn]], settings: GenerationSettings) -> list[str]:
        """One conversation after another: the KV cache keeps the common prefix, so questions about the same image
        in a row evaluate only their own tokens."""
        return [self.generate(turns, settings) for turns in conversations]

    def stream(self, turns: Sequence[EncodedTurn], settings: GenerationSettings,
               cancel: threading.Event | None = None) -> Iterator[str]:
        session_turns = self._turns(turns)
        return self._stream(lambda on_text: self.session.respond(session_turns, on_text), settings, cancel)

    # ---- a raw prompt (tinygpt.chat.backend): ChatSession.complete -------------------------------------------------
    def text_length(self, prompt: str) -> int:
        return len(self.session.text_items(prompt))

    def generate_text(self, prompt: str, settings: GenerationSettings, cancel: threading.Event | None = None) -> str:
        return "".join(self.stream_text(prompt, settings, cancel))

    def stream_text(self, prompt: str, settings: GenerationSettings,
                    cancel: threading.Event | None = None) -> Iterator[str]:
        return self._stream(lambda on_text: self.session.complete(prompt, on_text), settings, cancel,
                            continuation=True)

    def _stream(self, respond, settings: GenerationSettings, cancel: threading.Event | None,
                continuation: bool = False) -> Iterator[str]:
        """The pieces of `respond(on_text)` (the session's generation, run on a worker thread) as they come."""
        self._configure(settings, continuation)
        pieces: queue.Queue = queue.Queue()
        halt = threading.Event()
        done = object()

        def on_text(piece: str) -> None:
            if halt.is_set() or (cancel is not None and cancel.is_set()):
                raise _Cancelled
            pieces.put(piece)

        def work():
            try:
                respond(on_text)
            except _Cancelled:
                pass
            except BaseException as exc:  # handed to the consumer
                pieces.put(exc)
            pieces.put(done)

        worker = threading.Thread(target=work, name="tinygpt-chat-gguf", daemon=True)
        cutter = AnswerCutter(self.prompt, settings.stop, continuation)
        raw = ""
        worker.start()
        try:
            while True:
                item = pieces.get()
                if item is done:
                    piece = cutter.update(self._raw(raw), final=True)
                    if piece:
                        yield piece
                    break
                if isinstance(item, BaseException):
                    raise item
                raw += item
                piece = cutter.update(raw)
                if piece:
                    yield piece
                if cancel is not None and cancel.is_set():
                    break
        finally:
            halt.set()
            worker.join()

    def score(self, turns: Sequence[EncodedTurn], candidates: Sequence[str]) -> list[float]:
        return self.session.score(self._turns(turns), candidates)
