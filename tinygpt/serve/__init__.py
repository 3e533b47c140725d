"""The OpenAI-compatible HTTP server (`tinygpt serve`): FastAPI over one ChatEngine (docs/serving.md).

    cli.py         the command: launch config -> engine -> app -> uvicorn
    app.py         the app and its endpoints (/v1/chat/completions, /v1/models, /health)
    completions.py /v1/completions: a raw prompt continued (OpenAI's legacy text completions)
    respond.py     a job's events as the HTTP answer (JSON or server-sent events), for both endpoints
    body.py        the request body: its size limit, its JSON read into the request
    schema.py      the requests (pydantic), the options refused, and their mapping onto GenerationSettings
    images.py      which image URLs are taken, and the size checks made before decoding
    runner.py      the bounded queue, the worker thread that runs the engine, cancelling and shutdown
    shapes.py      the response objects (chat.completion, chunks, the boxes extension, text_completion)
    usage.py       token counts and finish_reason
    errors.py      OpenAI-style error bodies for every refusal
    background.py  uvicorn that ends the admitted requests when it stops; in a thread (tests, benchmark)
    bench.py       the overhead benchmark (python -m tinygpt.serve.bench)

Layer: an entry point, above the twin, evaluation and the chat engine (pyproject.toml, [tool.importlinter])."""
