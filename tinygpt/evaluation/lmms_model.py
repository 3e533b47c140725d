"""The lmms-eval plugin: `TinyGPTLmms`, a tinygpt model as lmms-eval's ``--model tinygpt`` (extra ``tinygpt[lmms]``).

    pip install -e ".[lmms]"
    python -m lmms_eval --model tinygpt --model_args pretrained=eval_configs/tiny.yaml --tasks pope --limit 20

Registration: pyproject.toml's entry point ``[project.entry-points."lmms_eval.models"] tinygpt`` names
`lmms_manifest`, which lmms-eval 0.7's model registry (``lmms_eval/models/registry_v2.py``) calls for a
``ModelManifest(model_id="tinygpt", simple_class_path=...)``. The class is an lmms-eval "simple" model: its
requests carry ``(context, gen_kwargs | target, doc_to_visual, doc_id, task, split)`` in ``.args``, and the images
come from ``doc_to_visual(self.task_dict[task][split][doc_id])`` (PIL images).

Model args (``--model_args k=v,...``; lmms-eval adds ``batch_size`` and ``device`` from its own flags):
* ``pretrained`` (required): a launch config (``eval_configs/*.yaml``: backend, path, device, threads and the
  generation defaults) or a directory: a saved model (``config.json``: the PyTorch backend) or a GGUF export
  (``llm-*.gguf``: the GGUF CPU runtime). lmms-eval turns a value that looks like a number or true / false into
  one: a directory ``123`` (an int) still opens; ``1e3``, ``1.50``, ``true``, or ``0123`` beside ``123``, are
  refused with a hint to write ``pretrained=./1e3`` (`pretrained_text`);
* ``backend``: torch | gguf (a directory only; a launch config names its own), ``device``: auto | cpu | cuda[:N]
  (PyTorch), ``threads``: GGUF threads, ``batch_size``: answers generated together (``ChatEngine.chat_batch``, when
  the engine has it; one at a time otherwise), ``refer_prompt``: see RefCOCO below (default true).

Contract of the three request kinds:
* ``generate_until`` -> ``ChatEngine.chat`` of one user message (the doc's images first, then the context, the
  training wording); ``gen_kwargs`` -> `GenerationSettings` (`generation_settings`): ``until`` adds stop strings,
  ``max_new_tokens``, ``num_beams``, ``repetition_penalty``; ``do_sample: false``, ``temperature: 0`` or ``top_k: 1``
  is greedy, ``temperature`` / ``top_p`` / ``top_k`` apply when sampling; other keys (``image_aspect_ratio`` ...)
  mean nothing here and are ignored. Defaults come from the launch config's ``generation`` section. With
  sampling, the k-th copy of a request (lmms-eval's ``repeats``, ``--repeats``: the same Instance k times) is drawn
  with seed ``seed + k``, so the copies are separate draws and not one answer k times.
* ``loglikelihood`` -> ``(loss, is_greedy)``: the loss is minus ``ChatEngine.score`` of the continuation (its
  summed negative log-likelihood, >= 0: lower is likelier). lmms-eval's tasks read the first element as a loss, the
  way its own models return it (``float(loss.item())``): ``multiple_choice`` picks ``np.argmin`` of them
  (``lmms_eval/api/task.py``), so a log-probability there would pick the least likely choice. The continuation is
  stripped: our answers are tokenized alone after the template's own separator, so lmms-eval's leading ``" "`` is
  not part of it. ``is_greedy`` is measured, not assumed: one greedy answer per distinct context (temperature 0, as
  many tokens as the longest continuation has UTF-8 bytes, plus 2); the continuation is greedy when that answer
  begins with its tokens (`greedy_begins_with`: its text, ending at a token boundary of the answer: "no" is not
  the greedy "not sure"). An empty continuation is ``(0.0, True)``.
* ``generate_until_multi_round`` is not supported (NotImplementedError); no task tinygpt targets needs it.

RefCOCO (``refcoco*_bbox_rec_*`` tasks): the task asks for ``[x1, y1, x2, y2]`` as floats in [0, 1] of the image;
tinygpt answers ``{<x1><y1><x2><y2>}`` on the 0-100 grid. The first valid box of the answer is rewritten as
``[0.12, 0.30, 0.50, 0.90]`` (`refcoco_answer`; an answer without a box is passed on and scores as a miss).
With ``refer_prompt`` (default) the question is asked in the training wording, ``[refer] <the phrase>``, instead of
the task's English instruction, which the model was never trained on (as MiniGPT-v2's own RefCOCO script asks).

No silent garbage: 10 or more generated answers that are all the same text, or NaN scores, print a ``WARNING``
line on stderr (lmms-eval prints its table whatever the answers are).

The core (`generation_settings`, `request_messages`, `refcoco_answer`, `TinyGPTLmms`'s methods) does not import
lmms_eval: without it `TinyGPTLmms` is a plain class that answers any objects with ``.args`` (the tests' fakes).
"""

