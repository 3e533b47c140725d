"""`python -m quantize chat`: talk to an exported GGUF pair on the CPU.

One-shot:     python -m quantize chat --gguf DIR --image cat.jpg --prompt "What is in the image?"
Interactive:  python -m quantize chat --gguf DIR [--image cat.jpg]
    then type questions; commands: /image PATH (attach to the next question), /reset, /stats, /quit.
    An attached image is encoded, and the prompt evaluated up to it, on a worker thread while the question is typed
    (ChatSession.prepare), so the question's first token waits only for the question's own tokens.
A bad image path, a file that is not an image, or a prompt longer than the context prints one `error:` line and
the conversation goes on. The answer streams to stdout; timings go to stderr with --verbose.
"""
from __future__ import annotations

import argparse
import os
import sys
from concurrent.futures import Future, ThreadPoolExecutor

from tinygpt.errors import UserError

from .cli_checks import check_ctx, check_image_file, check_threads
from .engine_choice import BACKENDS
from .sampler import SamplingParams
from .session import ChatSession, TurnStats, open_session


COMMANDS_HELP = ("interactive commands: /image PATH attaches an image to the next question (quotes and ~ allowed), "
                 "/reset starts a new conversation, /stats prints the last answer's timings, /quit exits")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.epilog = COMMANDS_HELP
    p.add_argument("--gguf", required=True, help="directory with llm-<qtype>.gguf and vision.gguf (or the LLM file)")
    p.add_argument("--qtype", default=None, help="which llm-<qtype>.gguf to use when the directory has several "
                                                 "(any case; default: the one fastest on this CPU)")
    p.add_argument("--image", action="append", default=[], help="image for the (first) question; repeatable")
    p.add_argument("--prompt", default=None, help="ask once and exit; without it, chat interactively")
    p.add_argument("--backend", default="auto", choices=BACKENDS, help="LLM engine (auto: ggml, else PyTorch)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads")
    p.add_argument("--ctx", type=int, default=None,
                   help="context length in tokens, at most the model's (default: the model's)")
    p.add_argument("--max-new-tokens", type=int, default=300, help="longest answer in tokens")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling: keep the likeliest tokens up to this "
                                                            "probability (with --temperature > 0)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens only (with "
                                                         "--temperature > 0; 0: off)")
    p.add_argument("--repetition-penalty", type=float, default=1.05, help="> 1 makes repeating a token less likely")
    p.add_argument("--seed", type=int, default=0, help="random seed of the sampler (-1: a fresh one each run)")
    p.add_argument("--no-vision", action="store_true", help="text only: do not load vision.gguf")
    p.add_argument("--verbose", action="store_true", help="print timings after every answer (stderr)")
    add_ggml_switches(p)


def add_ggml_switches(p: argparse.ArgumentParser) -> None:
    """The ggml backend's two switches (quantize.ggml_llm.GgmlLLM), for `chat` and `bench`; other backends ignore
    them."""
    p.add_argument("--no-decode-graph", dest="decode_graph", action="store_false",
                   help="ggml backend: build a fresh graph for every generated token instead of reusing one cached "
                        "graph (slower; for checking the cached graph against the plain path, or debugging)")
    p.add_argument("--no-repack", dest="repack", action="store_false",
                   help="ggml backend: run the Q4_0/Q4_K matmuls on the file's own blocks instead of copying them "
                        "into ggml's faster interleaved layout at load (slower prefill; for comparing the two layouts, "
                        "or to work around a ggml build whose repacked kernels misbehave)")


def _print_stats(stats: TurnStats) -> None:
    print(f"[image {stats.image_encode_s:.2f}s | prompt {stats.prompt_tokens} tok in {stats.prefill_s:.2f}s "
          f"(reused {stats.reused_tokens}) | first token {stats.first_token_s:.2f}s | {stats.generated_tokens} tok "
          f"at {stats.decode_tokens_per_s:.1f} tok/s | stop: {stats.stopped_by}]", file=sys.stderr)


def _answer(session: ChatSession, text: str, images: list, verbose: bool) -> None:
    session.ask(text, images=images, on_text=lambda t: print(t, end="", flush=True))
    print(flush=True)
    if verbose:
        _print_stats(session.last_stats)


