"""Launch configs (eval_configs/*.yaml, tinygpt.chat.launch): every shipped one parses; every mistake is one
UserError naming the file and the key; a missing model names the command that makes it."""

from __future__ import annotations

from pathlib import Path

import pytest

from tinygpt.chat.launch import eval_configs_dir, load_launch_config, open_engine
from tinygpt.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def test_every_shipped_config_parses():
    # the launch configs; the others (one per benchmark, with a benchmark section) are tests/test_evaluate.py's
    names = sorted(p.stem for p in eval_configs_dir().glob("*.yaml") if "\nbenchmark:" not in p.read_text())
    assert names == ["gguf", "stage1", "stage2", "stage3", "stage4", "tiny"]
    for name in names:
        cfg = load_launch_config(ROOT / "eval_configs" / f"{name}.yaml", check_model=False)
        assert cfg.name == name and cfg.model.backend == ("gguf" if name == "gguf" else "torch")
    tiny = load_launch_config(ROOT / "eval_configs" / "tiny.yaml", check_model=False)
    assert tiny.model.path == "outputs/tiny/stage4"


@pytest.mark.parametrize("text, message", [
    ("model: {backend: torch, path: x, devise: cpu}", "unknown key model.devise (did you mean 'device'?)"),
    ("model: {backend: torch, path: x}\ngeneraton: {}", "unknown section 'generaton' (did you mean 'generation'?)"),
    ("model: {backend: tf, path: x}", "model.backend must be one of torch, gguf, got 'tf'"),
    ("model: {backend: torch}", "model.path is required"),
    ("model: {backend: torch, path: x, bits: 3}", "model.bits must be empty, 8 or 4"),
    ("model: {backend: gguf, path: x, threads: 0}", "model.threads must be >= 1"),
    ("model: {backend: torch, path: x}\ngeneration: {temperature: -1}", "generation.temperature: must be >= 0"),
    ("model: {backend: torch, path: x}\ngeneration: {max_new_tokens: many}", "max_new_tokens must be an integer"),
    ("model: {backend: torch, path: x}\ngeneration: {stop: [1]}", "generation.stop must be a string or a list"),
    ("model: {backend: torch, path: x}\nlimits: {max_images: true}", "limits.max_images must be an integer"),
    ("model: {backend: torch, path: x}\nlimits: {queue_size: 0}", "limits.queue_size must be >= 1"),
    ("[1, 2]", "the top level must be a mapping"),
    ("model: {backend: torch, path: x", "not valid YAML"),
])
def test_mistakes_name_the_file_and_the_key(tmp_path, text, message):
    path = tmp_path / "mine.yaml"
    path.write_text(text + "\n")
    with pytest.raises(UserError) as raised:
        load_launch_config(path, check_model=False)
    assert str(raised.value).startswith(str(path)) and message in str(raised.value)


def test_missing_models_name_the_command_that_makes_them(tmp_path):
    for backend, hint in (("torch", "python train.py --cfg-path train_configs/stageN.yaml"),
                          ("gguf", "python -m quantize export")):
        path = tmp_path / f"{backend}.yaml"
        path.write_text(f"model: {{backend: {backend}, path: {tmp_path / 'none'}}}\n")
        with pytest.raises(UserError, match="none") as raised:
            load_launch_config(path)
        assert hint in str(raised.value)


@pytest.mark.parametrize("files, message", [
    ((), "is not a saved model directory (no config.json); train it first"),
    (("trainable.safetensors", "optimizer.pt"), "is a training checkpoint (the state a run resumes from), not a saved "
                                                "model; give the stage's run.output_dir"),
])
def test_a_folder_without_a_model_says_what_it_is(tmp_path, files, message):
    step = tmp_path / "checkpoints" / "step_100"  # a training checkpoint was "no config.json; train it first"
    step.mkdir(parents=True)
    for name in files:
        (step / name).write_bytes(b"x")
    path = tmp_path / "torch.yaml"
    path.write_text(f"model: {{backend: torch, path: {step}}}\n")
    with pytest.raises(UserError, match="step_100") as raised:
        load_launch_config(path)
    assert message in str(raised.value)


def test_the_config_sets_the_engines_defaults(chat_model, tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(f"model: {{backend: gguf, path: {chat_model[1]}}}\ngeneration: {{max_new_tokens: 7, stop: END}}\n"
                    "limits: {image_cache_size: 3}\n")
    engine = open_engine(load_launch_config(path))
    assert engine.settings.max_new_tokens == 7 and engine.settings.stop == ("END",)
    assert engine.image_cache_size == 3 and engine.name.startswith("gguf:")