from __future__ import annotations

import math
import os
import re
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Sequence

from tqdm import tqdm

from ..chat import ChatEngine, GenerationSettings, answer_boxes, task_prompt
from ..chat.launch import check_device, load_launch_config, open_engine
from ..chat.settings import MAX_SEED
from ..errors import UserError, did_you_mean
from .runner import ALL_SAME_MIN

try:  # the optional extra tinygpt[lmms]
    from lmms_eval.api.model import lmms as _LmmsBase
except ImportError:  # pragma: no cover - depends on the environment
    _LmmsBase = object

MODEL_ID = "tinygpt"
REFCOCO_TASK = re.compile(r"^refcoco(\+|g)?_bbox_rec")
REFCOCO_PHRASE_MARK = "this sentence describes:"  # lmms-eval's refcoco_bbox_rec prompt ends "...describes: <phrase>"
BACKENDS = ("torch", "gguf")


def lmms_manifest():
    """The entry-point payload lmms-eval's registry loads (group ``lmms_eval.models``)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=f"{__name__}.TinyGPTLmms")


# ---- plain functions: gen_kwargs, messages, boxes --------------------------------------------------------------
def generation_settings(gen_kwargs: dict | None, base: GenerationSettings) -> GenerationSettings:
    """lmms-eval's per-task ``generation_kwargs`` over the engine's defaults `base` (see the module docstring)."""
    kw = dict(gen_kwargs or {})
    changes: dict[str, Any] = {}
    until = kw.get("until")
    if until is not None:
        stops = [until] if isinstance(until, str) else until
        if not isinstance(stops, (list, tuple)) or not all(isinstance(s, str) for s in stops):
            raise UserError(f"gen_kwargs.until: expected a string or a list of strings, got {until!r}")
        changes["stop"] = tuple(dict.fromkeys([*base.stop, *(s for s in stops if s)]))
    for key in ("max_new_tokens", "num_beams", "repetition_penalty"):
        if kw.get(key) is not None:
            changes[key] = kw[key]
    do_sample, temperature = kw.get("do_sample"), kw.get("temperature")
    if do_sample is False or kw.get("top_k") == 1:  # top_k 1 keeps only the likeliest token: greedy
        temperature = 0.0
    elif do_sample is True and temperature is None:
        temperature = 1.0  # sampling asked for without a temperature: transformers' default (temperature 0: greedy)
    if temperature is not None:
        changes["temperature"] = float(temperature)
    sampling = changes.get("temperature", base.temperature) > 0
    if sampling and kw.get("top_p") is not None:  # tasks write top_p: 0 next to greedy settings; it means nothing
        changes["top_p"] = float(kw["top_p"])
    top_k = kw.get("top_k")
    if sampling and top_k is not None:
        if isinstance(top_k, float) and top_k.is_integer():  # a YAML 50.0 is 50
            top_k = int(top_k)
        changes["top_k"] = 0 if top_k == -1 and not isinstance(top_k, bool) else top_k  # -1: off (vLLM's), as 0
    try:
        return base.with_(**changes)
    except (UserError, TypeError, ValueError) as exc:
        raise UserError(f"gen_kwargs.{exc}") from None


def _flat_visuals(visuals: Any) -> list:
    if visuals is None:
        return []
    if not isinstance(visuals, (list, tuple)):
        return [visuals]
    return [v for item in visuals for v in _flat_visuals(item)]


def request_messages(context: str, visuals: Any = None) -> list[dict]:
    """One user message: the images (PIL images or paths; nested lists flattened) first, then the text."""
    parts = [{"type": "image", "image": image} for image in _flat_visuals(visuals)]
    if context:
        parts.append({"type": "text", "text": context})
    return [{"role": "user", "content": parts or ""}]


def refcoco_prompt(context: str) -> str:
    """lmms-eval's RefCOCO instruction -> ``[refer] <phrase>`` (the phrase follows "this sentence describes:")."""
    phrase = context.rsplit(REFCOCO_PHRASE_MARK, 1)[-1].strip()
    return task_prompt("refer", phrase)


