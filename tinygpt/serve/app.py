"""The FastAPI app: OpenAI's chat-completions API over one `ChatEngine` (docs/serving.md).

    app = create_app(engine, "tiny", limits, api_key=None, allow_local_images=False, allowed_origins=())

Endpoints:
* ``POST /v1/chat/completions``: a ``chat.completion``, or with ``stream: true`` server-sent events of
  ``chat.completion.chunk`` objects ending with ``data: [DONE]``; boxes in the answer come back in
  ``message.boxes`` (``delta.boxes`` on the stream's last chunk), in pixels of the conversation's last image; a
  sampled answer carries the seed it was sampled with in the ``x-tinygpt-seed`` header;
* ``GET /v1/models``, ``GET /v1/models/{name}``: the one model, named ``model_name`` (which may hold ``/``);
* ``GET /health``: status, model, backend kind (never a path), context length, queue depth (never behind the key).
Paths are exact: ``/v1/chat/completions/`` is a 404 (no redirect). With `allowed_origins`, browsers on those origins
may call the API (CORS; "*" for any); without, no CORS headers are sent.

Order of checks for a completion: the body's size (413, before it is read), the API key (401), the body's JSON and
the field types and ranges (400, tinygpt.serve.body), the model name (404), unsupported options (400), the settings
(400), the messages' structure, the number of images and their URLs (400; tinygpt.serve.images, nothing read yet),
then the queue (429), then the images' bytes (400 / 413), then the engine (a UserError such as a prompt longer than
the context is a 400; a stream waits for its first piece before it answers, so that error is a 400 too). An error
after a stream has started is sent as one ``data: {"error": ...}`` event. A client that disconnects cancels its
request: a generation stops at the next token (streamed or not), a request still waiting in the queue is dropped
and its slot freed at once. When the server stops, every admitted request ends with a 503 (tinygpt.serve.runner).
"""

from __future__ import annotations

import json
import secrets
import time
from contextlib import asynccontextmanager
from typing import AsyncIterator, Sequence

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from ..chat.launch import Limits
from ..chat.messages import parse_messages
from . import shapes
from .body import OPENAPI_BODY, BodyLimit, read_request
from .errors import APIError, as_api_error, error_body, install_error_handlers
from .images import find_images, read_images, with_images
from .runner import ClientGone, Job, Runner

SEED_HEADER = "x-tinygpt-seed"


def _key_check(api_key: str | None):
    bearer = HTTPBearer(auto_error=False)

    async def check(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if api_key is None:
            return
        if credentials is None or not secrets.compare_digest(credentials.credentials.encode(), api_key.encode()):
            raise APIError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    return check


async def _next_event(job: Job, request: Request):
    """The job's next event; None when the client has gone; an error event raised as its API error."""
    try:
        event = await job.next(request)
    except ClientGone:
        return None
    if event.kind == "error":
        raise as_api_error(event.value)
    return event


def _sse(body: dict | str) -> bytes:
    """One server-sent event: a single `data:` line (JSON never holds a raw newline) and the blank line ending it."""
    return f"data: {body if isinstance(body, str) else json.dumps(body, ensure_ascii=False)}\n\n".encode()


def create_app(engine, model_name: str, limits: Limits | None = None, api_key: str | None = None,
               allow_local_images: bool = False, allowed_origins: Sequence[str] = ()) -> FastAPI:
    limits = limits or Limits()
    runner = Runner(engine, limits.queue_size)
    started = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        runner.close()

    app = FastAPI(title="tinygpt", summary="An OpenAI-compatible chat server over one TinyGPT-V model",
                  lifespan=lifespan, redirect_slashes=False)
    app.state.runner = runner
    install_error_handlers(app, limits.max_upload_bytes)
    app.add_middleware(BodyLimit, max_bytes=limits.max_upload_bytes)
    if allowed_origins:  # outermost, so that refusals (a 413, a 401) carry the CORS headers too
        app.add_middleware(CORSMiddleware, allow_origins=list(allowed_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"], expose_headers=[SEED_HEADER])
    v1 = APIRouter(prefix="/v1", dependencies=[Depends(_key_check(api_key or None))])

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": model_name, "backend": shapes.backend_kind(engine.name),
                "context_length": engine.context_length, "queue": {"depth": runner.depth, "size": runner.queue_size}}

    @v1.get("/models")
    async def list_models() -> dict:
        return shapes.models(model_name, started)

    @v1.get("/models/{name:path}")
    async def get_model(name: str) -> dict:
        if name != model_name:
            raise APIError(404, f"the model {name!r} does not exist; this server serves {model_name!r}", "model",
                           "model_not_found")
        return shapes.model(model_name, started)

    @v1.post("/chat/completions", openapi_extra=OPENAPI_BODY)
    async def chat_completions(request: Request, response: Response):
        body = read_request(await request.body())
        if body.model != model_name:
            raise APIError(404, f"the model {body.model!r} does not exist; this server serves {model_name!r}",
                           "model", "model_not_found")
        body.check_supported()
        settings = body.settings(engine.settings)
        found = find_images(body.messages, limits, allow_local_images)
        parse_messages(with_images(body.messages, found))  # the structure, before the queue (images unread)
        runner.admit()
        try:
            messages, sizes = await run_in_threadpool(read_images, body.messages, found, limits, allow_local_images)
            job = runner.start(parse_messages(messages), settings, stream=bool(body.stream))
        except BaseException:
            runner.release()
            raise
        headers = {} if settings.greedy else {SEED_HEADER: str(settings.seed)}
        first = await _next_event(job, request)
        if first is None:
            return Response(status_code=499)
        reply = shapes.Reply(model_name, include_usage=body.include_usage)
        if body.stream:
            return StreamingResponse(_stream(job, first, reply, sizes), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **headers})
        answer = first.value
        end = await _next_event(job, request)
        if end is None:
            return Response(status_code=499)
        usage, finish_reason = end.value
        response.headers.update(headers)
        return reply.completion(answer, finish_reason, shapes.boxes_json(answer, sizes), usage)

    app.include_router(v1)
    return app


async def _stream(job: Job, first, reply: shapes.Reply, sizes) -> AsyncIterator[bytes]:
    """The SSE body: the pieces as they come; leaving early (the client went away) cancels the generation."""
    try:
        yield _sse(reply.chunk({"role": "assistant", "content": ""}))
        event, pieces = first, []
        while event.kind == "piece":
            pieces.append(event.value)
            yield _sse(reply.chunk({"content": event.value}))
            event = await job.next()
        if event.kind == "error":
            error = as_api_error(event.value)
            yield _sse(error_body(error.status, error.message, error.param, error.code))
            return
        usage, finish_reason = event.value
        yield _sse(reply.chunk({"boxes": shapes.boxes_json("".join(pieces), sizes)}, finish_reason))
        if reply.include_usage:
            yield _sse(reply.usage_chunk(usage))
        yield _sse("[DONE]")
    finally:
        job.stop()  # a no-op when the generation has ended
