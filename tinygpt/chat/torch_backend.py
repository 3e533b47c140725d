"""The PyTorch backend: a `TinyGPTVForConditionalGeneration` on CPU or GPU, optionally with 8-/4-bit LLM weights.

* images are encoded to Q-Former features ([Q, 768], the frozen part) once (`encode_images`: several in one pass);
  the projection runs per call;
* generation is the model's own `generate` (transformers' generate: greedy, sampling, beams, repetition penalty,
  stop strings); `generate_batch` runs it once over a left-padded batch (`generate` is a batch of one); streaming
  runs it in a worker thread that hands each new token id over (`_Tokens`); the consumer decodes all the ids so far
  and passes on the new text at once, holding back only an incomplete UTF-8 character (text ending in U+FFFD), so a
  box `{<66><36><91><60>}` arrives token by token; a stopping criterion ends the generation when the caller cancels
  (streamed, or `generate` with a `cancel` event: beam search too, at its next step);
* a raw prompt (`generate_text` / `stream_text`, tinygpt.chat.backend) is [BOS] + its tokens, embedded and run
  through the language model's own `generate` the way the model's `generate` runs a conversation;
* `last_stats` (a `GenerationStats`): the prompt positions, the ids generated (the end token included) and why the
  last generation stopped, for the server's `usage` and `finish_reason`;
* `score` runs one forward pass over prompt + candidate for all candidates at once (right-padded batch) and sums
  the log-softmax of each candidate's tokens;
* `load(model_dir, device, bits)`: bits 8 or 4 put the language model's Linear layers into bitsandbytes
  (`Linear8bitLt` / `Linear4bit` NF4), on a CUDA GPU (fp16 compute) or on the CPU (fp32 compute; bitsandbytes' CPU
  kernels: slower than the GGUF runtime, which remains the way to run a quantized model on a CPU).
"""

from __future__ import annotations

import functools
import os
import queue
import threading
from typing import Any, Iterator, Sequence

import torch
from PIL import Image
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from quantize.sampler import StopMatcher

from ..data.image import ImageTransform
from ..errors import UserError
from ..model import TinyGPTVForConditionalGeneration, load_vlm
from ..model.sequence import embed_inputs
from .backend import AnswerCutter, EncodedTurn, GenerationStats, PromptInfo
from .settings import GenerationSettings


class _EventStop(StoppingCriteria):
    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class _Tokens(BaseStreamer):
    """`generate`'s streamer: hands each new token id to the consumer through a queue (None: the end) and keeps
    them all in `ids` (written by the generating thread; read once it has finished)."""

    def __init__(self):
        self.queue: queue.Queue = queue.Queue()
        self.ids: list[int] = []
        self._prompt = True

    def put(self, value):
        if self._prompt:  # generate hands over the prompt's ids first (none here: the prompt goes in as embeddings)
            self._prompt = False
            return
        ids = value.reshape(-1).tolist()
        self.ids.extend(ids)
        self.queue.put(ids)

    def end(self):
        self.queue.put(None)


