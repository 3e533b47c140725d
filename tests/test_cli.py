"""The ``tinygpt`` front door (tinygpt/cli): it lists its verbs, each verb is the existing entry point with its own
flags and exit codes, and the documented forms (``python train.py``, ``python -m quantize``) still answer as before."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tinygpt.cli import VERBS, main

REPO = Path(__file__).resolve().parents[1]

# a flag that only this verb has, to show that `tinygpt VERB --help` is that verb's own parser
OWN_FLAG = {"train": "--tiny-llm-steps", "build": "--merge-lora", "synth": "--pretrain-size", "export": "--model",
            "random": "--plain", "chat": "--prompt", "bench": "--prefill-tokens", "profile": "--positions",
            "accuracy": "--split",
            "ceiling": "--cache-dir", "demo": "--share", "serve": "--api-key",
            "evaluate": "--restart"}


def _exit_code(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as exited:
        main(argv)
    return exited.value.code


def test_help_lists_every_verb_with_its_summary(capsys):
    assert _exit_code(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: tinygpt")
    for name, verb in VERBS.items():
        assert name in out and verb.summary[:40] in out
    assert set(OWN_FLAG) == set(VERBS)


@pytest.mark.parametrize("name", sorted(OWN_FLAG))
def test_each_verb_help_is_that_entry_points_own(name, capsys):
    assert _exit_code([name, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: tinygpt {name}") and OWN_FLAG[name] in out
    others = {flag for verb, flag in OWN_FLAG.items() if verb != name} - {"--model"}  # accuracy has --model too
    assert not any(f"{flag} " in out or f"{flag}\n" in out for flag in others)


def test_no_verb_or_an_unknown_verb_is_a_usage_error(capsys):
    assert _exit_code([]) == 2
    assert _exit_code(["fly"]) == 2
    assert "invalid choice: 'fly'" in capsys.readouterr().err


def test_a_user_error_is_one_error_line_and_exit_2(tmp_path, capsys):
    assert main(["train", "--cfg-path", str(tmp_path / "missing.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "missing.yaml: config file does not exist" in err[0]


def test_synth_writes_a_dataset(tmp_path, monkeypatch, capsys):
    import tinygpt.tiny.synthetic as synthetic

    micro = synthetic.Scale(laion=8, cc_sbu=4, align=4, instruct_images=6, vqa_per_image=2, multi_image=4, unnatural=4,
                            eval_images=4, eval_vqa_per_image=2, shard_size=8)
    monkeypatch.setitem(synthetic.SCALES, "tiny", micro)  # the verb's wiring, not the generator's speed
    out = tmp_path / "data"
    assert main(["synth", "--out", str(out), "--scale", "tiny", "--pretrain-size", "32", "--instruct-size", "32"]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    assert (out / "vqa" / "vqa_train.json").is_file() and sorted((out / "laion").glob("*.tar"))
    assert main(["synth", "--out", str(tmp_path / "x"), "--pretrain-size", "8"]) == 2  # generate's UserError


def _run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True, cwd=REPO, timeout=120)


def test_the_documented_forms_answer_as_before():
    train = _run("train.py", "--help")
    assert train.returncode == 0 and train.stdout.startswith("usage: train.py") and "--cfg-path" in train.stdout
    quantize = _run("-m", "quantize", "--help")
    assert quantize.returncode == 0 and quantize.stdout.startswith("usage: python -m quantize")
    assert all(name in quantize.stdout for name in ("export", "random", "chat", "bench", "profile", "accuracy"))


def test_python_m_tinygpt_cli_is_the_console_script():
    result = _run("-m", "tinygpt.cli", "--help")
    assert result.returncode == 0 and result.stdout.startswith("usage: tinygpt") and "ceiling" in result.stdout


def test_train_quiet_turns_the_progress_bar_off(monkeypatch):
    import tinygpt.tiny.backbones as backbones
    import tinygpt.train.stage as stage

    seen = []
    monkeypatch.setattr(stage, "check_outputs", lambda cfg: None)
    monkeypatch.setattr(backbones, "resolve_builtin", lambda cfg, build=True: None)
    monkeypatch.setattr(stage, "run_stage", lambda cfg: seen.append(cfg.run.progress) or "out")
    config = str(Path(__file__).resolve().parents[1] / "train_configs" / "tiny" / "stage1.yaml")
    assert main(["train", "--cfg-path", config]) == 0 and main(["train", "--cfg-path", config, "--quiet"]) == 0
    assert seen == [True, False]
