"""Guards of `python evaluate.py` (tinygpt.evaluation.runner, resume, config): a model replaced at the same path is
refused on resume (and a resume says so), two runs into one out_dir are refused, the garbage check sees the official
scores whatever the headline, a generation section is refused, and an --options typo is blamed on --options even when
the file's own model is missing. Everything runs on a stand-in engine over a few POPE records written in tmp_path."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

from tinygpt.errors import UserError
from tinygpt.evaluation import runner
from tinygpt.evaluation.config import load_eval_config
from tinygpt.evaluation.resume import run_lock
from tinygpt.evaluation.runner import PREDICTIONS, run_evaluation

N = 6


class _Engine:
    """Answers every POPE question with ``answer`` (default: right, from the records)."""

    name = "stand-in"
    backend = SimpleNamespace(prompt=SimpleNamespace(template="[INST] {} [/INST]", end_sym=""))
    stop_strings = ()

    def __init__(self, answer: str | None = None):
        self.answer, self.asked = answer, 0

    def chat_batch(self, conversations, settings=None):
        self.asked += len(conversations)
        return [self.answer or ("yes" if "square" in c.turns[-1].user else "no") for c in conversations]


def _pope(root: Path) -> Path:
    (root / "val2014").mkdir(parents=True)
    Image.new("RGB", (8, 8), "red").save(root / "val2014" / "COCO_val2014_000000000001.jpg")
    records = [{"question_id": i, "image": "COCO_val2014_000000000001.jpg", "image_id": 1,
                "text": f"Is there a {'square' if i % 2 else 'circle'} in the image?",
                "label": "yes" if i % 2 else "no"} for i in range(N)]
    (root / "coco_pope_random.json").write_text("".join(json.dumps(r) + "\n" for r in records))
    return root


def _model(directory: Path, weights: bytes = b"w" * 64, base: str | None = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps({"model_type": "tinygptv", "base_model": base}))
    (directory / "model.safetensors").write_bytes(weights)
    return directory


def _config(tmp_path: Path, model: Path, extra: str = "") -> Path:
    path = tmp_path / "pope.yaml"
    path.write_text(f"model: {{backend: torch, path: {model}, device: cpu}}\n"
                    f"benchmark: {{name: pope, root: {_pope(tmp_path / 'pope') if not (tmp_path / 'pope').exists() else tmp_path / 'pope'}, split: random}}\n"  # noqa: E501
                    f"run: {{out_dir: {tmp_path / 'out'}, batch_size: 2}}\n{extra}")
    return path


def _replace(path: Path, data: bytes) -> None:
    """The file rewritten as a retrain / re-export would (new content, a later mtime)."""
    before = path.stat().st_mtime_ns
    path.write_bytes(data)
    os.utime(path, ns=(before + 10**9, before + 10**9))


# ---- 1. a model replaced at the same path --------------------------------------------------------------------------

def test_a_model_replaced_at_the_same_path_is_refused_and_a_resume_says_so(tmp_path, capsys):
    model = _model(tmp_path / "stage4")
    cfg = load_eval_config(_config(tmp_path, model), check_model=False)
    first = run_evaluation(cfg, engine=_Engine(), quiet=True)
    assert first["n"] == N and first["model_id"] == json.loads(
        (tmp_path / "out" / PREDICTIONS).read_text().splitlines()[0])["fingerprint"]["model_id"]
    capsys.readouterr()
    again = run_evaluation(cfg, engine=_Engine(), quiet=True)  # the same model: everything reused, and said
    assert again["timing"]["reused"] == N
    assert f"resuming: {N} of {N} predictions from {tmp_path / 'out' / PREDICTIONS}" in capsys.readouterr().err
    _replace(model / "model.safetensors", b"v" * 80)  # retrained in place
    with pytest.raises(UserError, match=r"predictions of another run \(model_id .*the model files changed.*--restart"):
        run_evaluation(cfg, engine=_Engine(), quiet=True)
    fresh = run_evaluation(cfg, restart=True, engine=_Engine(), quiet=True)
    assert fresh["timing"]["reused"] == 0 and fresh["model_id"] != first["model_id"]


def test_another_models_predictions_name_the_model_not_a_change_of_its_files(tmp_path):
    """A GGUF export evaluated into the PyTorch run's run.out_dir was told 'the model files changed since these
    predictions were made', as if the model had been retrained: it is another model, and the message names it."""
    first, other = _model(tmp_path / "stage4"), _model(tmp_path / "other")
    _replace(other / "model.safetensors", b"o" * 70)
    run_evaluation(load_eval_config(_config(tmp_path, first), check_model=False), engine=_Engine(), quiet=True)
    with pytest.raises(UserError) as refused:
        run_evaluation(load_eval_config(_config(tmp_path, other), check_model=False), engine=_Engine(), quiet=True)
    assert f"model {str(first.resolve())!r} (now {str(other.resolve())!r})" in str(refused.value)
    assert "the model files changed" not in str(refused.value)