class Attachments:
    """The images attached to the next question, prepared (ChatSession.prepare) on one worker thread in the order
    they were attached; `take()` waits for the work and hands over their indices (or raises its error)."""

    def __init__(self, session: ChatSession):
        self.session = session
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="attach")
        self._job: Future | None = None

    def add(self, paths: list[str]) -> None:
        before = self._job

        def prepare() -> list:
            earlier = before.result() if before is not None else []
            return self.session.prepare(earlier + list(paths))

        self._job = self._pool.submit(prepare)

    def take(self) -> list:
        job, self._job = self._job, None
        if job is None:
            return []
        try:
            return job.result()
        except KeyboardInterrupt:  # the worker still prefills into the KV cache: the next take() waits for it
            self._job = job
            raise

    def clear(self) -> None:
        try:
            self.take()
        except UserError:
            pass

    def close(self) -> None:
        self._pool.shutdown(wait=True)


def interactive(session: ChatSession, images: list[str], verbose: bool, stdin=None) -> int:
    for path in images:  # a bad --image fails now, not after the first question is typed
        session.vision.preprocess(path)
    attached = Attachments(session)
    try:
        if images:
            attached.add(images)
        return _loop(session, attached, verbose, stdin or sys.stdin)
    finally:
        attached.close()


def image_argument(text: str) -> str:
    """The path of `/image PATH`: surrounding quotes (a terminal adds them to a dragged-in file) dropped, ~ expanded."""
    path = text.strip()
    if len(path) >= 2 and path[0] == path[-1] and path[0] in "'\"":
        path = path[1:-1]
    return os.path.expanduser(path)


def _loop(session: ChatSession, attached: Attachments, verbose: bool, stdin) -> int:
    prompt = ">>> " if stdin.isatty() else ""
    print("chat: type a question; /image PATH attaches an image, /reset starts over, /stats shows timings, /quit "
          "exits.", file=sys.stderr)
    answered = False  # /stats has a turn to show
    while True:
        print(prompt, end="", flush=True, file=sys.stderr)
        line = stdin.readline()
        if not line:
            return 0
        line = line.strip()
        if not line:
            continue
        try:
            if line in ("/quit", "/exit"):
                return 0
            if line == "/reset":
                attached.clear()
                session.reset()
                answered = False
                print("(new conversation)", file=sys.stderr)
            elif line == "/stats":
                if answered:
                    _print_stats(session.last_stats)
                else:
                    print("(no turn yet)", file=sys.stderr)
            elif line.startswith("/image"):
                path = image_argument(line[len("/image"):])
                if not path:
                    raise UserError("/image needs a path")
                if session.vision is None:
                    raise UserError("/image: this session has no vision model (started with --no-vision)")
                session.vision.preprocess(path)  # a bad path or a non-image fails here, not at the next question
                attached.add([path])
                print(f"(image {path} attached to the next question)", file=sys.stderr)
            elif line.startswith("/"):
                raise UserError(f"unknown command {line.split()[0]!r} (use /image PATH, /reset, /stats, /quit)")
            else:
                _answer(session, line, attached.take(), verbose)
                answered = True
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr)
        except KeyboardInterrupt:
            print("\n(interrupted: that question is left out of the conversation)", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    sampling = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                              repetition_penalty=args.repetition_penalty, max_new_tokens=args.max_new_tokens,
                              seed=args.seed).validate()
    check_threads(args.threads)
    check_ctx(args.ctx)
    if args.no_vision and args.image:
        raise UserError("--image cannot be used with --no-vision")
    for path in args.image:
        check_image_file(path)
    session = open_session(args.gguf, backend=args.backend, qtype=args.qtype, n_ctx=args.ctx, n_threads=args.threads,
                           sampling=sampling, with_vision=not args.no_vision, decode_graph=args.decode_graph,
                           repack=args.repack)
    if args.verbose:  # which of several llm-<qtype>.gguf was chosen (Q4_0 on AMX CPUs, else Q4_K first)
        print(f"[{session.llm_path} on {type(session.llm).__name__}]", file=sys.stderr, flush=True)
    if args.prompt is not None:
        _answer(session, args.prompt, list(args.image), args.verbose)
        return 0
    return interactive(session, list(args.image), args.verbose)
