"""OpenAI-style errors: every refusal is a JSON body ``{"error": {"message", "type", "param", "code"}}``.

Contract (installed on the app by `install_error_handlers`):
* `APIError(status, message, param=None, code=None)` raised while handling a request becomes that status and body;
* a `UserError` (the chat engine's: a malformed message, a bad setting, a prompt longer than the context) is a 400
  whose ``param`` is the field its message starts with (``messages[0].content[1].image_url.url: ...``); a prompt
  that does not fit has code ``context_length_exceeded``, an image that does not decode ``invalid_image``;
* request-validation errors (invalid JSON, a wrong field type, a value out of range) are a 400 naming the field,
  not FastAPI's 422 shape;
* HTTP errors Starlette raises (unknown path 404, wrong method 405, body too large 413) keep their status and get
  the same body shape; a path with a trailing slash that names an endpoint without it is a 404 saying so;
* anything else is a 500 with a generic message; the traceback goes to the log, never to the client, and the
  server keeps serving.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from ..chat.messages import UnreadableImage
from ..errors import UserError

log = logging.getLogger("tinygpt.serve")

_TYPES = {429: "rate_limit_error"}  # every other 4xx is OpenAI's "invalid_request_error" (401 included)
INTERNAL = "internal server error (the traceback is in the server's log)"
_FIELD = re.compile(r"^([A-Za-z_][\w.\[\]]*): ")


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


def model_not_found(name: str, served: str) -> APIError:
    return APIError(404, f"the model {name!r} does not exist; this server serves {served!r}", "model",
                    "model_not_found")


def _printable(text: str | None) -> str | None:
    """`text` with any lone UTF-16 surrogate escaped (``\\ud83d``): a message echoing a client's text must still
    encode as UTF-8, or the refusal itself would be a 500."""
    return text if text is None else text.encode("utf-8", "backslashreplace").decode("utf-8")


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    kind = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": _printable(message), "type": kind, "param": _printable(param), "code": code}}


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


def from_user_error(error: UserError) -> APIError:
    message = str(error)
    field = _FIELD.match(message)
    code = "context_length_exceeded" if message.startswith("prompt too long") else (
        "invalid_image" if isinstance(error, UnreadableImage) else None)
    return APIError(400, message, field.group(1) if field else None, code)


def as_api_error(exc: BaseException) -> APIError:
    """The client-facing error for an exception (a 500 for anything that is not a known refusal; logged)."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, UserError):
        return from_user_error(exc)
    log.error("unexpected error while answering", exc_info=(type(exc), exc, exc.__traceback__))
    return APIError(500, INTERNAL, code="internal_error")


def _field_path(loc: tuple) -> str | None:
    parts = [p for p in loc if p != "body"]
    if not parts or isinstance(parts[0], int):
        return None
    return "".join(f"[{p}]" if isinstance(p, int) else (f".{p}" if i else str(p)) for i, p in enumerate(parts))


def validation_message(errors: list[dict]) -> tuple[str, str | None]:
    """One message for pydantic's list of errors (the first three), and the first one's field."""
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "")
        return f"the request body is not valid JSON ({detail} at character {first['loc'][-1]})", None
    texts = []
    for err in errors[:3]:
        field = _field_path(tuple(err.get("loc", ())))
        texts.append(f"{field}: {err['msg']}" if field else f"request body: {err['msg']}")
    return "; ".join(texts), _field_path(tuple(first.get("loc", ())))


def install_error_handlers(app: FastAPI, max_body_bytes: int) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return error_response(exc.status, exc.message, exc.param, exc.code, exc.headers)

    @app.exception_handler(UserError)
    async def user_error(request: Request, exc: UserError):
        return await api_error(request, from_user_error(exc))

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError):
        message, param = validation_message(list(exc.errors()))
        return error_response(400, message, param, "invalid_request")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 413:
            return body_too_large(max_body_bytes)
        path = request.url.path
        message = {404: f"no such endpoint: {request.method} {path}{_slash_hint(request)}",
                   405: f"method {request.method} is not allowed on {path}"}.get(exc.status_code, str(exc.detail))
        return error_response(exc.status_code, message, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):  # Starlette re-raises it afterwards: uvicorn logs it
        return error_response(500, INTERNAL, code="internal_error")


def _slash_hint(request: Request) -> str:
    path = request.url.path
    bare = path.rstrip("/")
    if bare == path or not bare:
        return ""
    scope = dict(request.scope, path=bare)
    if any(route.matches(scope)[0] != Match.NONE for route in request.app.router.routes):
        return f" (without the trailing slash: {bare})"
    return ""


def body_too_large(max_body_bytes: int) -> JSONResponse:
    return error_response(413, f"request body too large: this server takes at most {max_body_bytes} bytes per request "
                               "(limits.max_upload_bytes)", code="request_too_large")