class TorchBackend:
    def __init__(self, model: TinyGPTVForConditionalGeneration, name: str | None = None):
        self.model = model.eval()
        cfg = model.config
        self.device = model.proj1.weight.device
        stops = list(cfg.stop_strings or [])
        if cfg.end_sym.strip() and cfg.end_sym not in stops:
            stops.append(cfg.end_sym)
        self.prompt = PromptInfo(cfg.prompt_template, cfg.end_sym, tuple(stops), cfg.num_query_tokens,
                                 int(cfg.vision_config.image_size))
        self.context_length = int(cfg.text_config.max_position_embeddings)
        self.name = name or f"torch:{self.device}"
        self.transform = ImageTransform(self.prompt.image_size)
        self.tokenizer = model._require_tokenizer()
        text = cfg.text_config
        eos = text.eos_token_id
        self._eos = set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])
        self._pad = text.pad_token_id
        self.last_stats: GenerationStats | None = None
        self.last_batch_stats: list[GenerationStats] = []

    @classmethod
    def load(cls, model_dir: str | os.PathLike, device: str = "auto", bits: int | None = None) -> "TorchBackend":
        """Load a model directory onto `device` ("auto": CUDA when present); bits 8/4: LLM in bitsandbytes."""
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if bits not in (None, 8, 4):
            raise UserError(f"bits: expected 8, 4 or none, got {bits!r}")
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise UserError(f"device {device}: no CUDA GPU is visible to torch; use device cpu (or auto)")
        cuda = device.startswith("cuda")
        model = load_vlm(model_dir, dtype=torch.float16 if cuda else None)
        if bits:
            quantize_llm_linears(model, bits, compute_dtype=torch.float16 if cuda else torch.float32)
        model.to(device)  # bitsandbytes quantizes the swapped weights here (CUDA, or its CPU kernels)
        return cls(model, name=f"torch:{device}" + (f":int{bits}" if bits else ""))

    # ---- images ----------------------------------------------------------------------------------------------
    def encode_image(self, image: Image.Image) -> torch.Tensor:
        return self.encode_images([image])[0]

    @torch.no_grad()
    def encode_images(self, images: Sequence[Image.Image]) -> list[torch.Tensor]:
        """One pass of the vision tower and Q-Former over the stacked images (each handle its own copy, so the cache
        frees them one by one)."""
        if not images:
            return []
        pixels = torch.stack([self.transform(image) for image in images]).to(self.device)
        return [features.clone() for features in self.model.qformer_features(pixels)]

    def release_image(self, handle: Any) -> None:
        pass  # a tensor; the garbage collector frees it

    # ---- prompt ------------------------------------------------------------------------------------------------
    def _conv(self, turns: Sequence[EncodedTurn]) -> list[dict]:
        placeholder = self.model.config.image_placeholder
        return [{"user": t.user.replace("<ImageHere>", placeholder), "assistant": t.assistant} for t in turns]

    def _inputs(self, turns: Sequence[EncodedTurn]):
        conv = self._conv(turns)
        handles = [h for t in turns for h in t.images]
        inputs = self.model.prepare_inputs([conv], [len(handles)], None, "left")
        features = torch.stack(handles) if handles else None
        return conv, handles, inputs, features

    def prompt_length(self, turns: Sequence[EncodedTurn]) -> int:
        return int(self._inputs(turns)[2].input_ids.shape[1])

    def _text_ids(self, prompt: str) -> list[int]:
        """A raw prompt laid out as a conversation starts (tinygpt.model.sequence), without the template."""
        bos = self.model.config.text_config.bos_token_id
        return [bos] + self.tokenizer(prompt, add_special_tokens=False)["input_ids"]

    def text_length(self, prompt: str) -> int:
        return len(self._text_ids(prompt))

    def _generate_ids(self, ids: list[int], **kw) -> torch.Tensor:
        """transformers' generate over the embedded `ids`, as TinyGPTVForConditionalGeneration.generate runs a
        conversation (embeddings in, only the new ids out; no image positions)."""
        text = self.model.config.text_config
        lm = self.model.language_model
        input_ids = torch.tensor([ids], dtype=torch.long, device=self.device)
        kw.update(pad_token_id=text.pad_token_id, eos_token_id=text.eos_token_id)
        if kw.get("stop_strings"):
            kw["tokenizer"] = self.tokenizer
        else:
            kw.pop("stop_strings", None)
        embeds = lm.get_input_embeddings()(input_ids)
        return lm.generate(inputs_embeds=embeds, attention_mask=torch.ones_like(input_ids), **kw)

    def _kwargs(self, settings: GenerationSettings, max_new: int, continuation: bool = False) -> dict:
        own = [] if continuation else list(self.prompt.stop_strings)
        kw: dict = {"max_new_tokens": max_new, "num_beams": settings.num_beams,
                    "repetition_penalty": settings.repetition_penalty, "stop_strings": own + list(settings.stop)}
        if settings.greedy:
            kw["do_sample"] = False
        else:
            # top_k always given: left out, transformers applies its default of 50, which the GGUF sampler does not
            kw.update(do_sample=True, temperature=settings.temperature, top_p=settings.top_p, top_k=settings.top_k)
            if settings.seed is not None:
                torch.manual_seed(settings.seed)
        return kw

    def _max_new(self, length: int, settings: GenerationSettings) -> int:
        return max(1, min(settings.max_new_tokens, self.context_length - length))

    # ---- generation ------------------------------------------------------------------------------------------
    def _stopped_by(self, ids: list[int], max_new: int, width: int, stops: Sequence[str],
                    padded: bool = False) -> str:
        """Why the generation of `ids` (the row's own tokens, after a prompt `width` positions wide) stopped;
        `padded`: the batch padded the row after it ended (with pad == eos the end token is then among the padding).
        A generation that ran to its budget and filled the context is "context full" whoever cut the budget (the
        engine cuts `settings.max_new_tokens` to the room the prompt leaves before the backend sees it)."""
        if StopMatcher(stops).find(self.tokenizer.decode(ids, skip_special_tokens=True)) >= 0:
            return "stop string"
        if padded or (ids and ids[-1] in self._eos):
            return "eos"
        if len(ids) >= max_new:
            return "context full" if width + len(ids) >= self.context_length else "max_new_tokens"
        return "cancelled"

    def _row_stats(self, row: list[int], prompt: int, max_new: int, width: int,
                   stops: Sequence[str]) -> GenerationStats:
        """The stats of one row of a batch (`prompt` its own positions, `width` the batch's): after a row ends,
        `generate` pads it to the batch's width."""
        n = len(row)
        while n and row[n - 1] == self._pad:
            n -= 1
        why = self._stopped_by(row[:n], max_new, width, stops, padded=n < len(row))
        if why == "eos" and n < len(row) and self._pad in self._eos:
            n += 1  # pad == eos: the first padding id is the end token the row generated
        return GenerationStats(prompt, n, why)

    def generate(self, turns: Sequence[EncodedTurn], settings: GenerationSettings,
                 cancel: threading.Event | None = None) -> str:
        return self.generate_batch([turns], settings, cancel)[0]

    def generate_batch(self, conversations: Sequence[Sequence[EncodedTurn]], settings: GenerationSettings,
                       cancel: threading.Event | None = None) -> list[str]:
        """One left-padded `generate` over the conversations (rows that stop early wait, padded, for the rest)."""
        if not conversations:
            return []
        convs = [self._conv(turns) for turns in conversations]
        counts = [sum(len(t.images) for t in turns) for turns in conversations]
        handles = [h for turns in conversations for t in turns for h in t.images]
        inputs = self.model.prepare_inputs(convs, counts, None, "left")
        features = torch.stack(handles) if handles else None
        prompts = [int(n) for n in inputs.attention_mask.sum(dim=1).tolist()]

        def run(**kw):
            return self.model.generate(convs, counts, image_features=features, **kw)

        return self._generate_rows(run, int(inputs.input_ids.shape[1]), prompts, settings, cancel)

    def generate_text(self, prompt: str, settings: GenerationSettings, cancel: threading.Event | None = None) -> str:
        ids = self._text_ids(prompt)
        run = functools.partial(self._generate_ids, ids)
        return self._generate_rows(run, len(ids), [len(ids)], settings, cancel, continuation=True)[0]

    def _generate_rows(self, run, width: int, prompts: list[int], settings: GenerationSettings,
                       cancel: threading.Event | None, continuation: bool = False) -> list[str]:
        """`run(**generate_kwargs)` (a batch of prompts `width` positions wide, each `prompts[i]` long) -> the
        answers; `cancel` ends the generation at the next step (beam search included)."""
        max_new = self._max_new(width, settings)
        kw = self._kwargs(settings, max_new, continuation)
        if cancel is not None:
            kw["stopping_criteria"] = StoppingCriteriaList([_EventStop(cancel)])
        ids = run(**kw).tolist()
        self.last_batch_stats = [self._row_stats(row, n, max_new, width, kw["stop_strings"])
                                 for row, n in zip(ids, prompts)]
        self.last_stats = self.last_batch_stats[-1]
        cutter = AnswerCutter(self.prompt, settings.stop, continuation)
        return [cutter.answer(self.tokenizer.decode(row, skip_special_tokens=True)) for row in ids]

    def stream(self, turns: Sequence[EncodedTurn], settings: GenerationSettings,
               cancel: threading.Event | None = None) -> Iterator[str]:
        conv, handles, inputs, features = self._inputs(turns)

        def run(**kw):
            return self.model.generate([conv], [len(handles)], image_features=features, **kw)

        return self._stream(run, int(inputs.input_ids.shape[1]), settings, cancel)

    def stream_text(self, prompt: str, settings: GenerationSettings,
                    cancel: threading.Event | None = None) -> Iterator[str]:
        ids = self._text_ids(prompt)
        return self._stream(functools.partial(self._generate_ids, ids), len(ids), settings, cancel, continuation=True)

    def _stream(self, run, prompt: int, settings: GenerationSettings, cancel: threading.Event | None,
                continuation: bool = False) -> Iterator[str]:
        """The pieces of `run(**generate_kwargs)` (a prompt of `prompt` positions) as they are generated."""
        if settings.num_beams > 1:
            raise UserError("num_beams: streaming needs num_beams 1 (beam search decides the text at the end)")
        max_new = self._max_new(prompt, settings)
        kw = self._kwargs(settings, max_new, continuation)
        halt = threading.Event()
        tokens = _Tokens()
        kw.update(streamer=tokens, stopping_criteria=StoppingCriteriaList([_EventStop(halt)]))
        failure: list[BaseException] = []
        self.last_stats = None

        def work():
            try:
                run(**kw)
            except BaseException as exc:  # handed to the consumer below
                failure.append(exc)
                tokens.end()

        worker = threading.Thread(target=work, name="tinygpt-chat-generate", daemon=True)
        cutter = AnswerCutter(self.prompt, settings.stop, continuation)
        ids: list[int] = []
        worker.start()
        try:
            while (new := tokens.queue.get()) is not None:
                ids.extend(new)
                raw = self.tokenizer.decode(ids, skip_special_tokens=True)
                if raw.endswith("\ufffd"):  # an incomplete UTF-8 character: its next token completes it
                    continue
                piece = cutter.update(raw)
                if piece:
                    yield piece
                if cutter.stopped or (cancel is not None and cancel.is_set()):
                    break
            else:
                if failure:
                    raise failure[0]
                piece = cutter.update(self.tokenizer.decode(ids, skip_special_tokens=True), final=True)
                if piece:
                    yield piece
        finally:
            halt.set()  # the queue is unbounded, so the worker never blocks on it
            worker.join()
            if not failure:
                why = self._stopped_by(tokens.ids, max_new, prompt, kw["stop_strings"])
                self.last_stats = GenerationStats(prompt, len(tokens.ids), why)

    # ---- scoring -------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def score(self, turns: Sequence[EncodedTurn], candidates: Sequence[str]) -> list[float]:
        _, _, inputs, features = self._inputs(turns)
        model, lm = self.model, self.model.language_model
        embed = lm.get_input_embeddings()
        images = model.project(features) if features is not None else None
        prompt = embed_inputs(inputs, embed, images)  # [1, P, H]
        cand_ids = [self.tokenizer(c, add_special_tokens=False)["input_ids"] for c in candidates]
        if any(not ids for ids in cand_ids):
            raise UserError("score: a candidate answer is empty")
        n_prompt, longest = prompt.shape[1], max((len(i) for i in cand_ids), default=0)
        if n_prompt + longest > self.context_length:
            raise UserError(f"prompt too long: scoring needs {n_prompt + longest} positions, the context holds "
                            f"{self.context_length}")
        if not cand_ids:
            return []
        pad = model.config.text_config.pad_token_id
        ids = torch.full((len(cand_ids), longest), pad, dtype=torch.long, device=self.device)
        mask = torch.zeros((len(cand_ids), n_prompt + longest), dtype=torch.long, device=self.device)
        for k, c in enumerate(cand_ids):
            ids[k, : len(c)] = torch.tensor(c, device=self.device)
            mask[k, : n_prompt + len(c)] = 1
        embeds = torch.cat([prompt.expand(len(cand_ids), -1, -1), embed(ids)], dim=1)
        extra = model.image_mask_kwargs(inputs)  # mmca: the prompt's image positions; candidates are text
        if extra:
            flags = extra["image_mask"].expand(len(cand_ids), -1)
            extra["image_mask"] = torch.cat([flags, torch.zeros_like(ids, dtype=torch.bool)], dim=1)
        logits = lm(inputs_embeds=embeds, attention_mask=mask, use_cache=False, **extra).logits
        logp = torch.log_softmax(logits[:, n_prompt - 1: n_prompt + longest - 1].float(), dim=-1)
        token_logp = logp.gather(-1, ids[..., None])[..., 0]
        return [float(token_logp[k, : len(c)].sum()) for k, c in enumerate(cand_ids)]


