"""The chat history the gr.Chatbot shows <-> the OpenAI content-part messages the ChatEngine reads.

The history is gradio's messages format: ``{"role": "user" | "assistant", "content": ..., "metadata": {...}}``,
where content is a string, a file (``{"path": ...}`` as the demo appends it, ``{"type": "file", "file": {"path"}}``
as gradio hands it back), a text part ``{"type": "text", "text": ...}`` or a list of those.

Contract:
* texts are stored escaped for display (`shown`: ``&``, ``<``, ``>`` as entities, so ``<p>cat</p> {<1><2><3><4>}``
  is shown as written instead of as HTML); `to_openai` undoes it exactly;
* a user message is its images (files, in order) then its text; they become ``image`` and ``text`` parts;
* an assistant message's text parts are the answer; its files (the answer's boxes drawn) are for the eye only;
* a notice (an assistant message with ``metadata.title``: an error, an empty answer) is not an answer: it and the
  user turn it answered are left out, so a failed turn never reaches the model again;
* `tagged_text` writes the task selector's tag in front of the text (`tinygpt.chat.task_prompt`), unless the text
  already starts with a task tag; ``[identify]`` takes the region (x1, y1, x2, y2 in pixels of the newest image).
"""

from __future__ import annotations

import html
import math
import re
from typing import Any, Iterable

from ..chat import task_prompt
from ..errors import UserError
from ..tasks import TASKS, split_task_tag

NO_TASK = "none"
TASK_CHOICES = (NO_TASK, *TASKS)
Box = tuple[float, float, float, float]


def shown(text: str) -> str:
    """Model or user text -> the history's (display) form."""
    return html.escape(text, quote=False)


def unshown(text: str) -> str:
    return html.unescape(text)


def _items(content: Any) -> list:
    return list(content) if isinstance(content, (list, tuple)) else [content]


def _text_of(item: Any) -> str | None:
    if isinstance(item, str):
        return item
    if isinstance(item, dict) and item.get("type") == "text":
        return item.get("text") or ""
    return None


def _path_of(item: Any) -> str | None:
    if isinstance(item, dict):
        if item.get("type") == "file" and isinstance(item.get("file"), dict):
            return item["file"].get("path")
        if isinstance(item.get("path"), str):
            return item["path"]
    return None


def is_notice(message: dict) -> bool:
    return bool((message.get("metadata") or {}).get("title"))


def notice(title: str, text: str) -> dict:
    """An assistant message that is shown but never sent to the model (see the module docstring)."""
    return {"role": "assistant", "content": shown(text), "metadata": {"title": title}}


def user_message(text: str, files: Iterable[str] = ()) -> dict:
    content: list = [{"path": str(p)} for p in files]
    if text:
        content.append(shown(text))
    return {"role": "user", "content": content}


def to_openai(history: list[dict]) -> list[dict]:
    """The history as OpenAI messages (user: image and text parts; assistant: the answer's text)."""
    messages: list[dict] = []
    pending: list[dict] = []  # user messages not answered yet
    for message in history:
        items = _items(message.get("content"))
        if message.get("role") == "user":
            parts = [{"type": "image", "image": p} for p in map(_path_of, items) if p]
            parts += [{"type": "text", "text": unshown(t)} for t in map(_text_of, items) if t]
            pending.append({"role": "user", "content": parts})
        elif is_notice(message):
            pending = []
        else:
            text = " ".join(unshown(t) for t in map(_text_of, items) if t)
            if text and pending:
                messages += pending + [{"role": "assistant", "content": text}]
                pending = []
    return messages + pending


def images(history: list[dict]) -> list[str]:
    """Paths of the user messages' images, oldest first."""
    return [p for m in history if m.get("role") == "user" for p in map(_path_of, _items(m.get("content"))) if p]


def last_question(history: list[dict]) -> str:
    """The text of the last user message ("" when there is none)."""
    for message in reversed(history):
        if message.get("role") == "user":
            return " ".join(unshown(t) for t in map(_text_of, _items(message.get("content"))) if t)
    return ""


def without_last_answer(history: list[dict]) -> list[dict]:
    """The history up to and with its last user message (for Regenerate); UserError when there is none."""
    for i in range(len(history) - 1, -1, -1):
        if history[i].get("role") == "user":
            return list(history[:i + 1])
    raise UserError("nothing to regenerate: ask something first")


def parse_region(text: str | None) -> Box | None:
    """``"x1, y1, x2, y2"`` (any separators) -> an ordered pixel box; "" -> None."""
    values = [float(v) for v in re.findall(r"-?\d+(?:\.\d+)?", text or "")]
    if not values:
        return None
    if len(values) == 2:
        raise UserError("region: one corner so far; click the opposite corner on the image")
    if len(values) != 4:
        raise UserError(f"region: expected x1, y1, x2, y2 in pixels, got {text!r}")
    if not all(math.isfinite(v) for v in values):  # hundreds of digits: float() gives infinity
        raise UserError("region: a number is too large to be a pixel position")
    x1, y1, x2, y2 = values
    if x1 == x2 or y1 == y2:
        raise UserError(f"region: the box {text!r} has no area; click two opposite corners")
    return (min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2))


def tagged_text(task: str | None, text: str, region: str | None = None,
                size: tuple[int, int] | None = None) -> str:
    """The text to send: `text` with the task's tag in front (see the module docstring)."""
    text = (text or "").strip()
    if not task or task == NO_TASK or split_task_tag(text)[0] is not None:
        return text
    if task not in TASKS:
        raise UserError(f"task: expected one of {', '.join(TASK_CHOICES)}, got {task!r}")
    box = parse_region(region) if task == "identify" else None
    if task == "identify":
        if box is None:
            raise UserError("identify: mark a region first (click two opposite corners on the image)")
        if size is None:
            raise UserError("identify: attach an image to mark the region on")
        x1, y1, x2, y2 = box
        if x2 <= 0 or y2 <= 0 or x1 >= size[0] or y1 >= size[1]:  # on the grid: a box of no area at an edge
            raise UserError(f"region: the box {region!r} lies outside the {size[0]}x{size[1]} image; mark a region "
                            "on the image")
    return task_prompt(task, text, box, size)
