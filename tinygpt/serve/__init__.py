"""The OpenAI-compatible HTTP server (`tinygpt serve`): FastAPI over one ChatEngine (docs/serving.md).

    cli.py         the command: launch config -> engine -> app -> uvicorn
    app.py         the app and its endpoints (/v1/chat/completions, /v1/models, /health)
    schema.py      the request (pydantic) and its mapping onto GenerationSettings
    images.py      which image URLs are taken, and the size checks made before decoding
    runner.py      the bounded queue and the worker thread that runs the engine
    shapes.py      the response objects (chat.completion, chunks, the boxes extension)
    usage.py       token counts and finish_reason
    errors.py      OpenAI-style error bodies for every refusal
    background.py  uvicorn in a thread (tests, benchmark) and the listening socket
    bench.py       the overhead benchmark (python -m tinygpt.serve.bench)

Layer: an entry point, above the twin, evaluation and the chat engine (pyproject.toml, [tool.importlinter])."""
