"""One engine, one generation at a time, a bounded queue in front of it, and the bridge to the event loop.

    runner = Runner(engine, queue_size=8)
    runner.admit()                                  # APIError 429 when queue_size requests are waiting or running
    job = runner.start(conversation, settings, stream=True)    # now the job owns the admitted slot
    event = await job.next(request)                 # Event("piece", text) ... Event("end", (usage, finish reason))

Contract:
* at most ``queue_size`` requests are admitted (waiting + running); one more is refused at once with a 429;
  `release()` gives a slot back when a request fails before `start`, otherwise the job gives it back when it ends;
* jobs run one after another on a single worker thread, so the event loop never blocks on the engine;
* a streamed job yields the pieces of `ChatEngine.stream` (whose join equals `ChatEngine.chat`); a plain job runs
  `ChatEngine.chat` (beam search included) and yields the answer as one piece; both end with Event("end", (usage,
  finish reason)) or Event("error", exception);
* `job.cancel` (a threading.Event) stops a stream at the next token, and a job that has not started yet does not
  run at all; `job.next(request)` sets it when the client has gone (polled while waiting), and so does closing an
  SSE stream early (tinygpt.serve.app).
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request

from ..chat.messages import Conversation
from ..chat.settings import GenerationSettings
from .errors import APIError
from .usage import measure

POLL_S = 0.25  # how often a waiting request checks that its client is still there


class ClientGone(Exception):
    """The client disconnected while its request waited."""


@dataclass(frozen=True)
class Event:
    kind: str  # "piece" | "end" | "error"
    value: Any = None


class Job:
    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.cancel = threading.Event()
        self._loop = loop
        self._events: asyncio.Queue[Event] = asyncio.Queue()

    def put(self, kind: str, value: Any = None) -> None:
        """From the worker thread."""
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, Event(kind, value))
        except RuntimeError:  # the event loop has closed (server shutdown): nobody is listening
            self.cancel.set()

    async def next(self, request: Request | None = None) -> Event:
        """The next event; with `request`, a client that disconnects meanwhile cancels the job (ClientGone)."""
        if request is None:
            return await self._events.get()
        getter = asyncio.ensure_future(self._events.get())
        try:
            while True:
                done, _ = await asyncio.wait({getter}, timeout=POLL_S)
                if done:
                    return getter.result()
                if await request.is_disconnected():
                    self.cancel.set()
                    raise ClientGone
        finally:
            getter.cancel()


class Runner:
    def __init__(self, engine, queue_size: int):
        self.engine = engine
        self.queue_size = queue_size
        self._active = 0
        self._guard = threading.Lock()
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tinygpt-serve")

    @property
    def depth(self) -> int:
        """Requests admitted and not finished (waiting + running)."""
        return self._active

    def admit(self) -> None:
        with self._guard:
            if self._active >= self.queue_size:
                raise APIError(429, f"the server is busy: {self._active} requests are waiting or running (limits."
                                    f"queue_size = {self.queue_size}); retry later", code="queue_full",
                               headers={"Retry-After": "1"})
            self._active += 1

    def release(self) -> None:
        with self._guard:
            self._active -= 1

    def start(self, conversation: Conversation, settings: GenerationSettings, stream: bool) -> Job:
        job = Job(asyncio.get_running_loop())
        self._worker.submit(self._run, job, conversation, settings, stream)
        return job

    def _run(self, job: Job, conversation: Conversation, settings: GenerationSettings, stream: bool) -> None:
        try:
            if job.cancel.is_set():
                return
            if stream:
                pieces = []
                for piece in self.engine.stream(conversation, settings, cancel=job.cancel):
                    pieces.append(piece)
                    job.put("piece", piece)
                answer = "".join(pieces)
            else:
                answer = self.engine.chat(conversation, settings)
                job.put("piece", answer)
            if not job.cancel.is_set():
                job.put("end", measure(self.engine, conversation, answer, settings))
        except BaseException as exc:  # handed to the request (a UserError is a 400, anything else a logged 500)
            job.put("error", exc)
        finally:
            self.release()

    def close(self) -> None:
        self._worker.shutdown(wait=False, cancel_futures=True)
