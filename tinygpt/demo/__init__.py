"""The gradio demo (`python demo.py --cfg-path eval_configs/<name>.yaml`): a multimodal chat over one ChatEngine.

cli (the command) -> app (the Blocks: layout and events) -> handlers (the events' code, over the engine) ->
conversation (history <-> OpenAI messages, task tags), uploads (file checks), drawing (boxes, the clicked region),
examples (the shipped synthetic-shapes images). docs/demo.md is the manual.

Layer: an entry point, above the twin, evaluation and the chat engine (pyproject.toml, [tool.importlinter])."""
