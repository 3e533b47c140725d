"""The request body: its size limit (a middleware, before anything is read) and its reading into a request.

* `BodyLimit`: a body over ``limits.max_upload_bytes`` is a 413, at once when its Content-Length says so (nothing is
  read), else counted as it arrives; a body within the limit is handed on whole;
* `read_request(raw, kind)`: the body parsed as JSON whatever its Content-Type says (as llama.cpp does: ``curl -d``
  sends JSON labelled as a form), then checked by `kind` (tinygpt.serve.schema: `ChatCompletionRequest`, the default,
  or `CompletionRequest`). Every refusal is a 400 with code ``invalid_request``: an empty body, bytes that are not
  UTF-8 or not JSON ("the request body is not valid JSON (...)", also for JSON nested too deeply to parse and an
  integer literal too long to convert), JSON that is not an object ("expected a JSON object
  (Content-Type: application/json)"), a field of the wrong type or out of range (naming the field);
* `openapi_body(kind)`: the request's JSON schema for /docs and /openapi.json (FastAPI does not see the endpoint's
  body); `OPENAPI_BODY` is the chat request's.
"""

from __future__ import annotations

import json
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from .errors import APIError, body_too_large, validation_message
from .schema import ChatCompletionRequest, json_kind

Request = TypeVar("Request", bound=BaseModel)

JSON_OBJECT = "expected a JSON object (Content-Type: application/json)"


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


def _invalid(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param, "invalid_request")


def read_request(raw: bytes, kind: type[Request] = ChatCompletionRequest) -> Request:
    """The request in `raw` (any Content-Type) as `kind`, or an APIError 400 saying what is wrong."""
    if not raw.strip():
        raise _invalid(f"the request body is empty: {JSON_OBJECT}")
    try:
        data: Any = json.loads(raw)
    except UnicodeDecodeError as exc:
        raise _invalid(f"the request body is not valid JSON: it is not UTF-8 text (byte {raw[exc.start]:#04x} at "
                       f"position {exc.start}); {JSON_OBJECT}") from None
    except json.JSONDecodeError as exc:
        raise _invalid(f"the request body is not valid JSON ({exc.msg} at character {exc.pos}); {JSON_OBJECT}") \
            from None
    except RecursionError:  # arrays or objects nested deeper than the parser's recursion limit
        raise _invalid(f"the request body is not valid JSON (nested too deeply); {JSON_OBJECT}") from None
    except ValueError:  # an integer literal over Python's 4300-digit conversion limit
        raise _invalid(f"the request body is not valid JSON (a number is too long); {JSON_OBJECT}") from None
    if not isinstance(data, dict):
        raise _invalid(f"request body: {JSON_OBJECT}, got {json_kind(data)}")
    try:
        return kind.model_validate(data)
    except ValidationError as exc:
        raise _invalid(*validation_message(list(exc.errors()))) from None


def openapi_body(kind: type[BaseModel]) -> dict:
    schema = kind.model_json_schema()
    defs = schema.pop("$defs", {})

    def inline(node):  # the nested models in place of their $refs (the schema sits outside #/components)
        if isinstance(node, dict):
            ref = node.get("$ref")
            return inline(defs[ref.rsplit("/", 1)[-1]]) if ref else {k: inline(v) for k, v in node.items()}
        return [inline(v) for v in node] if isinstance(node, list) else node

    return {"requestBody": {"required": True, "content": {"application/json": {"schema": inline(schema)}}}}


OPENAPI_BODY = openapi_body(ChatCompletionRequest)
