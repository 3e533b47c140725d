"""One engine, one generation at a time, a bounded queue in front of it, and the bridge to the event loop.

    runner = Runner(engine, queue_size=8)
    runner.admit()                                  # APIError 429 when queue_size requests are waiting or running
    job = runner.start(conversation, settings, stream=True)    # now the job owns the admitted slot
    (or runner.start("Once upon a time", settings, stream=False): a raw prompt, text completion)
    event = await job.next(request)                 # Event("piece", text) ... Event("end", (usage, finish reason))

Contract:
* at most ``queue_size`` requests are admitted (waiting + running); one more is refused at once with a 429;
  `release()` gives a slot back when a request fails before `start`, otherwise the job gives it back when it ends,
  or at once when it is stopped before it started;
* jobs run one after another on a single worker thread, so the event loop never blocks on the engine;
* a job is a `Conversation` (chat) or a raw prompt, a str (text completion); every job runs `ChatEngine.stream`
  (a prompt: `ChatEngine.complete_stream`) with the job's cancel event (whose join equals `ChatEngine.chat` /
  `complete`): a streamed job yields its pieces, a plain one the joined answer as one piece; beam search
  (``num_beams`` > 1, PyTorch) runs `ChatEngine.chat` (`complete`) with the same cancel event and yields its answer
  as one piece; every job ends with Event("end", (usage, finish reason)) or Event("error", exception);
* `job.stop()` (the client left: `job.next(request)` polls for it while waiting, and an SSE stream closed early calls
  it) cancels the job: a running generation ends at the next token (beam search at its next step), a job that has
  not started yet never runs and its slot is free at once; a cancelled job sends no more events;
* `shutdown()` (the server is stopping, tinygpt.serve.background.AppServer) ends every admitted job with a 503
  error event (code ``server_shutting_down``) and stops it; `admit` and `start` refuse afterwards.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

from starlette.requests import Request

from ..chat.messages import Conversation
from ..chat.settings import GenerationSettings
from .errors import APIError
from .usage import measure

POLL_S = 0.25  # how often a waiting request checks that its client is still there


class ClientGone(Exception):
    """The client disconnected while its request waited."""


def shutting_down() -> APIError:
    return APIError(503, "the server is shutting down: the request was cancelled; retry once it is back",
                    code="server_shutting_down")


@dataclass(frozen=True)
class Event:
    kind: str  # "piece" | "end" | "error"
    value: Any = None


class Job:
    def __init__(self, loop: asyncio.AbstractEventLoop, on_stop: Callable[["Job"], None]):
        self.cancel = threading.Event()
        self.state = "queued"  # -> "running" -> "done"; or -> "dropped" (stopped before it ran)
        self._loop = loop
        self._on_stop = on_stop
        self._events: asyncio.Queue[Event] = asyncio.Queue()

    def put(self, kind: str, value: Any = None) -> None:
        """From any thread."""
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, Event(kind, value))
        except RuntimeError:  # the event loop has closed (server shutdown): nobody is listening
            self.cancel.set()

    def stop(self) -> None:
        """Cancel the job (a no-op once it has ended)."""
        self._on_stop(self)

    async def next(self, request: Request | None = None) -> Event:
        """The next event; with `request`, a client that disconnects meanwhile stops the job (ClientGone)."""
        if request is None:
            return await self._events.get()
        getter = asyncio.ensure_future(self._events.get())
        try:
            while True:
                done, _ = await asyncio.wait({getter}, timeout=POLL_S)
                if done:
                    return getter.result()
                if await request.is_disconnected():
                    self.stop()
                    raise ClientGone
        finally:
            getter.cancel()


class Runner:
    def __init__(self, engine, queue_size: int):
        self.engine = engine
        self.queue_size = queue_size
        self._active = 0
        self._jobs: set[Job] = set()
        self._closing = False
        self._guard = threading.Lock()
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tinygpt-serve")

    @property
    def depth(self) -> int:
        """Requests admitted and not finished (waiting + running)."""
        return self._active

    def admit(self) -> None:
        with self._guard:
            if self._closing:
                raise shutting_down()
            if self._active >= self.queue_size:
                raise APIError(429, f"the server is busy: {self._active} requests are waiting or running (limits."
                                    f"queue_size = {self.queue_size}); retry later", code="queue_full",
                               headers={"Retry-After": "1"})
            self._active += 1

    def release(self) -> None:
        with self._guard:
            self._active -= 1

    def start(self, source: Conversation | str, settings: GenerationSettings, stream: bool) -> Job:
        """The admitted request's job (a conversation, or a raw prompt), queued for the worker (refused once the
        server is shutting down: the caller still holds the slot then)."""
        job = Job(asyncio.get_running_loop(), self.stop)
        with self._guard:
            if self._closing:
                raise shutting_down()
            self._jobs.add(job)
        self._worker.submit(self._run, job, source, settings, stream)
        return job

    def stop(self, job: Job) -> None:
        job.cancel.set()
        with self._guard:
            if job.state == "queued":
                job.state = "dropped"
                self._ended(job)

    def _ended(self, job: Job) -> None:  # with the guard held
        self._jobs.discard(job)
        self._active -= 1

    def _run(self, job: Job, source: Conversation | str, settings: GenerationSettings, stream: bool) -> None:
        with self._guard:
            if job.state != "queued":  # stopped while it waited: its slot is already free
                return
            job.state = "running"
        engine = self.engine
        whole, in_pieces = ((engine.complete, engine.complete_stream) if isinstance(source, str)
                            else (engine.chat, engine.stream))
        try:
            if settings.num_beams > 1:  # beam search decides the text at the end: one piece
                answer = whole(source, settings, cancel=job.cancel)
                if not job.cancel.is_set():
                    job.put("piece", answer)
            else:
                pieces = []
                for piece in in_pieces(source, settings, cancel=job.cancel):
                    pieces.append(piece)
                    if stream:
                        job.put("piece", piece)
                answer = "".join(pieces)
                if not stream and not job.cancel.is_set():
                    job.put("piece", answer)
            if not job.cancel.is_set():
                job.put("end", measure(self.engine, source, answer, settings))
        except BaseException as exc:  # handed to the request (a UserError is a 400, anything else a logged 500)
            job.put("error", exc)
        finally:
            with self._guard:
                job.state = "done"
                self._ended(job)

    def shutdown(self) -> None:
        """Refuse new requests and end every admitted job with a 503 (idempotent)."""
        with self._guard:
            self._closing = True
            jobs = list(self._jobs)
        for job in jobs:
            job.put("error", shutting_down())
            self.stop(job)

    def close(self) -> None:
        self.shutdown()
        self._worker.shutdown(wait=False, cancel_futures=True)
