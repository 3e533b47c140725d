"""A chat session over an exported GGUF pair: turns, images, prompt template, KV-cache reuse, streaming.

The conversation is laid out exactly as training lays it out (tinygpt/model/sequence.py):

    [BOS] template(user_0) answer_0 end_sym [BOS] template(user_1) answer_1 end_sym ... [BOS] template(user_n)

and every <ImageHere> in a user text is replaced by that image's 32 vectors. Each turn the whole layout is rebuilt,
compared with what the KV cache already holds, the cache is cut back to the common prefix and only the rest is
evaluated, so a follow-up question costs only its own tokens and the result equals one long prefill.
"""
from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from tinygpt.errors import UserError
from tinygpt.tasks import IMAGE_TAG

from . import gguf_names as names
from .gguf_file import (ChatFormat, chat_format, check_pair, find_llm_file, find_vision_file,
                        llm_hyperparams, open_gguf, vision_values)
from .cli_checks import check_ctx
from .engine_choice import chosen_qtype, load_language_model
from .gguf_tokenizer import load_tokenizer
from .llm_backend import LLMBackend
from .sampler import Sampler, SamplingParams, StopMatcher

if TYPE_CHECKING:
    from .vision_runtime import VisionEncoder

@dataclass
class Turn:
    user: str
    images: list[int]  # indices into ChatSession.image_vectors
    answer: str | None = None


@dataclass
class TurnStats:
    image_encode_s: float = 0.0
    prompt_tokens: int = 0  # positions evaluated for this turn's prompt (after cache reuse)
    reused_tokens: int = 0  # positions kept from the cache
    prefill_s: float = 0.0
    first_token_s: float = 0.0  # from ask() to the first generated token (image encoding included)
    generated_tokens: int = 0
    decode_s: float = 0.0
    stopped_by: str = ""

    @property
    def decode_tokens_per_s(self) -> float:
        return (self.generated_tokens - 1) / self.decode_s if self.decode_s > 0 and self.generated_tokens > 1 else 0.0


