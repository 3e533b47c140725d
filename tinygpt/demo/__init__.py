"""The gradio demo (`python demo.py --cfg-path eval_configs/<name>.yaml`): a multimodal chat over one ChatEngine.

Layer: an entry point, above the twin, evaluation and the chat engine (pyproject.toml, [tool.importlinter])."""