def refcoco_answer(text: str) -> str:
    """The first valid 0-100 grid box of `text` as ``[x1, y1, x2, y2]`` fractions of the image; `text` unchanged
    when it holds none (lmms-eval then parses [0, 0, 0, 0], a miss)."""
    boxes = answer_boxes(text, 1.0, 1.0)  # pixels of a 1 x 1 image are the fractions lmms-eval wants
    if not boxes:
        return text
    return "[" + ", ".join(f"{v:.2f}" for v in boxes[0][1]) + "]"


def greedy_begins_with(answer: str, continuation: str, length: Callable[[str], int] | None = None) -> bool:
    """Whether the greedy `answer` begins with the tokens of `continuation`: its text, ending where a token of the
    answer ends. ``length``: the backend's ``text_length`` (BOS + tokens); the continuation's tokens and the rest's
    then add up to the answer's ("no" + "t sure" do not make "not sure": "no" is not greedy there). Without it, at
    a word boundary ("1" is not the greedy "12", "yes" is the greedy "yes.")."""
    if not answer.startswith(continuation):
        return False
    rest = answer[len(continuation):]
    if not rest or not continuation:
        return True
    if length is not None:
        return length(continuation) + length(rest) == length(answer) + 1
    return not (continuation[-1].isalnum() and rest[0].isalnum())


def garbage_warning(answers: Sequence[str] = (), scores: Sequence[float] = ()) -> str | None:
    """Why these answers look like a broken model (10+ answers all one text; NaN scores), or None."""
    problems = []
    texts = {" ".join(a.lower().split()) for a in answers}
    if len(answers) >= ALL_SAME_MIN and len(texts) == 1:
        problems.append(f"all {len(answers)} generated answers are {next(iter(texts))[:40]!r}")
    nan = sum(1 for s in scores if math.isnan(s))
    if nan:
        problems.append(f"{nan} of {len(scores)} log-likelihoods are NaN")
    return "; ".join(problems) or None


def evaluator_pairs(pairs: list[tuple[float, bool]]) -> list:
    """The (loss, is_greedy) pairs as lmms-eval's evaluator must get them. lmms-eval 0.7.3 passes every model output
    through ``unwrap_generation_output``, which keeps strings and ``GenerationResult`` objects and turns anything else
    into its ``str()``: a pair reached ``multiple_choice`` scoring as the text ``"(1.2, False)"`` and the task stopped
    ("too many values to unpack"), whatever the model. In a ``GenerationResult`` the pair passes through unchanged.
    Without lmms-eval, or with a version that keeps tuples, the pairs as they are."""
    try:
        from lmms_eval.api.instance import GenerationResult, unwrap_generation_output
    except ImportError:
        return pairs
    if unwrap_generation_output((0.0, True))[0] == (0.0, True):
        return pairs
    return [GenerationResult(text=pair) for pair in pairs]  # type: ignore[arg-type]


def _warn(problem: str | None, where: str) -> None:
    if problem:
        print(f"WARNING: tinygpt {where}: these answers look like garbage, not a measurement: {problem}",
              file=sys.stderr, flush=True)


# ---- opening the model -------------------------------------------------------------------------------------------
def lmms_eval_reads(text: str) -> Any:
    """What lmms-eval's ``--model_args`` parser makes of one value (``lmms_eval/utils.py``, ``handle_arg_string``):
    true / false in any case a bool, ``str.isnumeric()`` text an int, else a float where ``float()`` takes it (1e3,
    1.50, -5, nan, inf, 1_000), else the text itself."""
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    if text.isnumeric():
        try:
            return int(text)
        except ValueError:  # a numeric character int() does not take ("½"): lmms-eval itself stops there
            return text
    try:
        return float(text)
    except ValueError:
        return text


def _same(a: Any, b: Any) -> bool:
    return type(a) is type(b) and (a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b)))


def pretrained_text(value: Any) -> Any:
    """``pretrained`` as it was typed, where lmms-eval's parser turned it into a number or a bool
    (`lmms_eval_reads`). An int is its digits, unless a name in the current folder spells the same number otherwise
    (``0123``); a float or a bool has lost its spelling (``1e3`` is 1000.0, ``true`` is True): a UserError saying
    to write it as a path (``pretrained=./1e3``). Anything else is returned as it is."""
    if not isinstance(value, (int, float)):
        return value
    try:
        here = os.listdir(".")
    except OSError:
        here = []
    spellings = sorted(name for name in here if _same(lmms_eval_reads(name), value))
    if type(value) is int and set(spellings) <= {str(value)}:
        return str(value)
    example = " or pretrained=./".join(spellings) or (str(value).lower() if isinstance(value, bool) else "1e3")
    found = f", and {' and '.join(spellings)} here all read so:" if len(spellings) > 1 else ", so"
    raise UserError(f"--model_args pretrained: lmms-eval's --model_args parser read the value as the "
                    f"{type(value).__name__} {value!r} (it makes true / false a bool, digits an int and what float() "
                    f"takes a float){found} the name as typed is lost; write it as a path, which stays text, e.g. "
                    f"pretrained=./{example}")


