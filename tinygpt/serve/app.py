"""The FastAPI app: OpenAI's chat-completions API over one `ChatEngine` (docs/serving.md).

    app = create_app(engine, "tiny", limits, api_key=None, allow_local_images=False, allowed_origins=())

Endpoints:
* ``POST /v1/chat/completions``: a ``chat.completion``, or with ``stream: true`` server-sent events of
  ``chat.completion.chunk`` objects ending with ``data: [DONE]``; boxes in the answer come back in
  ``message.boxes`` (``delta.boxes`` on the stream's last chunk), in pixels of the conversation's last image; a
  sampled answer carries the seed it was sampled with in the ``x-tinygpt-seed`` header;
* ``POST /v1/completions``: OpenAI's legacy text completion of a raw prompt (tinygpt.serve.completions);
* ``GET /v1/models``, ``GET /v1/models/{name}``: the one model, named ``model_name`` (which may hold ``/``);
* ``GET /health``: status, model, backend kind (never a path), context length, queue depth (never behind the key).
Paths are exact: ``/v1/chat/completions/`` is a 404 (no redirect). With `allowed_origins`, browsers on those origins
may call the API (CORS; "*" for any; any request header is allowed, as the openai JS SDK sends its own
X-Stainless-* headers); without, no CORS headers are sent.

Order of checks for a completion: the body's size (413, before it is read), the API key (401), the body's JSON and
the field types and ranges (400, tinygpt.serve.body), the model name (404), unsupported options (400), the settings
(400), the messages' structure, the number of images and their URLs (400; tinygpt.serve.images, nothing read yet),
then the queue (429), then the images' bytes (400 / 413), then the engine (a UserError such as a prompt longer than
the context is a 400; a stream waits for its first piece before it answers, so that error is a 400 too). An error
after a stream has started is sent as one ``data: {"error": ...}`` event (tinygpt.serve.respond). A client that
disconnects cancels its request: a generation stops at the next token (streamed or not, beam search at its next
step), a request still waiting in the queue is dropped and its slot freed at once. When the server stops, every
admitted request ends with a 503 (tinygpt.serve.runner).
"""

from __future__ import annotations

import secrets
import time
from contextlib import asynccontextmanager
from typing import Sequence

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from ..chat.launch import Limits
from ..chat.messages import parse_messages
from . import shapes
from .body import OPENAPI_BODY, BodyLimit, read_request
from .completions import add_completions
from .errors import APIError, install_error_handlers, model_not_found
from .images import find_images, read_images, with_images
from .respond import SEED_HEADER, respond, seed_headers
from .runner import Runner


def _key_check(api_key: str | None):
    bearer = HTTPBearer(auto_error=False)

    async def check(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if api_key is None:
            return
        if credentials is None or not secrets.compare_digest(credentials.credentials.encode(), api_key.encode()):
            raise APIError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    return check


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
        # any request header: the openai JS SDK adds its X-Stainless-* ones; the origin is what is checked
        app.add_middleware(CORSMiddleware, allow_origins=list(allowed_origins), allow_methods=["GET", "POST"],
                           allow_headers=["*"], expose_headers=[SEED_HEADER])
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
            raise model_not_found(name, model_name)
        return shapes.model(model_name, started)

    @v1.post("/chat/completions", openapi_extra=OPENAPI_BODY)
    async def chat_completions(request: Request, response: Response):
        body = read_request(await request.body())
        if body.model != model_name:
            raise model_not_found(body.model, model_name)
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
        reply = shapes.Reply(model_name, include_usage=body.include_usage, sizes=tuple(sizes))
        return await respond(job, request, response, reply, bool(body.stream), seed_headers(settings))

    add_completions(v1, engine, runner, model_name)
    app.include_router(v1)
    return app
