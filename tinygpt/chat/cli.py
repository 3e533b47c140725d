"""`tinygpt chat`: talk to a model in the terminal through the chat engine (either backend).

    tinygpt chat --cfg-path eval_configs/tiny.yaml --image scene.png --prompt "[vqa] How many shapes are there?"
    tinygpt chat --gguf out/gguf                      # interactive; or --model outputs/tiny/stage4 (PyTorch)

The model comes from a launch config (`eval_configs/*.yaml`, its generation defaults included) or directly from
`--gguf DIR` / `--model DIR`; generation flags given on the command line override the config. Interactive commands:
`/image PATH` (attach to the next question; repeatable; the image is encoded, and on the GGUF runtime the prompt
evaluated up to it, while the question is typed), `/reset` (a new conversation), `/quit`. Answers stream to stdout.
A bad image, a prompt longer than the context or any other mistake prints one `error:` line and the conversation
goes on (one-shot: exit 2). `python -m quantize chat` is the GGUF runtime's own lower-level chat
(backend switches, timings with /stats).
"""

from __future__ import annotations

import argparse
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TextIO

from ..errors import UserError, report_errors
from .engine import ChatEngine
from .launch import LaunchConfig, ModelChoice, check_model_path, load_launch_config, open_engine
from .messages import image_ref
from .settings import GenerationSettings

SETTING_FLAGS = ("max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "seed")


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Chat with a model in the terminal (the chat engine).")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--cfg-path", help="a launch config (eval_configs/*.yaml)")
    source.add_argument("--gguf", help="an exported GGUF directory (the CPU runtime)")
    source.add_argument("--model", help="a saved model directory (PyTorch)")
    p.add_argument("--image", action="append", default=[], help="image for the first question; repeatable")
    p.add_argument("--prompt", default=None, help="ask once and exit; without it, chat interactively")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="PyTorch device (--model)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (--gguf)")
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--temperature", type=float, default=None, help="0 = greedy (the default)")
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None, help="sample among the k likeliest tokens only (0: off)")
    p.add_argument("--repetition-penalty", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    return p


def launch_config(args: argparse.Namespace) -> LaunchConfig:
    """The launch config named by --cfg-path, or one made from --gguf / --model; flags override its settings."""
    if args.threads < 1:
        raise UserError(f"--threads: expected a number of CPU threads >= 1, got {args.threads}")
    if args.cfg_path:
        cfg = load_launch_config(args.cfg_path)
    else:
        backend, path = ("gguf", args.gguf) if args.gguf else ("torch", args.model)
        choice = ModelChoice(backend, path, args.device, None, args.threads)
        cfg = LaunchConfig(Path(path), choice, GenerationSettings())
        check_model_path(cfg)
    changes = {name: getattr(args, name) for name in SETTING_FLAGS if getattr(args, name) is not None}
    return LaunchConfig(cfg.source, cfg.model, cfg.generation.with_(**changes), cfg.limits)  # with_ checks them


class TerminalChat:
    """One conversation: pending images go with the next question; answers stream to `out`."""

    def __init__(self, engine: ChatEngine, out: TextIO | None = None, err: TextIO | None = None):
        self.engine, self.out, self.err = engine, out or sys.stdout, err or sys.stderr
        self.messages: list[dict] = []
        self.pending: list = []
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="tinygpt-attach")
        self._preparing: Future | None = None

    def attach(self, path: str) -> None:
        """Check the image now and prepare it (ChatEngine.prepare: encode, prefill) on a worker thread while the
        question is typed."""
        ref = image_ref(Path(path).expanduser(), where=path, turn=True)  # as a photo viewer shows it (EXIF)
        ref.open()  # a bad path or a file that is not an image fails here, before the question
        self.pending.append(ref)
        content = [{"type": "image", "image": r} for r in self.pending]
        self._preparing = self._worker.submit(self.engine.prepare,
                                              [*self.messages, {"role": "user", "content": content}])

    def _settle(self) -> None:
        """Wait for the attach-time work. Its errors are not shown: the question's own call meets them again."""
        job, self._preparing = self._preparing, None
        if job is not None:
            try:
                job.result()
            except Exception:
                pass

    def reset(self) -> None:
        self._settle()
        self.messages, self.pending = [], []

    def close(self) -> None:
        self._settle()
        self._worker.shutdown()

    def ask(self, text: str) -> str:
        self._settle()
        content = [{"type": "image", "image": ref} for ref in self.pending] + [{"type": "text", "text": text}]
        messages = [*self.messages, {"role": "user", "content": content}]
        pieces = []
        for piece in self.engine.stream(messages):
            pieces.append(piece)
            self.out.write(piece)
            self.out.flush()
        self.out.write("\n")
        stats = getattr(self.engine.backend, "last_stats", None)  # optional in a backend (tinygpt.chat.backend)
        if stats is not None and stats.stopped_by == "context full":
            print(f"note: the answer was cut where it filled the model's context ({self.engine.context_length} "
                  "positions); /reset starts a new conversation", file=self.err)
        answer = "".join(pieces)
        self.messages = [*messages, {"role": "assistant", "content": answer}]
        self.pending = []
        return answer


def interact(chat: TerminalChat, lines: TextIO, err: TextIO | None = None) -> None:
    """Read questions and commands from `lines` until /quit or end of input; a mistake is one error line."""
    err = err or sys.stderr
    print("commands: /image PATH, /reset, /quit", file=err)
    for line in lines:
        line = line.strip()
        if not line:
            continue
        try:
            if line == "/quit":
                return
            if line == "/reset":
                chat.reset()
            elif line.startswith("/image"):
                path = line[len("/image"):].strip()
                if not path:
                    raise UserError("/image needs a path")
                chat.attach(path)
            elif line.startswith("/"):
                raise UserError(f"unknown command {line.split()[0]!r} (commands: /image PATH, /reset, /quit)")
            else:
                chat.ask(line)
        except UserError as exc:
            print(f"error: {exc}", file=err)


def run(args: argparse.Namespace) -> int:
    cfg = launch_config(args)
    chat = TerminalChat(open_engine(cfg))
    try:
        for path in args.image:
            chat.attach(path)
        if args.prompt is not None:
            chat.ask(args.prompt)
            return 0
        interact(chat, sys.stdin)
        return 0
    finally:
        chat.close()


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = build_parser(prog).parse_args(argv)
    return report_errors(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