def open_pretrained(pretrained: Any, backend: str | None = None, device: str | None = None,
                    threads: int | None = None) -> ChatEngine:
    """The engine ``pretrained`` names: a launch config (.yaml) or a model / GGUF directory (a name lmms-eval read
    as a number: `pretrained_text`)."""
    pretrained = pretrained_text(pretrained)
    if not isinstance(pretrained, str) or not pretrained:
        raise UserError("--model_args pretrained: required (a launch config eval_configs/*.yaml, a saved model "
                        "directory or a GGUF export directory)")
    if backend is not None and backend not in BACKENDS:
        raise UserError(f"--model_args backend: expected torch or gguf, got {backend!r}"
                        f"{did_you_mean(str(backend), BACKENDS)}")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise UserError(f"--model_args threads: expected an integer >= 1, got {threads!r}")
    path = Path(pretrained)
    if path.suffix in (".yaml", ".yml"):
        cfg = load_launch_config(path)
        if backend is not None and backend != cfg.model.backend:
            raise UserError(f"--model_args backend={backend}: {cfg.source} says model.backend: {cfg.model.backend} "
                            "(leave backend out with a launch config)")
        model = cfg.model
        if device is not None:
            model = replace(model, device=check_device(device, "--model_args device"))
        if threads is not None:
            model = replace(model, threads=threads)
        return open_engine(replace(cfg, model=model))
    if not path.is_dir():
        raise UserError(f"--model_args pretrained={pretrained}: neither a launch config (.yaml) nor a directory")
    found = "torch" if (path / "config.json").is_file() else "gguf" if any(path.glob("llm-*.gguf")) else None
    backend = backend or found
    if backend is None or backend != found:
        want = "config.json" if backend == "torch" else "llm-*.gguf" if backend == "gguf" else \
            "config.json (a saved model) or llm-*.gguf (a GGUF export)"
        raise UserError(f"--model_args pretrained={pretrained}: holds no {want}")
    if backend == "torch":
        device = check_device("auto" if device is None else device, "--model_args device")
        return ChatEngine.from_model_dir(path, device=device)
    return ChatEngine.from_gguf(path, {"n_threads": threads or 2})


