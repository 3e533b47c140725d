"""`ChatEngine`: the one way the demo, the server, the CLI chat, evaluation and tests talk to a model.

    engine = ChatEngine.from_gguf("out/gguf")             # or ChatEngine.from_model_dir("runs/stage4/final")
    engine.chat([{"role": "user", "content": [{"type": "image", "image": "cat.png"},
                                              {"type": "text", "text": "What is it?"}]}])
    engine.chat_batch([messages_a, messages_b])            # answers in order, batched where the backend can
    for piece in engine.stream(messages, GenerationSettings(temperature=0.7, seed=1)): ...
    engine.score(messages, ["yes", "no"])                  # summed log-probabilities, for metrics
    engine.prepare([{"role": "user", "content": [{"type": "image", "image": "cat.png"}]}])  # ahead of the question
    engine.ask("cat.png", "refer", "the cat")              # TaskAnswer(text, boxes in pixels)
    engine.complete("Once upon a time", GenerationSettings(max_new_tokens=20))   # raw text continued, no template

Contract:
* messages are OpenAI content-part dicts (`tinygpt.chat.messages`) or an already parsed `Conversation`;
* images are encoded once per content (sha256 of the file / data-URI bytes or of the pixels) and kept in a bounded
  least-recently-used cache (`image_cache_size`; images of the conversations being answered are never evicted);
* before generating, the prompt's length is checked against the context: a UserError says how long it is;
  `max_new_tokens` is cut to the room left;
* `chat_batch` gives, with greedy settings, the same answers as `chat` on each conversation; the images of the whole
  batch are encoded together (`encode_images` where the backend has it) and the answers generated together
  (`generate_batch` where the backend has it, else one `generate` per conversation);
* one generation at a time per engine (a lock; a stream holds it until it is exhausted, closed or cancelled);
* `stream(..., cancel=event)` stops at the next token once `event` is set; closing the iterator does the same;
  `chat(..., cancel=event)` stops at the next step too (beam search included: the server's way to cancel it);
* `complete(prompt)` / `complete_stream(prompt)`: a raw prompt continued as it is (no template, no images; [BOS] and
  its tokens), stopping at the end token, the budget or `settings.stop` only, the text exactly as generated
  (tinygpt.chat.backend: `text_length`, `generate_text`, `stream_text`); the same context check and cancelling;
* `prepare(messages)` encodes the images before the question is known and, on the GGUF runtime, evaluates the prompt
  up to the last image: what the question then waits for is its own tokens.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence

from ..errors import UserError
from ..tasks import CAPTION_PROMPTS, GROUNDING_PROMPTS, TASKS, format_box
from .backend import ChatBackend, EncodedTurn, encoded_turns
from .boxes import PixelBox, answer_boxes
from .messages import Conversation, ImageRef, check_unicode, image_ref, parse_messages
from .settings import GenerationSettings

BOX_TASKS = ("refer", "grounding", "detection")  # tasks whose answers carry boxes


@dataclass(frozen=True)
class TaskAnswer:
    text: str
    boxes: list[tuple[Optional[str], PixelBox]]  # pixel boxes of the image asked about (BOX_TASKS only)
    prompt: str


def task_prompt(task: str, text: str | None = None, box: PixelBox | None = None,
                size: tuple[int, int] | None = None) -> str:
    """The tagged instruction of a task, in the training wording (tinygpt.tasks).

    vqa / refer / detection need `text` (the question, the phrase, the object list); caption and grounding use
    their first training instruction unless `text` is given; identify needs `box` (pixels of an image of `size`
    (width, height)), written on the 0-100 grid: ``[identify] {<x1><y1><x2><y2>}`` (after `text` when given)."""
    if task not in TASKS:
        raise UserError(f"task: expected one of {', '.join(TASKS)}, got {task!r}")
    text = (text or "").strip()
    if task == "identify":
        if box is None or size is None:
            raise UserError("box: the identify task needs a box (x1, y1, x2, y2) in pixels")
        try:
            values = tuple(float(v) for v in box)
        except (TypeError, ValueError):
            values = ()
        if len(values) != 4 or not all(math.isfinite(v) for v in values):
            raise UserError(f"box: expected (x1, y1, x2, y2), four finite numbers, got {box!r}")
        box_text = format_box(values, size[0], size[1])  # type: ignore[arg-type]
        return f"[identify] {text} {box_text}" if text else f"[identify] {box_text}"
    if text:
        return f"[{task}] {text}"
    if task == "caption":
        return CAPTION_PROMPTS[0]
    if task == "grounding":
        return GROUNDING_PROMPTS[0]
    raise UserError(f"text: the {task} task needs a text (the question or phrase)")


class ChatEngine:
    def __init__(self, backend: ChatBackend, settings: GenerationSettings | None = None, image_cache_size: int = 64):
        if image_cache_size < 1:
            raise UserError(f"image_cache_size: must be >= 1, got {image_cache_size}")
        self.backend = backend
        self.settings = settings or GenerationSettings()
        self.image_cache_size = image_cache_size
        self._images: OrderedDict[str, Any] = OrderedDict()
        self.encode_count = 0  # images actually encoded (cache misses)
        self._lock = threading.Lock()

    @classmethod
    def from_model_dir(cls, model_dir, device: str = "auto", bits: int | None = None, **engine_options) -> "ChatEngine":
        """The PyTorch backend over a saved model directory (bits 8/4: bitsandbytes, GPU or CPU)."""
        from .torch_backend import TorchBackend

        return cls(TorchBackend.load(model_dir, device=device, bits=bits), **engine_options)

    @classmethod
    def from_gguf(cls, gguf_dir, session_options: dict | None = None, **engine_options) -> "ChatEngine":
        """The GGUF CPU runtime over an exported directory (options go to quantize.session.open_session)."""
        from .gguf_backend import GGUFBackend

        return cls(GGUFBackend.load(gguf_dir, **(session_options or {})), **engine_options)

    # ---- facts the demo and server show ----------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.backend.name

    @property
    def context_length(self) -> int:
        return self.backend.context_length

    @property
    def stop_strings(self) -> tuple[str, ...]:
        return self.backend.prompt.stop_strings

    # ---- the conversation ------------------------------------------------------------------------------------------
    def _encode_images(self, images: list) -> list[Any]:
        batched = getattr(self.backend, "encode_images", None)
        if batched is not None and len(images) > 1:
            return list(batched(images))
        return [self.backend.encode_image(image) for image in images]

    def _encode_many(self, conversations: Sequence[Conversation]) -> list[list[EncodedTurn]]:
        """Encoded turns of each conversation; images come from the cache, the misses of all of them are encoded
        together (each content once) and cached (caller holds the lock)."""
        refs = [ref for conversation in conversations for ref in conversation.images]
        misses: dict[str, ImageRef] = {}
        for ref in refs:
            if ref.key in self._images:
                self._images.move_to_end(ref.key)
            else:
                misses.setdefault(ref.key, ref)
        if misses:
            handles = self._encode_images([ref.open() for ref in misses.values()])
            self._images.update(zip(misses, handles))
            self.encode_count += len(misses)
        encoded = [encoded_turns(c.turns, [self._images[ref.key] for ref in c.images]) for c in conversations]
        needed = {ref.key for ref in refs}
        for key in list(self._images):
            if len(self._images) <= self.image_cache_size:
                break
            if key not in needed:
                self.backend.release_image(self._images.pop(key))
        return encoded

    def _encode(self, conversation: Conversation) -> list[EncodedTurn]:
        return self._encode_many([conversation])[0]

    @staticmethod
    def _conversation(messages) -> Conversation:
        conversation = messages if isinstance(messages, Conversation) else parse_messages(messages)
        if conversation.turns[-1].assistant is not None:
            raise UserError("messages: the last message must be a user message")
        return conversation

    def _fit(self, turns: list[EncodedTurn], settings: GenerationSettings, where: str = "") -> GenerationSettings:
        """`settings` with max_new_tokens cut to the room the prompt leaves; a UserError when there is none."""
        return self._fit_length(self.backend.prompt_length(turns), settings, where)

    def _fit_length(self, length: int, settings: GenerationSettings, where: str = "",
                    what: str = "the conversation") -> GenerationSettings:
        if length >= self.context_length:
            raise UserError(f"{where}prompt too long: {what} needs {length} positions and the model's "
                            f"context holds {self.context_length}, which must leave at least one position for the "
                            "answer (start a new conversation or shorten it)")
        room = self.context_length - length
        return settings.with_(max_new_tokens=room) if settings.max_new_tokens > room else settings

    def _prepare(self, messages, settings: GenerationSettings | None) -> tuple[list[EncodedTurn], GenerationSettings]:
        turns = self._encode(self._conversation(messages))
        return turns, self._fit(turns, settings or self.settings)

    # ---- the entry points -------------------------------------------------------------------------------------------
    def prepare(self, messages) -> None:
        """Do the work of `messages` that the question typed next does not change, ahead of it: encode (and cache) the
        images, and where the backend can (`prefill_images`), evaluate the prompt up to the last image. The demo calls
        it when an image is attached, the terminal chat on /image; a following chat/stream of the same messages plus
        the question then only evaluates the question. The last user message may hold images and no text."""
        conversation = self._conversation(messages)
        with self._lock:
            turns = self._encode(conversation)
            prefill = getattr(self.backend, "prefill_images", None)
            if prefill is not None and self.backend.prompt_length(turns) < self.context_length:
                prefill(turns)

    def chat(self, messages, settings: GenerationSettings | None = None, cancel: threading.Event | None = None) -> str:
        """The assistant's answer to the last user message; with `cancel`, the generation (beam search too) stops at
        its next step once the event is set, and the answer is the text so far."""
        with self._lock:
            turns, settings = self._prepare(messages, settings)
            if cancel is None:  # a backend of the older protocol takes no `cancel`
                return self.backend.generate(turns, settings)
            return self.backend.generate(turns, settings, cancel)

    def chat_batch(self, conversations: Sequence[Any], settings: GenerationSettings | None = None) -> list[str]:
        """The answers to several conversations (messages or `Conversation`s), in order: with greedy settings the
        same as `chat` on each. One lock hold; every conversation is checked before anything is generated (a
        UserError names ``conversations[i]``); the images of all are encoded together, each content once. Backends
        with `generate_batch` answer a group of conversations at once (those whose max_new_tokens the context cuts
        form groups of their own), others one by one. With sampling, a batch is one draw (seeded once)."""
        single = isinstance(conversations, (str, dict, Conversation))
        conversations = [] if single else list(conversations)  # a generator: the check below would use it up
        if single or any(isinstance(c, dict) for c in conversations):
            raise UserError("conversations: expected a list of conversations, each a list of messages")
        with self._lock:
            parsed = []
            for i, messages in enumerate(conversations):
                try:
                    parsed.append(self._conversation(messages))
                except UserError as exc:
                    raise UserError(f"conversations[{i}]: {exc}") from None
            encoded = self._encode_many(parsed)
            base = settings or self.settings
            fitted = [self._fit(turns, base, f"conversations[{i}]: ") for i, turns in enumerate(encoded)]
            groups: dict[GenerationSettings, list[int]] = {}
            for i, item_settings in enumerate(fitted):
                groups.setdefault(item_settings, []).append(i)
            answers: list[str] = [""] * len(encoded)
            batched = getattr(self.backend, "generate_batch", None)
            for item_settings, members in groups.items():
                if batched is not None:
                    texts = batched([encoded[i] for i in members], item_settings)
                else:
                    texts = [self.backend.generate(encoded[i], item_settings) for i in members]
                for i, text in zip(members, texts):
                    answers[i] = text
            return answers

    def stream(self, messages, settings: GenerationSettings | None = None,
               cancel: threading.Event | None = None) -> Iterator[str]:
        """The same answer as `chat`, in pieces. Bad message shapes raise here; a too-long prompt raises at the
        first next() (the engine lock is taken there and held until the stream ends, is closed or cancelled)."""
        conversation = messages if isinstance(messages, Conversation) else parse_messages(messages)
        return self._stream(conversation, settings, cancel)

    def _stream(self, conversation: Conversation, settings, cancel) -> Iterator[str]:
        with self._lock:
            turns, settings = self._prepare(conversation, settings)
            yield from _closing(self.backend.stream(turns, settings, cancel))

    # ---- a raw prompt: text completion ------------------------------------------------------------------------
    def complete(self, prompt: str, settings: GenerationSettings | None = None,
                 cancel: threading.Event | None = None) -> str:
        """The model's continuation of `prompt` as it is: no chat template, no images (the layout's start: [BOS] and
        the prompt's tokens); it stops at the end token, the budget or `settings.stop` (not at the model's own stop
        strings, which belong to its chat template) and comes back exactly as generated, whitespace included.
        `cancel` stops it at the next step (beam search too)."""
        with self._lock:
            settings = self._fit_text(prompt, settings)
            return self.backend.generate_text(prompt, settings, cancel)

    def complete_stream(self, prompt: str, settings: GenerationSettings | None = None,
                        cancel: threading.Event | None = None) -> Iterator[str]:
        """`complete` in pieces (their join equals it), as `stream` gives `chat`; a bad prompt raises here."""
        self._check_prompt(prompt)
        return self._complete_stream(prompt, settings, cancel)

    def _complete_stream(self, prompt: str, settings, cancel) -> Iterator[str]:
        with self._lock:
            settings = self._fit_text(prompt, settings)
            yield from _closing(self.backend.stream_text(prompt, settings, cancel))

    def _check_prompt(self, prompt: str) -> None:
        if not isinstance(prompt, str):
            raise UserError(f"prompt: expected a string, got {type(prompt).__name__}")
        check_unicode(prompt, "prompt")  # a lone UTF-16 surrogate: no tokenizer takes it
        if not hasattr(self.backend, "stream_text"):
            raise UserError(f"prompt: the backend {self.name} cannot continue a raw prompt")

    def _fit_text(self, prompt: str, settings: GenerationSettings | None) -> GenerationSettings:
        self._check_prompt(prompt)
        return self._fit_length(self.backend.text_length(prompt), settings or self.settings, what="the prompt")

    def score(self, messages, candidates: Sequence[str]) -> list[float]:
        """Summed log-probability of each candidate as the answer to the last user message (each <= 0)."""
        texts = None if isinstance(candidates, str) else list(candidates)  # a generator: read once
        if texts is None or not all(isinstance(c, str) and c for c in texts):
            raise UserError("candidates: expected a list of non-empty strings")
        with self._lock:
            return self.backend.score(self._encode(self._conversation(messages)), texts)

    def ask(self, image, task: str, text: str | None = None, box: PixelBox | None = None,
            settings: GenerationSettings | None = None) -> TaskAnswer:
        """One tagged question about one image (PIL image, path or data URI); boxes in the answer come back in
        pixels of that image."""
        ref: ImageRef = image_ref(image)
        size = ref.open().size
        prompt = task_prompt(task, text, box, size)
        messages = [{"role": "user", "content": [{"type": "image", "image": ref}, {"type": "text", "text": prompt}]}]
        answer = self.chat(messages, settings)
        boxes = answer_boxes(answer, *size) if task in BOX_TASKS else []
        return TaskAnswer(answer, boxes, prompt)


def _closing(pieces: Iterator[str]) -> Iterator[str]:
    """`pieces`, closed when the caller stops early (the backend's generation ends with it)."""
    try:
        yield from pieces
    finally:
        close = getattr(pieces, "close", None)
        if close is not None:
            close()