@dataclass
class ChatSession:
    llm: LLMBackend  # GgmlLLM / TorchLLM / LlamaCppLLM
    tokenizer: object  # tokenizers.Tokenizer
    fmt: ChatFormat
    vision: VisionEncoder | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)
    turns: list[Turn] = field(default_factory=list)
    image_vectors: list[np.ndarray] = field(default_factory=list)
    _cached: list = field(default_factory=list)  # items in the KV cache: token id (int) or (image index, row)
    last_stats: TurnStats = field(default_factory=TurnStats)
    llm_path: str | None = None  # the llm-<qtype>.gguf open_session chose (of several in a directory)

    def __post_init__(self):
        self.sampler = Sampler(self.sampling)
        self.stop = StopMatcher(self.fmt.stop_strings)

    # -------------------------------------------------------------------------------------------- images
    def add_image(self, image) -> int:
        """Encode an image (path or [Q, H] vectors) once; returns its index for ask(images=...)."""
        if isinstance(image, np.ndarray):
            vecs = np.asarray(image, dtype=np.float32)
        else:
            if self.vision is None:
                raise UserError(f"{image}: this session has no vision model (vision.gguf was not loaded)")
            vecs = self.vision.encode(image)
        want = (self.fmt.image_token_count, self.llm.hp.hidden_size)
        if vecs.shape != want:
            raise UserError(f"image vectors have shape {list(vecs.shape)}, expected {list(want)}")
        self.image_vectors.append(vecs)
        return len(self.image_vectors) - 1

    # -------------------------------------------------------------------------------------------- layout
    def _tokens(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids if text else []

    def _user_items(self, turn: Turn) -> list:
        pieces = self.fmt.prompt_template.replace("{}", turn.user).split(self.fmt.image_placeholder)
        items: list = []
        for k, piece in enumerate(pieces):
            if k:
                img = turn.images[k - 1]
                items += [(img, j) for j in range(self.fmt.image_token_count)]
            items += self._tokens(piece)
        return items

    def layout(self, turns: Sequence[Turn]) -> list:
        items: list = []
        for turn in turns:
            items.append(self.fmt.bos_id)  # every turn starts with BOS, as in training (not llama.cpp's add_bos)
            items += self._user_items(turn)
            if turn.answer is not None:
                items += self._tokens(turn.answer + self.fmt.end_sym)
        return items

    def _feed(self, items: list, all_logits: bool = False) -> np.ndarray:
        """Evaluate items after the cache (token runs via eval_tokens, image rows via eval_embeddings)."""
        logits = None
        start = 0
        while start < len(items):
            is_img = isinstance(items[start], tuple)
            stop = start
            while stop < len(items) and isinstance(items[stop], tuple) == is_img:
                stop += 1
            run = items[start:stop]
            if is_img:
                rows = np.stack([self.image_vectors[i][j] for i, j in run])
                logits = self.llm.eval_embeddings(rows)
            else:
                logits = self.llm.eval_tokens(run)
            self._cached += run
            start = stop
        return logits

    def _sync_cache(self, items: list) -> np.ndarray:
        """Cut the cache back to the common prefix with `items`, evaluate the rest; logits after the last item."""
        keep = 0
        limit = min(len(items), len(self._cached), self.llm.n_past)
        while keep < limit and items[keep] == self._cached[keep]:
            keep += 1
        if keep == len(items):  # everything cached: re-evaluate the last item to get its logits
            keep -= 1
        self.llm.truncate(keep)
        del self._cached[keep:]
        self.last_stats.reused_tokens = keep
        self.last_stats.prompt_tokens = len(items) - keep
        return self._feed(items[keep:])

    # -------------------------------------------------------------------------------------------- chat
    def ask(self, text: str, images: Sequence = (), on_text: Callable[[str], None] | None = None) -> str:
        """One user turn; returns the answer (stop string removed). on_text receives the answer as it grows.
        images: paths, [Q, H] vectors, or indices from add_image / prepare."""
        t_start = time.perf_counter()
        stats = self.last_stats = TurnStats()
        n_before = len(self.image_vectors)
        indices = self._add_images(images)
        stats.image_encode_s = time.perf_counter() - t_start
        placeholder = self.fmt.image_placeholder
        if placeholder in text:
            if text.count(placeholder) != len(indices):
                self._forget_images(n_before)
                raise UserError(f"prompt has {text.count(placeholder)} {placeholder} but {len(indices)} image(s) "
                                "were given")
        elif indices:
            text = self._image_tags(len(indices)) + " " + text
        n_turns = len(self.turns)
        try:
            return self.respond(self.turns + [Turn(user=text, images=indices)], on_text, t_start)
        except BaseException:  # UserError, Ctrl-C
            if len(self.turns) == n_turns:  # refused or interrupted, the turn not taken: forget its images
                self._forget_images(n_before)
            raise

    def prepare(self, images: Sequence) -> list[int]:
        """Encode `images` now and evaluate the next turn's prompt up to their last row; returns their indices.

        A following ask(text, images=<those indices>) then evaluates only the question's own tokens: `chat` calls this
        when an image is attached, so the image is encoded and prefilled while the question is being typed. Items may
        be paths, vectors or indices returned by an earlier prepare (attaching a second image keeps the first)."""
        t0 = time.perf_counter()
        indices = self._add_images(images)
        encode_s = time.perf_counter() - t0
        self.prefill_images(self.turns + [Turn(user=self._image_tags(len(indices)), images=indices)])
        self.last_stats.image_encode_s = encode_s
        return indices

    def prefill_images(self, turns: Sequence[Turn]) -> None:
        """Evaluate the layout of `turns` up to its last image row (the part a question typed after the images does
        not change), reusing the cache as respond() does; nothing when the turns hold no image. last_stats then
        describes this prefill."""
        self.last_stats = TurnStats()
        items = self.layout(turns)
        rows = [k for k, item in enumerate(items) if isinstance(item, tuple)]
        if not rows:
            return
        prefix = items[:rows[-1] + 1]
        if len(prefix) <= min(len(self._cached), self.llm.n_past) and self._cached[:len(prefix)] == prefix:
            return  # already in the cache (e.g. the demo's textbox changed but not its images)
        if len(prefix) >= self.llm.n_ctx:
            raise UserError(f"prompt too long: the conversation and the image(s) need {len(prefix)} positions, the "
                            f"context holds {self.llm.n_ctx}, which must leave at least one position for the answer "
                            "(start a new conversation)")
        t0 = time.perf_counter()
        self._sync_cache(prefix)
        self.last_stats.prefill_s = time.perf_counter() - t0

    def _add_images(self, images: Sequence) -> list[int]:
        """add_image for each path or vectors; an int is the index of an image added before (kept as it is). On an
        error the images added by this call are dropped."""
        n_before = len(self.image_vectors)
        indices = []
        try:
            for image in images:
                if isinstance(image, (int, np.integer)) and not isinstance(image, bool):
                    if not 0 <= image < n_before or self.image_vectors[image].size == 0:
                        raise UserError(f"image index {image} does not name an encoded image of this session")
                    indices.append(int(image))
                else:
                    indices.append(self.add_image(image))
        except Exception:
            self._forget_images(n_before)
            raise
        return indices

    def _forget_images(self, n_before: int) -> None:
        """Drop the images from index n_before on, and the cache from their first row on: a later image gets the
        same index, and must not reuse the rows the forgotten one left in the KV cache."""
        del self.image_vectors[n_before:]
        stale = next((k for k, item in enumerate(self._cached) if isinstance(item, tuple) and item[0] >= n_before),
                     None)
        if stale is not None:
            del self._cached[stale:]

    def _image_tags(self, count: int) -> str:
        return " ".join([IMAGE_TAG.replace("<ImageHere>", self.fmt.image_placeholder)] * count)

    def respond(self, turns: Sequence[Turn], on_text: Callable[[str], None] | None = None,
                t_start: float | None = None) -> str:
        """Answer the last of `turns` (its answer None; images are add_image indices) and make `turns` the history.

        The public form of ask() for callers that keep the conversation themselves (tinygpt.chat): the same images
        keep the same indices, so the KV cache is reused across calls. UserError, before any state changes, when the
        prompt leaves no room in the context."""
        if t_start is None:
            t_start, self.last_stats = time.perf_counter(), TurnStats()
        stats = self.last_stats
        items = self.layout(turns)
        budget = self._room(items, "the conversation")
        t0 = time.perf_counter()
        logits = self._sync_cache(items)
        stats.prefill_s = time.perf_counter() - t0
        before, self.turns = self.turns, list(turns)
        turn = self.turns[-1]
        try:
            # the history keeps the text exactly as generated, so the next turn's layout re-tokenizes to the cached ids
            turn.answer = self._generate(logits, items, min(budget, self.sampling.max_new_tokens), on_text, t_start)
        except BaseException:  # Ctrl-C, a cancelling on_text: no question without its answer stays in the history
            self.turns = before
            raise
        return turn.answer.strip()

    def text_items(self, text: str) -> list:
        """A raw prompt laid out as a conversation starts (BOS, then its tokens), without the template."""
        return [self.fmt.bos_id] + self._tokens(text)

    def complete(self, text: str, on_text: Callable[[str], None] | None = None) -> str:
        """Continue `text` as it is (`text_items`; no template, no images): the generated text exactly, cut before a
        stop string. The KV cache is reused as respond() reuses it; the conversation (`turns`) is left alone."""
        t_start, self.last_stats = time.perf_counter(), TurnStats()
        items = self.text_items(text)
        budget = self._room(items, "the prompt")
        t0 = time.perf_counter()
        logits = self._sync_cache(items)
        self.last_stats.prefill_s = time.perf_counter() - t0
        return self._generate(logits, items, min(budget, self.sampling.max_new_tokens), on_text, t_start)

    def _room(self, items: list, what: str) -> int:
        """Positions the context leaves after `items`; a UserError when there is none."""
        budget = self.llm.n_ctx - len(items)
        if budget < 1:
            raise UserError(f"prompt too long: {what} needs {len(items)} positions, the context holds "
                            f"{self.llm.n_ctx}, which must leave at least one position for the answer (start a new "
                            "conversation or shorten the prompt)")
        return budget

    def score(self, turns: Sequence[Turn], candidates: Sequence[str]) -> list[float]:
        """Summed log-probability of each candidate as the answer to the last of `turns` (answer None): the
        candidate's tokens (tokenized alone, as training tokenizes answers; no end symbol) after the prompt.
        The prompt is evaluated once (reusing the KV cache) and each candidate is evaluated after it."""
        items = self.layout(turns)
        longest = max((len(self._tokens(c)) for c in candidates), default=0)
        if len(items) + longest > self.llm.n_ctx:
            raise UserError(f"prompt too long: scoring needs {len(items) + longest} positions, the context holds "
                            f"{self.llm.n_ctx}")
        logits = self._sync_cache(items)
        n_prompt = len(items)
        scores = []
        for text in candidates:
            ids = self._tokens(text)
            if not ids:
                raise UserError("score: a candidate answer is empty")
            rows = np.vstack([logits[None], self.llm.eval_tokens(ids, all_logits=True)[:-1]]).astype(np.float64)
            self.llm.truncate(n_prompt)
            peak = rows.max(axis=1, keepdims=True)
            log_norm = (peak + np.log(np.exp(rows - peak).sum(axis=1, keepdims=True)))[:, 0]
            scores.append(float(sum(rows[k, t] - log_norm[k] for k, t in enumerate(ids))))
        return scores

    def _generate(self, logits, items, max_new: int, on_text, t_start: float) -> str:
        stats = self.last_stats
        history = [i for i in items if isinstance(i, int)]
        generated: list[int] = []
        shown = 0
        text = ""
        t_first = None
        try:
            while True:
                token = self.sampler(logits, history + generated)
                if t_first is None:
                    t_first = time.perf_counter()
                    stats.first_token_s = t_first - t_start
                generated.append(token)
                text = self.tokenizer.decode(generated, skip_special_tokens=False)
                cut = self.stop.find(text)
                if token == self.fmt.eos_id:
                    text, stats.stopped_by = self.tokenizer.decode(generated[:-1], skip_special_tokens=False), "eos"
                    break
                if cut >= 0:
                    text, stats.stopped_by = text[:cut], "stop string"
                    break
                if len(generated) >= max_new:
                    # the context ended it whoever cut max_new (ChatEngine cuts sampling.max_new_tokens to the room)
                    full = len(items) + len(generated) >= self.llm.n_ctx
                    stats.stopped_by = "context full" if full else "max_new_tokens"
                    break
                if on_text is not None and not text.endswith("\ufffd"):
                    safe = self.stop.safe_prefix_length(text)
                    if safe > shown:
                        on_text(text[shown:safe])
                        shown = safe
                logits = self.llm.eval_tokens([token])
                self._cached.append(token)
            if on_text is not None and len(text) > shown:
                on_text(text[shown:])
            return text
        finally:  # a generation cancelled by on_text (it raises) still reports what it generated
            stats.generated_tokens = len(generated)
            stats.decode_s = time.perf_counter() - t_first if t_first is not None else 0.0

    def reset(self) -> None:
        """Forget the conversation (the cache is reused only if the next one starts the same way)."""
        self.turns.clear()

    def warm_up(self, n_tokens: int = 8) -> None:
        """Pay the language model's one-off costs (compute buffers, thread pool, first-touch pages) at load time
        instead of in the user's first answer: a short prefill that is then forgotten. The cache is left holding the
        start every conversation shares (BOS and the template's text before the user's), which the first turn then
        reuses. The vision tower is not warmed: its first image costs what any later one does, and encoding a blank
        one took 8 s of a 21 s load on a 2-core Zen 1 (docs/gguf-runtime.md, "Warm-up")."""
        self.llm.eval_tokens([self.llm.hp.vocab_size - 1] * min(n_tokens, self.llm.n_ctx))
        self.llm.truncate(0)
        self._cached.clear()
        shared = [self.fmt.bos_id] + self._tokens(self.fmt.prompt_template.split("{}")[0].rstrip())
        if len(shared) < self.llm.n_ctx:
            self._feed(shared)


def open_session(gguf_dir: str | os.PathLike, backend: str = "auto", qtype: str | None = None,
                 n_ctx: int | None = None, n_threads: int = 2, sampling: SamplingParams | None = None,
                 with_vision: bool = True, vision_int8: bool = True, quiet: bool = False, decode_graph: bool = True,
                 repack: bool = True, kv_type: str | None = None) -> ChatSession:
    """Open DIR's llm-<qtype>.gguf (+ vision.gguf), check they belong together, build the runtime. qtype None: the
    directory's only LLM file, or with several the one fastest on this CPU (Q4_0 where ggml's AMX buffer works, else
    Q4_K first).

    decode_graph / repack / kv_type: the ggml backend's switches (quantize.ggml_llm.GgmlLLM); ignored by the others
    (kv_type None: the backend's default)."""
    qtype = chosen_qtype(gguf_dir, qtype, backend, quiet)
    llm_file = open_gguf(find_llm_file(gguf_dir, qtype), names.ARCH_LLM)
    hp = llm_hyperparams(llm_file)
    check_ctx(n_ctx, llm_file.path, hp.context_length)
    fmt = chat_format(llm_file)
    vision_file = None
    if with_vision:
        vision_file = open_gguf(find_vision_file(gguf_dir), names.ARCH_VISION)
        check_pair(llm_file, hp, vision_file, vision_values(vision_file))
    from .vision_runtime import VisionEncoder  # lazy: torch + transformers, imported by the commands' --help too

    # the vision tower builds on a second thread while the LLM loads (both mostly C++ that releases the GIL)
    with ThreadPoolExecutor(1) as pool:
        vision_job = pool.submit(VisionEncoder, vision_file, int8=vision_int8, n_threads=n_threads) if with_vision \
            else None
        llm = load_language_model(llm_file, backend=backend, n_ctx=n_ctx, n_threads=n_threads, quiet=quiet,
                                  decode_graph=decode_graph, repack=repack, kv_type=kv_type)
        session = ChatSession(llm=llm, tokenizer=load_tokenizer(llm_file), fmt=fmt,
                              sampling=sampling or SamplingParams(), llm_path=str(llm_file.path))
        session.warm_up()  # while the vision tower may still be building
        session.vision = vision_job.result() if vision_job is not None else None
    return session
