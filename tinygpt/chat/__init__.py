"""The chat engine: one typed interface over the PyTorch model and the GGUF CPU runtime (see engine.py).

Layer: above tinygpt.model and quantize, below evaluation, the twin and the entry points (demo, server, CLI)."""

from .backend import ChatBackend, EncodedTurn, PromptInfo
from .boxes import answer_boxes
from .engine import BOX_TASKS, ChatEngine, TaskAnswer, task_prompt
from .messages import ChatTurn, Conversation, ImageRef, image_ref, parse_messages
from .settings import GenerationSettings

__all__ = [
    "BOX_TASKS", "ChatBackend", "ChatEngine", "ChatTurn", "Conversation", "EncodedTurn", "GenerationSettings",
    "ImageRef", "PromptInfo", "TaskAnswer", "answer_boxes", "image_ref", "parse_messages", "task_prompt",
]
