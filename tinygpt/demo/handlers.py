"""The demo's event handlers over one ChatEngine: plain methods on plain values, so tests call them without a browser.

    h = Handlers(engine, cfg)              # cfg: a tinygpt.chat.launch.LaunchConfig (its limits and generation)
    box, history = h.add_message({"text": "how many shapes?", "files": [png]}, [], "vqa", "")
    for history, view, current in h.respond(history, 40, 0.0, 0.9, 1.0, 0): ...

Contract:
* `add_message` checks the attached files (tinygpt.demo.uploads), writes the task tag (conversation.tagged_text),
  checks the text as the engine will (no ``<ImageHere>``, no lone UTF-16 surrogate), appends the user message and
  empties and locks the textbox (after a notice for a question stopped before its answer began, which is then not
  sent again, merged into the new one); a refusal appends a notice saying why (and shows it as a gr.Warning) and
  leaves the textbox as it was, to be fixed; `respond` then has nothing to answer and changes nothing;
* `respond` first checks the generation settings against the sliders' ranges (`setting_ranges`; the API can send
  any JSON): a value outside, not a number or not finite is refused as below, naming the setting and its range;
  it then streams the answer to the last user message into the history (one engine generation: the engine's
  lock makes concurrent ones wait); a refusal by the engine (e.g. a conversation longer than the context) or an
  empty answer becomes a notice in the chat plus a gr.Warning, never an exception; closing the generator (the Stop
  button) closes the engine's stream, which ends the generation and frees the engine. When the answer holds boxes,
  the last yield draws them (pixels of the conversation's newest image) in the chat and on the view;
* `regenerate` drops the last answer (nothing to drop: a gr.Warning, nothing changes; `regenerable` then ends the
  UI's chain before the answer step, which would wait for the engine); `follow`, `redraw` and `pick` keep the view
  on the newest image (the one attached, else the conversation's) with the identify region marked; an image over
  ``limits.max_image_pixels`` is never decoded for the view;
* `attached` (every change of the textbox, unqueued) starts `prepare` in a background thread when the images attached
  differ from the session's last ones (not on keystrokes; one pending request per session, a newer one replacing it,
  dropped when the session sends its message first): they are encoded and the prompt evaluated up to them while the
  question is typed (one engine call, waiting for the engine's lock, never for a place in gradio's queue; refusals
  are left to `add_message` and `respond`).
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import tempfile
import threading
from pathlib import Path
from typing import Iterator

import gradio as gr
from PIL import Image

from ..chat import ChatEngine, answer_boxes
from ..chat.launch import LaunchConfig
from ..chat.messages import IMAGE_FORMATS, check_unicode, image_ref
from ..chat.settings import MAX_SEED, GenerationSettings
from ..errors import UserError
from ..pixels import to_rgb, upright
from ..tasks import IMAGE_PLACEHOLDER, split_task_tag
from .conversation import (
    images, last_question, notice, shown, tagged_text, to_openai, user_message, without_last_answer,
)
from .drawing import click_region, region_marks, render_view, view_scale
from .uploads import check_message_files

log = logging.getLogger(__name__)

EMPTY_MESSAGE = {"text": "", "files": []}  # an explicit empty value: gradio 6.0 keeps None as None


def _files(message: dict | None) -> list[str]:
    return [str(f["path"] if isinstance(f, dict) else f) for f in (message or {}).get("files") or []]


def newest_image(message: dict | None, history: list[dict] | None) -> str | None:
    """The image a region or an answer's boxes refer to: the last one attached, else the conversation's last."""
    paths = _files(message) or images(history or [])
    return paths[-1] if paths else None


def _open(path: str | None, max_pixels: int) -> Image.Image | None:
    """The image at `path` (RGB), or None: no path, not an image, or more than `max_pixels` pixels (never decoded;
    beyond PIL's own guard Image.open raises DecompressionBombError): add_message says why when it is sent."""
    if not path:
        return None
    try:
        with Image.open(path, formats=IMAGE_FORMATS) as image:  # no EPS to Ghostscript before the upload check
            if image.width * image.height > max_pixels:
                return None
            return to_rgb(upright(image))  # the pixels the model sees (turned as EXIF says, 16-bit scaled)
    except (OSError, ValueError, Image.DecompressionBombError):
        return None


def turned(messages: list[dict]) -> list[dict]:
    """The messages with each image file an ImageRef turned upright as its EXIF orientation says (a phone photo as
    the chat's thumbnail and the view show it; errors name the file)."""
    def part(p):
        if not (isinstance(p, dict) and p.get("type") == "image" and isinstance(p.get("image"), str)):
            return p
        path = Path(p["image"])
        if not path.is_file():  # e.g. gradio's upload folder cleaned: every later turn would fail the same way
            raise UserError(f"{path.name}: this image of the conversation is no longer on disk; Clear starts a new "
                            "conversation")
        return {"type": "image", "image": image_ref(path, path.name, turn=True)}

    return [{**m, "content": [part(p) for p in m["content"]]} if isinstance(m.get("content"), list) else m
            for m in messages]


def _session(request) -> str:
    """The browser session an event came from (gradio's session hash; "" without a request: a direct call)."""
    return getattr(request, "session_hash", None) or ""


def setting_ranges(gen: GenerationSettings, context_length: int | None) -> dict[str, tuple[float, float]]:
    """The generation sliders' ranges (the UI's, and what `respond` takes from the API): the config's value always
    inside; max new tokens up to the context (at most 1024)."""
    return {"max_new_tokens": (1, max(gen.max_new_tokens, min(1024, context_length or 1024))),
            "temperature": (0.0, max(2.0, gen.temperature)),
            "top_p": (min(0.05, gen.top_p), 1.0),
            "repetition_penalty": (min(0.5, gen.repetition_penalty), max(2.0, gen.repetition_penalty))}


def _shown_value(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _number(name: str, value, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:  # NaN: not in
        raise UserError(f"{name}: expected a number from {low:g} to {high:g}, got {_shown_value(value)}")
    return value


def _seed(value) -> int | None:
    if value is None or value == "":
        return None
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
            or not 0 <= round(value) <= MAX_SEED):
        raise UserError(f"seed: expected a whole number from 0 to {MAX_SEED}, or empty (a new one each time), got "
                        f"{_shown_value(value)}")
    return int(round(value))


class Handlers:
    def __init__(self, engine: ChatEngine, cfg: LaunchConfig, drawn_dir: str | Path | None = None):
        self.engine, self.limits, self.settings = engine, cfg.limits, cfg.generation
        self.ranges = setting_ranges(cfg.generation, getattr(engine, "context_length", None))
        self.drawn_dir = Path(drawn_dir or tempfile.mkdtemp(prefix="tinygpt-demo-"))
        self._prepared: tuple = ()  # (files, history length) of the last prepare: typing repeats no work
        self._pending: dict = {}  # session -> the newest prepare it asked for, not yet started (oldest first)
        self._preparing = False  # a background thread is working through `_pending`
        self._pending_lock = threading.Lock()

    def _open(self, path: str | None) -> Image.Image | None:
        return _open(path, self.limits.max_image_pixels)

    # ---- one turn --------------------------------------------------------------------------------------------
    def add_message(self, message: dict | None, history: list[dict] | None, task: str | None, region: str | None,
                    request: gr.Request = None):
        history, files = list(history or []), _files(message)
        with self._pending_lock:  # sent before its head start began: the answer does that work itself
            self._pending.pop(_session(request), None)
        try:
            sizes = check_message_files(files, self.limits)
            newest = files[-1] if files else newest_image(None, history)
            opened = None if files else self._open(newest)  # None: no image, or its file is gone or unreadable
            size = sizes[-1] if files else (opened.size if opened else None)
            text = tagged_text(task, (message or {}).get("text") or "", region, size)
            if not text and not files:
                raise UserError("type a question or attach an image first")
            if IMAGE_PLACEHOLDER in text:  # the engine refuses it too, but only after the textbox was emptied
                raise UserError(f"the text may not contain {IMAGE_PLACEHOLDER} (the model's image slot); attach "
                                "images with the clip")
            check_unicode(text, "message")  # a lone UTF-16 surrogate (half an emoji), which no tokenizer takes
        except UserError as exc:  # the textbox keeps the message, to be fixed
            gr.Warning(str(exc))
            return gr.skip(), history + [notice("⚠️ Not sent", str(exc))]
        if history and history[-1].get("role") == "user":  # Stop before the answer's first piece: say so, and leave
            history.append(notice("⏹️ Stopped", "no answer: stopped before it began"))  # it out (else merged)
        return gr.MultimodalTextbox(value=EMPTY_MESSAGE, interactive=False), history + [user_message(text, files)]

    def respond(self, history: list[dict] | None, max_new_tokens: float, temperature: float, top_p: float,
                repetition_penalty: float, seed: float | None) -> Iterator[tuple]:
        history = list(history or [])
        try:
            settings = self.generation_settings(max_new_tokens, temperature, top_p, repetition_penalty, seed)
            messages = to_openai(history)
            if not messages or messages[-1]["role"] != "user":  # e.g. add_message refused the message
                yield gr.skip(), gr.skip(), gr.skip()
                return
            messages = turned(messages)
            pieces = self.engine.stream(messages, settings)
        except UserError as exc:
            yield self._refused(history, exc)
            return
        answer = ""
        try:
            for piece in pieces:
                answer += piece
                yield history + [{"role": "assistant", "content": shown(answer)}], gr.skip(), gr.skip()
        except UserError as exc:  # the engine checks the prompt's length at the first piece
            yield self._refused(history, exc)
            return
        finally:
            pieces.close()
        shown_history, *views = self._answered(history, answer)
        stats = getattr(getattr(self.engine, "backend", None), "last_stats", None)  # optional in a backend
        if answer and stats is not None and stats.stopped_by == "context full":
            text = (f"the conversation filled the model's context ({self.engine.context_length} positions); "
                    "Clear starts a new one")
            shown_history = shown_history + [notice("✂️ Answer cut", text)]
        yield shown_history, *views

    def generation_settings(self, max_new_tokens, temperature, top_p, repetition_penalty, seed) -> GenerationSettings:
        """The settings as the sliders and the seed box send them, checked against `self.ranges` (the sliders let
        gradio pass any value, so that this check, not gradio's traceback, answers one sent through the API)."""
        values = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                      repetition_penalty=repetition_penalty)
        checked = {name: _number(name, values[name], *self.ranges[name]) for name in self.ranges}
        return self.settings.with_(max_new_tokens=int(checked["max_new_tokens"]),
                                   temperature=float(checked["temperature"]), top_p=float(checked["top_p"]),
                                   repetition_penalty=float(checked["repetition_penalty"]), seed=_seed(seed))

    def _refused(self, history: list[dict], exc: UserError) -> tuple:
        gr.Warning(str(exc))
        return history + [notice("⚠️ Not answered", str(exc))], gr.skip(), gr.skip()

    def _answered(self, history: list[dict], answer: str) -> tuple:
        path = newest_image(None, history)
        image = self._open(path)
        if not answer:
            return history + [notice("No answer", "the model ended its answer at once")], gr.skip(), gr.skip()
        boxes = answer_boxes(answer, *image.size) if image else []
        task, phrase = split_task_tag(last_question(history))
        if task == "refer":  # refer answers are boxes alone: label them with the phrase asked about
            boxes = [(label or phrase.strip(), box) for label, box in boxes]
        if not boxes:
            return history + [{"role": "assistant", "content": shown(answer)}], gr.skip(), gr.skip()
        view = render_view(image, boxes)  # type: ignore[arg-type]
        return history + [{"role": "assistant", "content": [shown(answer), {"path": self._save(view)}]}], view, path

    def _save(self, view: Image.Image) -> str:
        """The drawn view as a PNG file the chat can show (named by its content)."""
        buffer = io.BytesIO()
        view.save(buffer, format="PNG")
        self.drawn_dir.mkdir(parents=True, exist_ok=True)  # a temporary folder may be cleaned while the demo runs
        path = self.drawn_dir / f"boxes-{hashlib.sha256(buffer.getvalue()).hexdigest()[:16]}.png"
        path.write_bytes(buffer.getvalue())
        return str(path)

    def regenerate(self, history: list[dict] | None) -> tuple:
        """(the history without its last answer, the textbox locked until the new answer is done); with nothing to
        regenerate, a gr.Warning saying so and no change (a gr.Error put red "Error" badges on the chat and the
        textbox, without its message, and a traceback on the console)."""
        try:
            return without_last_answer(list(history or [])), gr.MultimodalTextbox(interactive=False)
        except UserError as exc:
            gr.Warning(str(exc))
            return gr.skip(), gr.skip()

    def regenerable(self, history: list[dict] | None) -> None:
        """Between `regenerate` and the answer step: with nothing to regenerate (the toast already said so), a quiet
        gr.Error (no toast, no traceback, no outputs to mark) ends the chain, so the UI unlocks at once instead of
        after an answer step that waited for the engine's slot behind another session's answer."""
        try:
            without_last_answer(list(history or []))
        except UserError as exc:
            raise gr.Error(str(exc), visible=False, print_exception=False) from None

    def attached(self, message: dict | None, history: list[dict] | None, last: list | None,
                 request: gr.Request = None):
        """On every change of the textbox (unqueued: it takes no place in gradio's bounded queue): when the images
        attached and the history length differ from `last` (the session's previous ones), `prepare` is started in
        the background, one pending request per session (a newer one replaces it; sessions in the order they asked);
        returns the new key for the session's state, or gr.skip() (no image, or typing)."""
        files = _files(message)
        key = [*files, len(history or [])]
        if not files or key == list(last or []):
            return gr.skip()
        session = _session(request)
        with self._pending_lock:
            self._pending.pop(session, None)  # re-inserted last: its turn comes after the sessions that asked before
            self._pending[session] = (message, list(history or []))
            start, self._preparing = not self._preparing, True
        if start:
            threading.Thread(target=self._prepare_pending, name="tinygpt-demo-prepare", daemon=True).start()
        return key

    def _prepare_pending(self) -> None:
        while True:
            with self._pending_lock:
                if not self._pending:
                    self._preparing = False
                    return
                job = self._pending.pop(next(iter(self._pending)))
            try:
                self.prepare(*job)
            except Exception:  # prepare reports its own failures; nothing may stop the next head start
                log.warning("preparing the attached images failed", exc_info=True)

    def prepare(self, message: dict | None, history: list[dict] | None) -> None:
        """While the question is typed (started by `attached`): the attached images encoded and the prompt evaluated up
        to them (ChatEngine.prepare), so the answer's first token waits only for the question. Files that add_message
        would refuse, and anything the engine refuses, are left for add_message and respond to report."""
        files = _files(message)
        key = (tuple(files), len(history or []))
        if not files or key == self._prepared:
            return
        try:
            check_message_files(files, self.limits)
            self.engine.prepare(turned([*to_openai(list(history or [])),
                                        {"role": "user", "content": [{"type": "image", "image": f} for f in files]}]))
        except UserError:
            return
        except Exception:  # only a head start: the answer's own call meets (and reports) the same failure
            log.warning("preparing the attached image failed", exc_info=True)
            return
        self._prepared = key

    # ---- the image view ----------------------------------------------------------------------------------------
    def follow(self, message: dict | None, history: list[dict] | None, region: str | None, current: str | None):
        """(view, current) when the newest image changed (textbox edits that keep it change nothing)."""
        newest = newest_image(message, history)
        image = self._open(newest)
        if newest == current or image is None:  # an unreadable file: add_message will say so
            return gr.skip(), gr.skip()
        return render_view(image, *region_marks(region)), newest

    def redraw(self, message: dict | None, history: list[dict] | None, region: str | None):
        image = self._open(newest_image(message, history))
        return render_view(image, *region_marks(region)) if image else None

    def pick(self, message: dict | None, history: list[dict] | None, region: str | None, evt: gr.SelectData):
        """The region after a click on the view (evt.index: view pixels)."""
        image = self._open(newest_image(message, history))
        if image is None or evt.index is None:
            return gr.skip()
        return click_region(region, evt.index, view_scale(image.size))