def test_a_change_in_the_base_model_of_a_trainable_only_directory_is_refused(tmp_path):
    base = _model(tmp_path / "stage3")
    model = _model(tmp_path / "stage4", base="../stage3")
    cfg = load_eval_config(_config(tmp_path, model), check_model=False)
    run_evaluation(cfg, engine=_Engine(), quiet=True)
    _replace(base / "model.safetensors", b"x" * 99)
    with pytest.raises(UserError, match="model_id"):
        run_evaluation(cfg, engine=_Engine(), quiet=True)


def test_a_gguf_export_replaced_at_the_same_path_is_refused(tmp_path):
    export = tmp_path / "gguf"
    export.mkdir()
    (export / "llm-f16.gguf").write_bytes(b"g" * 32)
    (export / "vision.gguf").write_bytes(b"v" * 32)
    path = _config(tmp_path, export)
    path.write_text(path.read_text().replace("backend: torch", "backend: gguf"))
    cfg = load_eval_config(path, check_model=False)
    run_evaluation(cfg, engine=_Engine(), quiet=True)
    _replace(export / "llm-f16.gguf", b"h" * 40)
    with pytest.raises(UserError, match="model_id"):
        run_evaluation(cfg, engine=_Engine(), quiet=True)


# ---- 2. one run per out_dir ----------------------------------------------------------------------------------------

def test_a_second_run_into_the_same_out_dir_stops_at_once(tmp_path):
    cfg = load_eval_config(_config(tmp_path, _model(tmp_path / "m")), check_model=False)
    engine = _Engine()
    out = tmp_path / "out"
    with run_lock(out):  # another evaluation holds it (flock: per open file, so in-process too)
        with pytest.raises(UserError) as raised:
            run_evaluation(cfg, engine=engine, quiet=True)
    assert str(raised.value).startswith(f"{out} is in use by another evaluation (process {os.getpid()})")
    assert engine.asked == 0 and not (out / PREDICTIONS).exists()
    assert run_evaluation(cfg, engine=engine, quiet=True)["n"] == N  # released when the holder ends


# ---- 3. garbage under either scoring -------------------------------------------------------------------------------

def test_garbage_in_the_official_scores_warns_under_the_compat_headline(tmp_path, monkeypatch, capsys):
    cfg = load_eval_config(_config(tmp_path, _model(tmp_path / "m")), ["run.scoring=tinygpt-v-compat"],
                           check_model=False)
    scores = {"official": {"metric": "f1", "value": 0.01}, "tinygpt-v-compat": {"metric": "f1", "value": 0.6}}
    monkeypatch.setattr(runner, "score_all", lambda bench, samples, predictions: scores)
    summary = run_evaluation(cfg, engine=_Engine(), quiet=True)
    assert summary["value"] == 0.6 and summary["warning"] and "f1 1.0% is under 5%" in summary["warning"]
    assert "WARNING" in capsys.readouterr().err


# ---- 4. the generation section -------------------------------------------------------------------------------------

def test_a_generation_section_is_refused_naming_the_key(tmp_path):
    path = _config(tmp_path, _model(tmp_path / "m"), "generation: {repetition_penalty: 1.05}\n")
    with pytest.raises(UserError) as raised:
        load_eval_config(path, check_model=False)
    assert str(raised.value).startswith(f"{path}: generation.repetition_penalty: an evaluation config takes no "
                                        "generation settings")
    clean = _config(tmp_path, _model(tmp_path / "m"))
    with pytest.raises(UserError, match=rf"^--options \(over {clean}\): generation.max_new_tokens: "):
        load_eval_config(clean, ["generation.max_new_tokens=5"], check_model=False)


# ---- 5. --options blamed when the file's own model is missing ------------------------------------------------------

@pytest.mark.parametrize("options, message", [
    (["run.limt=5"], "unknown key run.limt"),
    (["run.scoring=lenient"], "run.scoring must be one of official, tinygpt-v-compat, got 'lenient'"),
])
def test_an_override_typo_is_blamed_on_options_when_the_default_model_is_missing(tmp_path, options, message):
    path = _config(tmp_path, tmp_path / "no-such-model")
    with pytest.raises(UserError) as raised:
        load_eval_config(path, [f"model.path={_model(tmp_path / 'm')}", *options])
    assert str(raised.value).startswith(f"--options (over {path}): ") and message in str(raised.value)


def test_a_missing_model_of_the_file_itself_is_still_blamed_on_the_file(tmp_path):
    path = _config(tmp_path, tmp_path / "no-such-model")
    with pytest.raises(UserError) as raised:
        load_eval_config(path, ["run.batch_size=3"])
    assert str(raised.value).startswith(f"{path}: ") and "no-such-model" in str(raised.value)
