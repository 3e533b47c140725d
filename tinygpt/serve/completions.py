"""``POST /v1/completions``: OpenAI's legacy text-completions API (llama.cpp's server and vLLM serve it too).

    add_completions(v1_router, engine, runner, model_name)     # tinygpt.serve.app does this

The model continues the raw ``prompt`` (a string, or a list holding exactly one string): no chat template, no images;
it is laid out as a conversation starts, [BOS] then the prompt's tokens (`ChatEngine.complete`). The answer is a
``text_completion`` object, ``choices[0].text`` exactly the generated text (whitespace included, cut before the
first of the request's ``stop`` strings), or with ``stream: true`` server-sent events of ``text_completion`` objects
ending with ``data: [DONE]``; ``finish_reason`` and ``usage`` come from the ids generated, as chat's
(tinygpt.serve.usage). The model's own stop strings belong to its chat template and do not apply here: it stops at
the end token, the token budget or a ``stop`` string.

Requests are checked as chat's are (tinygpt.serve.schema, one check for both): ``max_tokens`` (default the
config's), ``temperature``, ``top_p``, ``stop``, ``seed``, ``stream``, ``stream_options.include_usage`` and
``repetition_penalty`` are honoured, ``user`` and other fields that change nothing are ignored, and ``n`` > 1,
``echo``, ``logprobs``, ``best_of`` > 1 and ``suffix`` are refused with a 400 naming the field. The queue, the 429,
the 503 when the server stops and the cancelling of a request whose client leaves are chat's (tinygpt.serve.runner).
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from . import shapes
from .body import openapi_body, read_request
from .errors import model_not_found
from .respond import respond, seed_headers
from .runner import Runner
from .schema import CompletionRequest


def add_completions(router: APIRouter, engine, runner: Runner, model_name: str) -> None:
    @router.post("/completions", openapi_extra=openapi_body(CompletionRequest))
    async def completions(request: Request, response: Response):
        body = read_request(await request.body(), CompletionRequest)
        if body.model != model_name:
            raise model_not_found(body.model, model_name)
        body.check_supported()
        settings = body.settings(engine.settings)
        prompt = body.text()
        runner.admit()
        try:
            job = runner.start(prompt, settings, stream=bool(body.stream))
        except BaseException:
            runner.release()
            raise
        reply = shapes.TextReply(model_name, include_usage=body.include_usage)
        return await respond(job, request, response, reply, bool(body.stream), seed_headers(settings))
