"""Evaluation config checks made when the config is read: a misspelt ``benchmark.options`` key is one UserError naming
the file (or --options) and the key, with the closest accepted option, before any data or model is touched."""

from __future__ import annotations

from pathlib import Path

import pytest

from tinygpt.errors import UserError
from tinygpt.evaluation.benchmarks import common, get_benchmark
from tinygpt.evaluation.config import load_eval_config

REPO = Path(__file__).resolve().parents[1]
GQA = REPO / "eval_configs" / "gqa.yaml"


def write(tmp_path: Path, benchmark: str) -> Path:
    path = tmp_path / "eval.yaml"
    path.write_text(f"model: {{backend: torch, path: {tmp_path / 'no-model'}}}\nbenchmark: {benchmark}\n")
    return path


def test_a_misspelt_option_in_the_file_is_refused_when_the_config_is_read(tmp_path):
    path = write(tmp_path, f"{{name: gqa, root: {tmp_path / 'no-data'}, options: {{limt: 3}}}}")
    with pytest.raises(UserError) as info:
        load_eval_config(path, check_model=False)
    assert str(info.value) == (f"{path}: benchmark.options.limt: unknown option for benchmark gqa; expected one of "
                               "limit, images, prompt, prompt_style (did you mean 'limit'?)")


def test_a_misspelt_option_from_options_names_options(tmp_path):
    with pytest.raises(UserError) as info:
        load_eval_config(GQA, [f"benchmark.root={tmp_path}", "benchmark.options.prompt_stile=tinygpt-v"],
                         check_model=False)
    assert str(info.value) == (f"--options (over {GQA}): benchmark.options.prompt_stile: unknown option for "
                               "benchmark gqa; expected one of limit, images, prompt, prompt_style (did you mean "
                               "'prompt_style'?)")


def test_each_benchmark_is_checked_against_its_own_options(tmp_path):
    path = write(tmp_path, "{name: shapes, options: {caption_promt: bare}}")
    with pytest.raises(UserError, match=r"benchmark\.options\.caption_promt: unknown option for benchmark shapes; "
                                        r"expected one of limit, caption_prompt \(did you mean 'caption_prompt'\?\)$"):
        load_eval_config(path, check_model=False)
    path = write(tmp_path, "{name: shapes, options: {prompt_style: official}}")  # gqa's, not the shapes suite's
    with pytest.raises(UserError, match=r"benchmark\.options\.prompt_style: unknown option for benchmark shapes"):
        load_eval_config(path, check_model=False)
    good = load_eval_config(write(tmp_path, "{name: shapes, options: {caption_prompt: bare, limit: 2}}"),
                            check_model=False)
    assert good.benchmark.options == {"caption_prompt": "bare", "limit": 2}
    cfg = load_eval_config(GQA, ["benchmark.options.prompt_style=tinygpt-v", "benchmark.options.images=/x"],
                           check_model=False)
    assert cfg.benchmark.options == {"prompt_style": "tinygpt-v", "images": "/x"}


def test_accepted_options_come_from_the_benchmark_modules():
    from tinygpt.evaluation.config import accepted_options

    assert accepted_options(get_benchmark("shapes")) == ("limit", "caption_prompt")
    assert accepted_options(get_benchmark("multi_image")) == ("limit",)
    for name in ("gqa", "vsr", "iconqa", "vizwiz", "hateful_memes", "okvqa", "vqav2", "refcoco", "refcoco+",
                 "refcocog", "pope"):
        assert accepted_options(get_benchmark(name)) == common.OPTIONS, name


def test_evaluate_exits_2_before_reading_data_or_model(tmp_path, capsys):
    from tinygpt.cli import main as tinygpt

    path = write(tmp_path, f"{{name: vsr, root: {tmp_path / 'no-data'}, options: {{imags: /x}}}}")
    assert tinygpt(["evaluate", "--cfg-path", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {path}: benchmark.options.imags: unknown option for benchmark vsr; expected one of "
                   "limit, images, prompt, prompt_style (did you mean 'images'?)"]
