"""The OpenAI-compatible HTTP server (`tinygpt serve`): FastAPI over one ChatEngine.

Layer: an entry point, above the twin, evaluation and the chat engine (pyproject.toml, [tool.importlinter])."""