def quantize_llm_linears(model: TinyGPTVForConditionalGeneration, bits: int,
                         compute_dtype: torch.dtype = torch.float16) -> None:
    """Swap the language model's Linear layers for bitsandbytes 8-bit / 4-bit NF4 layers, keeping the LM head and
    the LoRA adapters in float (as QLoRA keeps them: quantizing A and B too broke the tiny model's NF4 answers). The
    weights are quantized when the model moves to its device (CUDA, or the CPU: bitsandbytes >= 0.49 has CPU
    kernels for both). `compute_dtype`: the dtype of the layers' inputs, outputs and biases."""
    try:
        import bitsandbytes as bnb
    except ImportError as exc:
        raise UserError(f"bits {bits}: bitsandbytes cannot be imported ({exc})") from None
    lm = model.language_model
    targets = [(name, mod) for name, mod in lm.named_modules()
               if isinstance(mod, torch.nn.Linear) and not name.endswith("lm_head") and ".lora_" not in name]
    for name, old in targets:
        parent = lm.get_submodule(name.rsplit(".", 1)[0]) if "." in name else lm
        has_bias = old.bias is not None
        weight = old.weight.data.to(compute_dtype)
        if bits == 8:
            new = bnb.nn.Linear8bitLt(old.in_features, old.out_features, bias=has_bias, has_fp16_weights=False)
            new.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
        else:
            new = bnb.nn.Linear4bit(old.in_features, old.out_features, bias=has_bias, compute_dtype=compute_dtype,
                                    quant_type="nf4")
            new.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4")
        if has_bias:
            new.bias = torch.nn.Parameter(old.bias.data.to(compute_dtype), requires_grad=False)
        setattr(parent, name.rsplit(".", 1)[-1], new)
