"""A job's events as the HTTP answer, the same for both generation endpoints (chat and text completions).

    runner.admit()                                      # then runner.start(...) -> job (tinygpt.serve.runner)
    return await respond(job, request, response, shapes.Reply(...), stream, seed_headers(settings))

* the answer waits for the job's first event, so a refusal the engine makes (a prompt longer than the context) is a
  4xx, streamed or not; a client gone by then is a 499 (nobody reads it) and its job is stopped;
* not streamed: the one piece (the whole answer) and the end event make one JSON object (`reply.whole`);
* streamed: server-sent events: `reply.opening()`, one chunk per piece, `reply.closing`, the usage chunk when the
  request asked for it, then ``data: [DONE]``; an error after the 200 is one ``data: {"error": ...}`` event that
  ends the stream; a stream closed early (the client left) stops the job;
* `seed_headers`: a sampled answer names its seed in ``x-tinygpt-seed`` (send it back as ``seed`` to repeat it).
"""

from __future__ import annotations

import json
from typing import AsyncIterator

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from ..chat.settings import GenerationSettings
from .errors import as_api_error, error_body
from .runner import ClientGone, Event, Job

SEED_HEADER = "x-tinygpt-seed"


def seed_headers(settings: GenerationSettings) -> dict[str, str]:
    return {} if settings.greedy else {SEED_HEADER: str(settings.seed)}


async def next_event(job: Job, request: Request) -> Event | None:
    """The job's next event; None when the client has gone; an error event raised as its API error."""
    try:
        event = await job.next(request)
    except ClientGone:
        return None
    if event.kind == "error":
        raise as_api_error(event.value)
    return event


def sse(body: dict | str) -> bytes:
    """One server-sent event: a single `data:` line (JSON never holds a raw newline) and the blank line ending it."""
    return f"data: {body if isinstance(body, str) else json.dumps(body, ensure_ascii=False)}\n\n".encode()


async def respond(job: Job, request: Request, response: Response, reply, stream: bool, headers: dict[str, str]):
    """The answer to a started job: a JSON object, or a stream of events (see the module's docstring)."""
    first = await next_event(job, request)
    if first is None:
        return Response(status_code=499)
    if stream:
        return StreamingResponse(_stream(job, first, reply), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **headers})
    end = await next_event(job, request)
    if end is None:
        return Response(status_code=499)
    usage, finish_reason = end.value
    response.headers.update(headers)
    return reply.whole(first.value, finish_reason, usage)


async def _stream(job: Job, first: Event, reply) -> AsyncIterator[bytes]:
    """The SSE body: the pieces as they come; leaving early (the client went away) cancels the generation."""
    try:
        for chunk in reply.opening():
            yield sse(chunk)
        event, pieces = first, []
        while event.kind == "piece":
            pieces.append(event.value)
            yield sse(reply.piece(event.value))
            event = await job.next()
        if event.kind == "error":
            error = as_api_error(event.value)
            yield sse(error_body(error.status, error.message, error.param, error.code))
            return
        usage, finish_reason = event.value
        yield sse(reply.closing("".join(pieces), finish_reason))
        if reply.include_usage:
            yield sse(reply.usage_chunk(usage))
        yield sse("[DONE]")
    finally:
        job.stop()  # a no-op when the generation has ended
