"""The OpenAI-compatible HTTP server (`tinygpt serve`): FastAPI over one ChatEngine (docs/serving.md).

    cli.py         the command: launch config -> engine -> app -> uvicorn
    app.py         the app and its endpoints (/v1/chat/completions, /v1/models, /health)
    body.py        the request body: its size limit, its JSON read into the request
    schema.py      the request (pydantic), the options refused, and its mapping onto GenerationSettings
    images.py      which image URLs are taken, and the size checks made before decoding
    runner.py      the bounded queue, the worker thread that runs the engine, cancelling and shutdown
    shapes.py      the response objects (chat.completion, chunks, the boxes extension)
    usage.py       token counts and finish_reason
    errors.py      OpenAI-style error bodies for every refusal
    background.py  uvicorn that ends the admitted requests when it stops; in a thread (tests, benchmark)
    bench.py       the overhead benchmark (python -m tinygpt.serve.bench)

Layer: an entry point, above the twin, evaluation and the chat engine (pyproject.toml, [tool.importlinter])."""
