"""User errors of the training config check (train.py --check), the shared ``--options`` parsing and the evaluation
runner (the audit's findings): one ``error:`` line, exit status 2, naming the file or ``--options`` and the full key.

Covered: webdataset shard patterns whose folder (or every shard) is missing, shard lists of which nothing exists;
``--options`` values that are not valid YAML (train.py and evaluate.py); a prompt option without the benchmark's
question placeholder; messages that name ``--options <key>`` when the value came from the command line
(benchmark.root, run.out_dir, benchmark.options.*, model.device) and a batch size range said once."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from tinygpt.cli import main as tinygpt
from tinygpt.config import check_paths, load_config
from tinygpt.errors import UserError
from tinygpt.evaluation.benchmarks.common import parse_options, template
from tinygpt.evaluation.config import load_eval_config
from tinygpt.evaluation.runner import run_evaluation

REPO = Path(__file__).resolve().parents[1]
STAGE1, STAGE2 = REPO / "train_configs" / "stage1.yaml", REPO / "train_configs" / "stage2.yaml"
TINY1 = REPO / "train_configs" / "tiny" / "stage1.yaml"
GQA = REPO / "eval_configs" / "gqa.yaml"
SHARDS = "data.datasets.laion.params.shards"


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


# ------------------------------------------------------------------------------------------------ 7. shards
def test_a_missing_shard_folder_is_named_even_when_its_parent_exists(tmp_path):
    cfg = load_config(STAGE1, ["model.init_from=null", f"vars.data_root={tmp_path}"])  # tmp_path/laion: missing
    with pytest.raises(UserError, match=rf"^{STAGE1}: {SHARDS}: .*laion/\{{00000\.\.05244\}}\.tar: the folder "
                                        rf"{tmp_path}/laion does not exist"):
        check_paths(cfg)
    (tmp_path / "laion").mkdir()
    with pytest.raises(UserError, match=rf"{SHARDS}: .*: no shard file of this pattern exists in {tmp_path}/laion"):
        check_paths(cfg)
    (tmp_path / "laion" / "00007.tar").write_bytes(b"")
    (tmp_path / "cc_sbu").mkdir()
    (tmp_path / "cc_sbu" / "00000.tar").write_bytes(b"")
    check_paths(cfg)  # one shard of each pattern is enough (the loader skips missing ones with a warning)


def test_a_list_of_shards_is_refused_only_when_none_exists(tmp_path):
    """The loader skips missing shards with a warning (a partial download): a list naming one missing file used to
    be refused by the check; now only a list of which nothing exists is, naming its first entry."""
    listed = json.dumps([f"{tmp_path}/a.tar", f"{tmp_path}/b.tar", f"{tmp_path}/more/{{0..3}}.tar"])
    (tmp_path / "cc_sbu").mkdir()
    (tmp_path / "cc_sbu" / "00000.tar").write_bytes(b"")  # the stage's other dataset
    cfg = load_config(STAGE1, ["model.init_from=null", f"vars.data_root={tmp_path}", f"{SHARDS}={listed}"])
    with pytest.raises(UserError, match=rf"^--options: {SHARDS}: {tmp_path}/a.tar does not exist"):
        check_paths(cfg)
    (tmp_path / "b.tar").write_bytes(b"")
    check_paths(cfg)
    (tmp_path / "b.tar").unlink()
    (tmp_path / "more").mkdir()
    (tmp_path / "more" / "2.tar").write_bytes(b"")
    check_paths(cfg)


def test_a_shard_pattern_from_options_is_checked(tmp_path):
    cfg = load_config(TINY1, [f"{SHARDS}={tmp_path}/nosuchdir/{{00000..00001}}.tar"])
    with pytest.raises(UserError, match=rf"^--options: {SHARDS}: {tmp_path}/nosuchdir/.*: the folder "
                                        rf"{tmp_path}/nosuchdir does not exist"):
        check_paths(cfg)


def test_train_check_with_missing_shards_exits_2(chat_model, tmp_path, monkeypatch, capsys):
    from tinygpt.cli.train import main as train

    monkeypatch.delenv("TINYGPT_DATA", raising=False)
    monkeypatch.chdir(tmp_path)  # data/laion does not exist here; data/ does not either
    assert train(["--cfg-path", str(STAGE2), "--check", "--options", f"model.init_from={chat_model[0]}"]) == 2
    line = _one_error_line(capsys)
    assert f"{SHARDS}: data/laion/{{00000..05244}}.tar: the folder data/laion does not exist" in line


# ------------------------------------------------------------------------------------------------ 8. --options YAML
def test_options_that_are_not_yaml_name_the_item(capsys):
    from tinygpt.cli.train import main as train

    with pytest.raises(UserError, match=r"^--options: schedule\.init_lr=\[a: not valid YAML \("):
        load_config(TINY1, ["schedule.init_lr=[a"])
    with pytest.raises(UserError, match=r"^--options: benchmark\.split=\[a: not valid YAML \("):
        load_eval_config(GQA, ["benchmark.split=[a"], check_model=False)
    assert train(["--cfg-path", str(TINY1), "--check", "--options", "schedule.init_lr=[a"]) == 2
    assert _one_error_line(capsys).startswith("error: --options: schedule.init_lr=[a: not valid YAML")
    assert tinygpt(["evaluate", "--cfg-path", str(GQA), "--options", "benchmark.split=[a"]) == 2
    assert _one_error_line(capsys).startswith("error: --options: benchmark.split=[a: not valid YAML")


# ------------------------------------------------------------------------------------------------ 9, 10. evaluation
def _gqa_root(tmp_path: Path) -> Path:
    root = tmp_path / "gqa"
    (root / "images").mkdir(parents=True, exist_ok=True)
    questions = {"201": {"imageId": "n1", "question": "Is the sky blue?", "answer": "yes", "types": {}}}
    (root / "testdev_balanced_questions.json").write_text(json.dumps(questions))
    Image.new("RGB", (32, 32)).save(root / "images" / "n1.jpg")
    return root


def _run(tmp_path: Path, *options: str, root: Path | None = None) -> UserError:
    root = root or _gqa_root(tmp_path)
    cfg = load_eval_config(GQA, [f"benchmark.root={root}", f"run.out_dir={tmp_path / 'out'}", *options],
                           check_model=False)
    with pytest.raises(UserError) as raised:
        run_evaluation(cfg, quiet=True)
    return raised.value


def test_a_prompt_without_the_question_is_refused(tmp_path):
    error = _run(tmp_path, "benchmark.options.prompt=no_placeholder")
    assert str(error).startswith("--options benchmark.options.prompt: 'no_placeholder' holds no {question}")
    options = parse_options("iconqa", {"prompt": "Pick one of {choices}"})
    with pytest.raises(UserError, match=r"holds no \{question\}, so every sample would be asked the same text"):
        template(options, "{question} {choices}", "{question}", ("question", "choices"), needs=("question",))
    assert template(parse_options("vsr", {"prompt": "{caption}?"}), "{caption}", "{caption}",
                    ("caption", "question")) == "{caption}?"  # any of the aliases of the statement


def test_evaluate_with_a_prompt_without_the_question_exits_2(tmp_path, capsys, chat_model):
    root = _gqa_root(tmp_path)  # a model that exists (a fresh clone has no outputs/tiny/stage4)
    assert tinygpt(["evaluate", "--cfg-path", str(GQA), "--options", f"benchmark.root={root}",
                    f"run.out_dir={tmp_path / 'out'}", f"model.path={chat_model[0]}",
                    "benchmark.options.prompt=no_placeholder"]) == 2
    assert "error: --options benchmark.options.prompt: 'no_placeholder' holds no {question}" in \
        _one_error_line(capsys)


def test_batch_size_has_one_range(tmp_path):
    for value in ("-3", "0"):
        with pytest.raises(UserError, match=rf"run\.batch_size must be >= 1, got {value}$"):
            load_eval_config(GQA, [f"run.batch_size={value}"], check_model=False)


def test_messages_name_the_option_that_set_the_value(tmp_path):
    missing = tmp_path / "nonexistent" / "gqa"
    assert str(_run(tmp_path, root=missing)).startswith(f"--options benchmark.root: {missing} is not a directory")
    (tmp_path / "a-file").write_text("x")
    out = _run(tmp_path, f"run.out_dir={tmp_path / 'a-file' / 'out'}")
    assert str(out).startswith("--options run.out_dir: ") and "is a file" in str(out)
    with pytest.raises(UserError) as limt:  # said when the config is read, before any data or model
        load_eval_config(GQA, ["benchmark.options.limt=3"], check_model=False)
    assert str(limt.value).startswith(f"--options (over {GQA}): benchmark.options.limt: unknown option for "
                                      "benchmark gqa")
    assert "(did you mean 'limit'?)" in str(limt.value)


def test_messages_name_the_file_when_the_file_set_the_value(tmp_path):
    path = tmp_path / "gqa.yaml"
    path.write_text(f"model: {{backend: torch, path: x}}\nbenchmark: {{name: gqa, root: {tmp_path / 'none'}, "
                    f"options: {{limit: 3}}}}\nrun: {{out_dir: {tmp_path / 'out'}}}\n")
    cfg = load_eval_config(path, check_model=False)
    with pytest.raises(UserError, match=rf"^{path}: benchmark\.root: {tmp_path}/none is not a directory"):
        run_evaluation(cfg, quiet=True)
    path.write_text(path.read_text().replace("limit: 3", "limt: 3"))
    root = _gqa_root(tmp_path)
    with pytest.raises(UserError, match=rf"^{path}: benchmark\.options\.limt: unknown option"):
        load_eval_config(path, [f"benchmark.root={root}"], check_model=False)


def test_a_device_without_cuda_names_model_device(chat_model, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is visible: device cuda is fine here")
    error = _run(tmp_path, f"model.path={chat_model[0]}", "model.device=cuda")
    assert str(error).startswith("--options model.device: cuda: no CUDA GPU is visible to torch"), error
