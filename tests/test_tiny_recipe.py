"""The embedded default, very short: the table, the chart, and no silent garbage (a broken decoder is named, the
results are still written, ``train.py`` exits 3); the recorded ceiling follows the installed versions."""

from __future__ import annotations

import json

import pytest
import torch

from tiny_settings import SMALL_LLM, SMALL_VISION


@pytest.fixture(scope="module")
def short_data(tmp_path_factory):
    from tinygpt.tiny.synthetic import Scale, generate

    data = tmp_path_factory.mktemp("tiny-data") / "data"
    generate(data, seed=3, scale=Scale(laion=60, cc_sbu=20, align=20, instruct_images=24, vqa_per_image=2,
                                       multi_image=8, unnatural=10, eval_images=6, eval_vqa_per_image=2,
                                       shard_size=20), progress=False)
    return data


def short_run(small_backbones, data, out, max_steps=2, eval_limit=4):
    from tinygpt.tiny.recipe import run_tiny_recipe

    return run_tiny_recipe(out_dir=out, data_dir=data, cache_dir=small_backbones[0], max_steps=max_steps,
                           eval_limit=eval_limit, final_eval_limit=None, llm=SMALL_LLM, vision=SMALL_VISION,
                           progress=False)


@pytest.mark.slow  # ~40 s on an idle 2-core machine: 4 stages of 2 steps, 5 evaluations
def test_short_recipe_run_writes_the_table_and_the_chart(small_backbones, short_data, tmp_path):
    results = short_run(small_backbones, short_data, tmp_path / "out")
    written = json.loads((tmp_path / "out" / "results.json").read_text())
    assert list(written["stages"]) == ["stage 0", "stage 1", "stage 2", "stage 3", "stage 4"]
    for row in written["stages"].values():
        for key in ("caption_f1", "vqa_accuracy", "grounding_accuracy", "vqa_unparsed", "grounding_unparsed"):
            assert 0.0 <= row["metrics"][key] <= 1.0
    for name in ("stage 0", "stage 1", "stage 2", "stage 3"):
        assert written["stages"][name]["metrics"]["counts"]["vqa"] == 4
    assert written["stages"]["stage 4"]["metrics"]["counts"]["vqa"] == 12  # the whole split: 6 scenes x 2
    table = (tmp_path / "out" / "results.txt").read_text()
    assert table.startswith("stage")
    assert "stage 0, stage 1, stage 2, stage 3: 4 captions, 4 questions, 4 boxes" in table
    assert "stage 4: 6 captions, 12 questions," in table
    # a 2-step run scores low, as it should: the floors are for full-length runs; the decoding self-check passed
    assert "health: ok (decoding self-check, floors not applied to a shortened run)" in table
    assert written["health"]["ok"] is True and written["health"]["floors_applied"] is False
    assert written["stages"]["stage 4"]["steps"] == 2
    assert results["timings_s"]["total"] > 0 and results["cpu_seconds"] > 0
    png = (tmp_path / "out" / "results.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


@pytest.mark.slow  # ~30 s: the same run with the KV cache dropped between decoding steps
def test_a_broken_decoder_is_named_after_the_results_are_written(small_backbones, short_data, tmp_path,
                                                                  monkeypatch):
    """The transformers 5.25 failure, on purpose: the model never sees the cache it is handed, so each step decodes
    without its past. The recipe must still write its table, then refuse to present it."""
    import tinygpt.model.phi as phi
    from tinygpt.errors import BrokenModelError
    from tinygpt.evaluation.health import CANARY_COMMAND

    def drop_cache(explicit, kwargs):
        for name in ("cache", "past_key_values"):
            kwargs.pop(name, None)
        return None

    monkeypatch.setattr(phi, "take_cache", drop_cache)
    with pytest.raises(BrokenModelError) as caught:
        short_run(small_backbones, short_data, tmp_path / "out", max_steps=1, eval_limit=2)
    message = str(caught.value)
    assert "generation with the KV cache disagrees with a plain forward pass" in message
    assert f"torch {torch.__version__}" in message and "transformers " in message and CANARY_COMMAND in message
    assert "\n" not in message
    written = json.loads((tmp_path / "out" / "results.json").read_text())
    assert written["health"]["ok"] is False and written["health"]["problems"]
    assert list(written["stages"]) == ["stage 0", "stage 1", "stage 2", "stage 3", "stage 4"]
    assert "health: BROKEN: generation with the KV cache" in (tmp_path / "out" / "results.txt").read_text()
    assert (tmp_path / "out" / "results.png").is_file()


def test_train_py_prints_one_error_line_and_exits_3_for_broken_results(monkeypatch, capsys):
    import importlib.util
    from pathlib import Path

    import tinygpt.tiny.recipe
    from tinygpt.errors import BrokenModelError
    from tinygpt.evaluation.health import broken_message

    def broken(**kwargs):
        raise BrokenModelError(broken_message(["stage 4 VQA 10.3% < floor 50%"], "outputs/tiny/results.json"))

    monkeypatch.setattr(tinygpt.tiny.recipe, "run_tiny_recipe", broken)
    spec = importlib.util.spec_from_file_location("train_cli", Path(__file__).parents[1] / "train.py")
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    assert train.main([]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: outputs/tiny/results.json: the results are not believable: "
                                               "stage 4 VQA 10.3% < floor 50%")


def test_the_recorded_ceiling_is_measured_again_when_the_versions_change(small_backbones, monkeypatch):
    from tinygpt.evaluation.health import installed_versions
    from tinygpt.tiny import backbones
    from tinygpt.tiny.backbones import MARKER, current_ceiling, recorded_ceiling

    path = small_backbones[1]
    assert recorded_ceiling(path)["versions"] == installed_versions()
    calls = []
    real = backbones.measure_ceiling
    monkeypatch.setattr(backbones, "measure_ceiling", lambda *a: calls.append(a) or real(*a))
    assert current_ceiling(path, progress=False) == recorded_ceiling(path) and not calls  # same versions: kept
    marker = json.loads((path / MARKER).read_text())
    built = marker["figures"]["llm"]["true_code_ceiling"]
    stale = dict(marker["figures"]["llm"]["true_code_ceiling"], versions={"torch": "0", "transformers": "0"},
                 vqa_accuracy=0.119, grounding_accuracy=0.0)
    marker["figures"]["llm"]["true_code_ceiling"] = stale
    (path / MARKER).write_text(json.dumps(marker))
    fresh = current_ceiling(path, progress=False)
    assert len(calls) == 1 and fresh["versions"] == installed_versions()
    assert fresh["scenes"] == 4 and recorded_ceiling(path) == fresh  # recorded for the next run
    # greedy decoding of the same weights under the same versions: the build's own figures, not the stale ones
    assert (fresh["vqa_accuracy"], fresh["grounding_accuracy"]) == (built["vqa_accuracy"], built["grounding_accuracy"])


def test_an_output_location_that_is_a_file_is_refused_before_any_work(tmp_path, monkeypatch):
    import tinygpt.tiny.recipe as recipe
    from tinygpt.errors import UserError

    started = []
    monkeypatch.setattr(recipe, "_ensure_data", lambda *a: started.append(a))
    afile = tmp_path / "afile"
    afile.write_text("the user's file\n")
    with pytest.raises(UserError, match="afile exists and is a file, not a directory"):
        recipe.run_tiny_recipe(out_dir=afile, data_dir=tmp_path / "data", progress=False)
    with pytest.raises(UserError, match="is a file, so .*afile/out cannot be made as a directory"):
        recipe.run_tiny_recipe(out_dir=afile / "out", data_dir=tmp_path / "data", progress=False)
    assert not started and afile.read_text() == "the user's file\n"
