"""What the HTTP server costs: time to first token and decode speed through the server against the same model in
process, side by side in one run (docs/serving.md, "Overhead").

    python -m tinygpt.serve.bench --gguf DIR [--threads 2] [--rounds 3] [--max-tokens 64]

One process loads the GGUF pair once and serves it (the real app, uvicorn on a free port of 127.0.0.1). Three paths
answer the same text prompt with greedy decoding:

* ``session``: `quantize.session.ChatSession.respond` with a text callback (the runtime alone);
* ``engine``: `ChatEngine.stream` (the chat engine the server runs);
* ``server``: ``/v1/chat/completions`` with ``stream: true`` over HTTP (httpx, one kept-alive connection), the
  server-sent events parsed by hand so that no client library's cost is counted.

Time to first token is from the call (the request) to the first text piece; decode ms/token is from the first piece
to the last one over the generated tokens after the first (the runtime's own count). Inside the server run the
engine is wrapped to stamp when the server asks it for an answer and when each piece leaves it, which gives the
server's own cost directly, free of the machine's drift: request sent -> engine asked, and piece out of the engine ->
piece at the client (both on one clock: one process). Before every measurement the KV
cache is emptied, so each one pays the full prefill. To keep the comparison fair on a shared machine, the rounds are
interleaved (each round runs all three paths back to back, in a rotating order), a warm-up round is not counted, the
table shows medians with their range, and an overhead is the median over rounds of that round's ratio. The three
paths must give the same answer, or the run is void.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass, field

from ..errors import UserError, report_errors

PROMPT = ("Describe a quiet harbour town at dawn: the boats, the light on the water, the smell of the sea and the "
          "sounds of the people who are already awake.")


@dataclass
class Timing:
    ttft_ms: list[float] = field(default_factory=list)
    decode_ms: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)


def _timed(pieces, start: float, session) -> tuple[float, float, int, str, list[float]]:
    """(time to first piece ms, decode ms/token, tokens, text, arrival time of each piece) of an iterator of text
    pieces started at `start`."""
    arrivals: list[float] = []
    text = []
    for piece in pieces:
        if not piece or (not text and not piece.strip()):  # the engine holds back leading whitespace:
            continue  # count from the first word
        arrivals.append(time.perf_counter())
        text.append(piece)
    if not arrivals:
        raise UserError("the model answered nothing; try another --prompt")
    tokens = session.last_stats.generated_tokens
    first, last = arrivals[0], arrivals[-1]
    return (first - start) * 1e3, (last - first) * 1e3 / max(1, tokens - 1), tokens, "".join(text).strip(), arrivals


class _Stamped:
    """The engine as the server sees it, noting when the server asks for an answer and when each piece leaves the
    engine (the same clock as the client's, in this one process)."""

    def __init__(self, engine):
        self.engine, self.called, self.stamps = engine, 0.0, []

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def stream(self, messages, settings=None, cancel=None):
        self.called, self.stamps = time.perf_counter(), []
        for piece in self.engine.stream(messages, settings, cancel):
            self.stamps.append(time.perf_counter())
            yield piece


def _session_pieces(session, prompt: str):
    """ChatSession.respond in a thread, its on_text callback turned into an iterator."""
    import queue
    import threading

    from quantize.session import Turn

    out: queue.Queue = queue.Queue()
    done = object()
    worker = threading.Thread(target=lambda: (session.respond([Turn(prompt, [])], out.put), out.put(done)))
    worker.start()
    while (item := out.get()) is not done:
        yield item
    worker.join()


def _sse_pieces(response):
    """The content pieces of a chat.completion.chunk stream, parsed by hand (no client library in the way)."""
    for line in response.iter_lines():
        if line.startswith("data: ") and line != "data: [DONE]":
            choices = json.loads(line[6:])["choices"]
            if choices:
                yield choices[0]["delta"].get("content")


def run(gguf: str, threads: int, rounds: int, max_tokens: int, prompt: str) -> str:
    import httpx

    from quantize.sampler import Sampler, SamplingParams, StopMatcher
    from tinygpt.chat import ChatEngine, GenerationSettings
    from tinygpt.chat.launch import Limits

    from .app import create_app
    from .background import BackgroundServer

    settings = GenerationSettings(max_new_tokens=max_tokens)
    engine = ChatEngine.from_gguf(gguf, {"n_threads": threads}, settings=settings)
    session = engine.backend.session
    messages = [{"role": "user", "content": prompt}]
    params = SamplingParams(temperature=0.0, repetition_penalty=1.0, max_new_tokens=max_tokens)  # = settings

    def via_session():
        session.sampling, session.sampler = params, Sampler(params)
        session.stop = StopMatcher(list(engine.stop_strings))
        start = time.perf_counter()
        return _timed(_session_pieces(session, prompt), start, session)

    def via_engine():
        start = time.perf_counter()
        return _timed(engine.stream(messages, settings), start, session)

    stamped = _Stamped(engine)
    delivery: dict[str, list[float]] = {"before": [], "piece": []}
    with BackgroundServer(create_app(stamped, "bench", Limits(queue_size=2))) as server, \
            httpx.Client(base_url=server.url, timeout=600) as client:
        body = {"model": "bench", "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True}

        def via_server():
            start = time.perf_counter()
            with client.stream("POST", "/v1/chat/completions", json=body) as response:
                response.raise_for_status()
                result = _timed(_sse_pieces(response), start, session)
            delivery["before"].append((stamped.called - start) * 1e3)
            delivery["piece"] += [(got - sent) * 1e3 for got, sent in zip(result[-1], stamped.stamps)]
            return result

        paths = {"session": via_session, "engine": via_engine, "server": via_server}
        timings = {name: Timing() for name in paths}
        texts = set()
        for r in range(rounds + 1):  # round 0 warms up (connections, buffers) and is not counted
            names = list(paths)
            order = names[r % 3:] + names[:r % 3]
            for name in order:
                session.llm.truncate(0)  # an empty KV cache: every measurement pays the full prefill
                ttft, decode, tokens, text, _ = paths[name]()
                texts.add(text)
                if r:
                    timings[name].ttft_ms.append(ttft)
                    timings[name].decode_ms.append(decode)
                    timings[name].tokens.append(tokens)
            if not r:
                for values in delivery.values():
                    values.clear()
            print(f"round {r}{' (warm-up)' if not r else ''}: " + ", ".join(
                f"{n} {timings[n].ttft_ms[-1]:.0f} ms + {timings[n].decode_ms[-1]:.1f} ms/token" if r else n
                for n in order), flush=True)
    if len(texts) != 1:
        raise UserError(f"the three paths gave {len(texts)} different answers; the comparison is void")
    prompt_tokens = session.last_stats.prompt_tokens + session.last_stats.reused_tokens
    piece = sorted(delivery["piece"])
    return (f"prompt: {prompt_tokens} tokens; answer: {timings['engine'].tokens[0]} tokens\n" + _table(timings) +
            f"\n\nserver, measured inside the run: request sent -> engine asked {_ms(delivery['before'])}; a piece "
            f"leaving the engine -> the client has it {_ms(piece)}, 90th percentile {piece[int(0.9 * len(piece))]:.2f}"
            f" ms ({len(piece)} pieces)")


def _ms(xs: list[float]) -> str:
    return f"median {statistics.median(xs):.2f} ms (range {min(xs):.2f}-{max(xs):.2f})"


def _table(timings: dict[str, Timing]) -> str:
    """Medians with their range, and the overhead as the median over rounds of each round's ratio (paired: the
    paths of one round ran back to back, so slow phases of a shared machine cancel)."""
    def span(xs, fmt):
        return f"{fmt.format(statistics.median(xs))} ({fmt.format(min(xs))}–{fmt.format(max(xs))})"

    def over(name, base, key):
        ratios = [a / b - 1 for a, b in zip(getattr(timings[name], key), getattr(timings[base], key))]
        return f"{100 * statistics.median(ratios):+.1f}%"

    lines = ["| path | time to first token, ms: median (range) | decode, ms/token: median (range) | "
             "TTFT vs engine | decode vs engine | TTFT vs session | decode vs session |",
             "|---|---|---|---|---|---|---|"]
    for name, t in timings.items():
        lines.append(f"| {name} | {span(t.ttft_ms, '{:.0f}')} | {span(t.decode_ms, '{:.1f}')} | "
                     f"{over(name, 'engine', 'ttft_ms')} | {over(name, 'engine', 'decode_ms')} | "
                     f"{over(name, 'session', 'ttft_ms')} | {over(name, 'session', 'decode_ms')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None, prog: str = "python -m tinygpt.serve.bench") -> int:
    parser = argparse.ArgumentParser(prog=prog, description="Time to first token and decode ms/token through the "
                                                            "HTTP server against the same GGUF model in process.")
    parser.add_argument("--gguf", required=True, help="an exported or random GGUF directory (llm-*.gguf)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="counted rounds (after one warm-up round)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--prompt", default=PROMPT)
    args = parser.parse_args(argv)

    def body() -> int:
        if args.rounds < 1 or args.threads < 1 or args.max_tokens < 2:
            raise UserError("--rounds and --threads must be >= 1, --max-tokens >= 2")
        print(run(args.gguf, args.threads, args.rounds, args.max_tokens, args.prompt))
        return 0

    return report_errors(body)


if __name__ == "__main__":
    raise SystemExit(main())