# ---- the model class ---------------------------------------------------------------------------------------------
class TinyGPTLmms(_LmmsBase):  # type: ignore[misc, valid-type]
    """lmms-eval's ``tinygpt`` model (an ``lmms`` subclass when lmms_eval is installed, a plain class otherwise)."""

    is_simple = True

    def __init__(self, pretrained: str | None = None, backend: str | None = None, device: str | None = None,
                 threads: int | None = None, batch_size: int | str = 1, refer_prompt: bool = True,
                 engine: ChatEngine | None = None, max_batch_size: int | None = None, **unknown):
        super().__init__()
        self.task_dict: dict = {}
        if unknown:
            valid = ("pretrained", "backend", "device", "threads", "batch_size", "refer_prompt")
            name = sorted(unknown)[0]
            raise UserError(f"--model_args: unknown argument {name!r}{did_you_mean(name, valid)} "
                            f"(valid: {', '.join(valid)})")
        try:
            self.batch_size = int(batch_size)
        except (TypeError, ValueError):
            self.batch_size = 0
        if self.batch_size < 1 or isinstance(batch_size, bool):
            raise UserError(f"--batch_size: expected an integer >= 1, got {batch_size!r}")
        if not isinstance(refer_prompt, bool):
            raise UserError(f"--model_args refer_prompt: expected true or false, got {refer_prompt!r}")
        self.refer_prompt = refer_prompt
        self.engine = engine if engine is not None else open_pretrained(pretrained, backend, device, threads)

    # ---- reading requests ----------------------------------------------------------------------------------------
    def _doc(self, task: str, split: str, doc_id: Any) -> Any:
        try:
            return self.task_dict[task][split][doc_id]
        except (KeyError, IndexError, TypeError):
            raise UserError(f"request: no document {doc_id!r} in task {task!r} split {split!r} "
                            "(lmms-eval fills task_dict before it asks)") from None

    def _visuals(self, doc_to_visual: Callable | None, task: str, split: str, doc_id: Any) -> list:
        return [] if doc_to_visual is None else _flat_visuals(doc_to_visual(self._doc(task, split, doc_id)))

    # ---- generate_until ------------------------------------------------------------------------------------------
    def _conversation(self, args: Sequence) -> tuple[list[dict], GenerationSettings, bool]:
        context, gen_kwargs, doc_to_visual, doc_id, task, split = args[:6]
        refcoco = bool(REFCOCO_TASK.match(str(task)))
        if refcoco and self.refer_prompt:
            context = refcoco_prompt(context)
        messages = request_messages(context, self._visuals(doc_to_visual, task, split, doc_id))
        return messages, generation_settings(gen_kwargs, self.engine.settings), refcoco

    def generate_until(self, requests) -> list[str]:
        """One answer per request, in request order (see the module docstring)."""
        asked, copies = [], {}
        for r in requests:
            messages, settings, refcoco = self._conversation(r.args)
            k = copies[id(r)] = copies.get(id(r), -1) + 1  # lmms-eval's repeats: the same Instance k times
            if k and not settings.greedy and settings.seed is not None:
                settings = settings.with_(seed=(settings.seed + k) % (MAX_SEED + 1))
            asked.append((messages, settings, refcoco))
        answers: list[str | None] = [None] * len(asked)
        batch = getattr(self.engine, "chat_batch", None) if self.batch_size > 1 else None
        groups: dict[GenerationSettings, list[int]] = {}
        for i, (_, settings, _) in enumerate(asked):
            groups.setdefault(settings, []).append(i)
        with tqdm(total=len(asked), desc="tinygpt generate_until", disable=len(asked) < 2) as bar:
            for settings, positions in groups.items():
                step = self.batch_size if batch is not None else 1
                for start in range(0, len(positions), step):
                    chunk = positions[start:start + step]
                    if batch is not None:
                        texts = batch([asked[i][0] for i in chunk], settings)
                    else:
                        texts = [self.engine.chat(asked[i][0], settings) for i in chunk]
                    for i, text in zip(chunk, texts):
                        answers[i] = refcoco_answer(text) if asked[i][2] else text
                    bar.update(len(chunk))
        _warn(garbage_warning(answers), "generate_until")  # type: ignore[arg-type]
        return answers  # type: ignore[return-value]

    # ---- loglikelihood -------------------------------------------------------------------------------------------
    def _scored(self, args: Sequence) -> tuple[tuple, list[dict], str]:
        if len(args) == 2:  # lmms-eval's unconditional requests (acc_mutual_info): ("", continuation)
            context, target, doc_to_visual, doc_id, task, split = args[0], args[1], None, None, None, None
        else:
            context, target, doc_to_visual, doc_id, task, split = args[:6]
        if callable(target):
            target = target(self._doc(task, split, doc_id))
        if not isinstance(target, str):
            target = str(target[0]) if isinstance(target, (list, tuple)) and target else str(target)
        key = (context, task, split, doc_id if doc_to_visual is not None else None)
        return key, request_messages(context, self._visuals(doc_to_visual, task, split, doc_id)), target.strip()

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        """(loss: minus the summed log-probability of the continuation, whether greedy decoding writes it) per
        request; lmms-eval's tasks take the lowest loss as the likeliest (see the module docstring)."""
        groups: dict[tuple, tuple[list[dict], list[tuple[int, str]]]] = {}
        for i, request in enumerate(requests):
            key, messages, continuation = self._scored(request.args)
            groups.setdefault(key, (messages, []))[1].append((i, continuation))
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        length = getattr(getattr(self.engine, "backend", None), "text_length", None)
        for messages, items in tqdm(groups.values(), desc="tinygpt loglikelihood", disable=len(groups) < 2):
            wanted = [c for _, c in items if c]
            scores = dict(zip(wanted, self.engine.score(messages, wanted))) if wanted else {}
            greedy = ""
            if wanted:
                longest = max(len(c.encode("utf-8")) for c in wanted) + 2
                greedy = self.engine.chat(messages, GenerationSettings(max_new_tokens=longest, temperature=0.0))
            for i, continuation in items:
                results[i] = (0.0, True) if not continuation else (
                    -scores[continuation], greedy_begins_with(greedy, continuation, length))
        _warn(garbage_warning(scores=[loss for loss, _ in results]), "loglikelihood")  # type: ignore[misc]
        return evaluator_pairs(results)  # type: ignore[arg-type]

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("tinygpt: generate_until_multi_round (multi-round tasks) is not supported")
