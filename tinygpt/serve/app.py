"""The FastAPI app: OpenAI's chat-completions API over one `ChatEngine` (docs/serving.md).

    app = create_app(engine, "tiny", limits, api_key=None, allow_local_images=False)

Endpoints:
* ``POST /v1/chat/completions``: a ``chat.completion``, or with ``stream: true`` server-sent events of
  ``chat.completion.chunk`` objects ending with ``data: [DONE]``; boxes in the answer come back in
  ``message.boxes`` (``delta.boxes`` on the stream's last chunk), in pixels of the conversation's last image;
* ``GET /v1/models``, ``GET /v1/models/{name}``: the one model, named ``model_name``;
* ``GET /health``: status, model, backend, context length, queue depth (never behind the API key).

Order of checks for a completion: the body's size (413, before it is read), its JSON syntax (400), the API key (401),
the field types and ranges (400), the model name (404), unsupported options (400), the settings (400), the queue
(429), the images (tinygpt.serve.images: 400 / 413), then the engine (a UserError such as a prompt longer than the
context is a 400; a stream waits for its first piece before it answers, so that error is a 400 too). An error after
a stream has started is sent as one ``data: {"error": ...}`` event. A client that disconnects cancels its stream, and
a request still waiting in the queue when its client leaves is dropped (a non-streamed answer already being
generated runs to its end).
"""

from __future__ import annotations

import json
import secrets
import time
from contextlib import asynccontextmanager
from typing import AsyncIterator

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from ..chat.launch import Limits
from ..chat.messages import parse_messages
from . import shapes
from .errors import APIError, as_api_error, body_too_large, error_body, install_error_handlers
from .images import check_images
from .runner import ClientGone, Job, Runner
from .schema import ChatCompletionRequest


class BodyLimit:
    """Refuses a request body over the limit with a 413: at once when its Content-Length says so (nothing is read),
    else counting as it arrives (a body sent without a length); a body within the limit is handed on whole."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_bytes:
            return await body_too_large(self.max_bytes)(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away: let the app see it
                return await self.app(scope, _replay([message]), send)
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > self.max_bytes:
                return await body_too_large(self.max_bytes)(scope, receive, send)
        body = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        await self.app(scope, _replay([body], receive), send)


def _replay(messages: list[dict], then=None):
    """An ASGI receive that gives `messages` first, then defers to `then` (disconnect notices)."""
    async def receive():
        if messages:
            return messages.pop(0)
        if then is None:
            return {"type": "http.disconnect"}
        return await then()

    return receive


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
               allow_local_images: bool = False) -> FastAPI:
    limits = limits or Limits()
    runner = Runner(engine, limits.queue_size)
    started = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        runner.close()

    app = FastAPI(title="tinygpt", summary="An OpenAI-compatible chat server over one TinyGPT-V model",
                  lifespan=lifespan)
    app.state.runner = runner
    install_error_handlers(app, limits.max_upload_bytes)
    app.add_middleware(BodyLimit, max_bytes=limits.max_upload_bytes)
    v1 = APIRouter(prefix="/v1", dependencies=[Depends(_key_check(api_key or None))])

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": model_name, "backend": engine.name, "context_length": engine.context_length,
                "queue": {"depth": runner.depth, "size": runner.queue_size}}

    @v1.get("/models")
    async def list_models() -> dict:
        return shapes.models(model_name, started)

    @v1.get("/models/{name}")
    async def get_model(name: str) -> dict:
        if name != model_name:
            raise APIError(404, f"the model {name!r} does not exist; this server serves {model_name!r}", "model",
                           "model_not_found")
        return shapes.model(model_name, started)

    def prepare(body: ChatCompletionRequest):
        messages, sizes = check_images(body.messages, limits, allow_local_images)
        return parse_messages(messages), sizes

    @v1.post("/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        if body.model != model_name:
            raise APIError(404, f"the model {body.model!r} does not exist; this server serves {model_name!r}",
                           "model", "model_not_found")
        body.check_supported()
        settings = body.settings(engine.settings)
        runner.admit()
        try:
            conversation, sizes = await run_in_threadpool(prepare, body)
            job = runner.start(conversation, settings, stream=bool(body.stream))
        except BaseException:
            runner.release()
            raise
        first = await _next_event(job, request)
        if first is None:
            return Response(status_code=499)
        reply = shapes.Reply(model_name)
        if body.stream:
            return StreamingResponse(_stream(job, first, reply, sizes, body.include_usage),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        answer = first.value
        end = await _next_event(job, request)
        if end is None:
            return Response(status_code=499)
        usage, finish_reason = end.value
        return reply.completion(answer, finish_reason, shapes.boxes_json(answer, sizes), usage)

    app.include_router(v1)
    return app


async def _stream(job: Job, first, reply: shapes.Reply, sizes, include_usage: bool) -> AsyncIterator[bytes]:
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
        if include_usage:
            yield _sse(reply.usage_chunk(usage))
        yield _sse("[DONE]")
    finally:
        job.cancel.set()  # a no-op when the generation has ended
