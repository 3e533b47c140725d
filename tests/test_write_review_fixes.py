"""Writers killed half-way: what the next run finds (review of the file writers, "nothing is left half-written").

* the sweep of a target's temporaries never removes a live writer's temporary of another target whose name starts
  with the same characters (``out`` / ``out.v2``);
* the synthetic datasets and the synthetic benchmark files, killed (SIGKILL) while writing: the rerun writes the
  output and removes what the killed run left next to it;
* ``--restart`` twice in one second: the first run's predictions moved aside are not overwritten by the second's;
* the tiny recipe's results.json / results.txt / results.png: a failed write keeps the previous three together;
* the builtin tokenizer's cache: a failed write (tokenizers raises a bare Exception) falls back, no traceback;
* the int8 vision cache: a full disk in one builder thread is a notice, not a TypeError in another thread;
* two GGUF exports into one directory at once: one consistent pair is left, no llm-*.gguf of the other model.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tinygpt.io_utils import remove_stale_temporaries
from tinygpt.tiny.synthetic import Scale, generate

ROOT = Path(__file__).resolve().parents[1]
MICRO = Scale(laion=4, cc_sbu=2, align=2, instruct_images=3, vqa_per_image=1, multi_image=2, unnatural=2,
              eval_images=3, eval_vqa_per_image=1, shard_size=4)


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _killed_while_writing(code: str) -> None:
    """Run ``code`` in a fresh interpreter; SIGKILL it once it prints ``writing``."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "writing"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
        child.stdout.close()


def test_sweep_keeps_a_live_temporary_of_another_target(tmp_path):
    live = tmp_path / f".cache.v2.{os.getpid()}.k3j2h1g0.tmp"  # this (live) process writes cache.v2
    live.mkdir()
    (live / "features-00000.safetensors").write_bytes(b"half")
    quiet = time.time() - 3600  # a folder's mtime stays put while a big file inside it is written
    os.utime(live, (quiet, quiet))
    dead = tmp_path / f".cache.{_dead_pid()}.a1b2c3d4.tmp"
    dead.mkdir()
    legacy = tmp_path / ".cache.z9y8x7w6.tmp"  # named before temporaries carried a PID, untouched for an hour
    legacy.write_bytes(b"old")
    os.utime(legacy, (quiet, quiet))
    removed = remove_stale_temporaries(tmp_path, ["cache"])
    assert sorted(removed) == sorted([dead, legacy])
    assert live.is_dir() and (live / "features-00000.safetensors").read_bytes() == b"half"


def test_killed_synthetic_generation_is_cleaned_up_by_the_rerun(tmp_path):
    out = tmp_path / "data"
    _killed_while_writing(f"""
        import time
        import tinygpt.tiny.synthetic as synthetic
        def stalled(*args, **kwargs):
            print("writing", flush=True)
            time.sleep(120)
        synthetic._write_eval = stalled
        synthetic.generate({str(out)!r}, seed=3, scale=synthetic.Scale(**{dataclasses.asdict(MICRO)!r}),
                           pretrain_size=32, instruct_size=64, progress=False)
    """)
    assert not out.exists() and len(list(tmp_path.iterdir())) == 1  # the killed run's temporary folder
    older = tmp_path / f".data.tmp-{_dead_pid()}"  # what a run killed before this fix left
    older.mkdir()
    (older / "manifest.json").write_text("{}")
    generate(out, seed=3, scale=MICRO, pretrain_size=32, instruct_size=64, progress=False)
    assert json.loads((out / "manifest.json").read_text())["seed"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_killed_benchmark_files_write_is_cleaned_up_by_the_rerun(tmp_path, monkeypatch):
    out = tmp_path / "benchmarks"
    _killed_while_writing(f"""
        import time
        from tinygpt.tiny.synthetic import benchmark_files
        benchmark_files.training_signatures = lambda seed, size: frozenset()
        def stalled(root, plan):
            print("writing", flush=True)
            time.sleep(120)
        benchmark_files.WRITERS["pope"] = stalled
        benchmark_files.write_benchmark_files({str(out)!r}, per_benchmark=1, image_size=32)
    """)
    assert not out.exists() and len(list(tmp_path.iterdir())) == 1  # the killed run's temporary folder
    from tinygpt.tiny.synthetic import benchmark_files

    monkeypatch.setattr(benchmark_files, "training_signatures", lambda seed, size: frozenset())
    counts = benchmark_files.write_benchmark_files(out, per_benchmark=1, image_size=32)
    assert counts["pope"] > 0 and (out / "manifest.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["benchmarks"]



def test_restarts_in_the_same_second_keep_every_moved_aside_file(tmp_path, monkeypatch):
    from tinygpt.evaluation import resume

    monkeypatch.setattr(resume.time, "strftime", lambda fmt: "20261206-062800")
    (tmp_path / resume.PREDICTIONS).write_text("the first run's predictions\n")
    (tmp_path / resume.SUMMARY).write_text("{}\n")
    first = resume.move_aside(tmp_path)
    (tmp_path / resume.PREDICTIONS).write_text("a restarted run killed at once\n")
    second = resume.move_aside(tmp_path)
    assert len(first) == 2 and len(second) == 1 and not set(first) & set(second)
    kept = sorted(p.read_text() for p in tmp_path.glob(f"{resume.PREDICTIONS}.*.old"))
    assert kept == ["a restarted run killed at once\n", "the first run's predictions\n"]


def _fake_recipe(monkeypatch, out: Path, vqa: float) -> None:
    """run_tiny_recipe with every stage, evaluation and build replaced by a constant (only its writing is real)."""
    import types

    import tinygpt.tiny.recipe as recipe

    metrics = {"caption_f1": 0.5, "caption_attribute_recall": 0.5, "vqa_accuracy": vqa, "grounding_accuracy": 0.5,
               "counts": {"captions": 1, "vqa": 1, "refer": 1}}
    cfg = types.SimpleNamespace(schedule=types.SimpleNamespace(total_steps=1),
                                run=types.SimpleNamespace(output_dir=str(out)))
    for name, value in (("_ensure_data", lambda *a: None), ("ensure_tiny_backbones", lambda *a, **k: out.parent),
                        ("_stage0_model", lambda b: types.SimpleNamespace(language_model=None)),
                        ("generation_problems", lambda lm: []), ("current_ceiling", lambda *a: None),
                        ("evaluate_loaded", lambda *a, **k: metrics), ("load_config", lambda path, options: cfg),
                        ("run_stage", lambda cfg: out / "stage"), ("evaluate_shapes", lambda *a, **k: metrics)):
        monkeypatch.setattr(recipe, name, value)


def test_a_failed_results_write_keeps_the_previous_results_together(tmp_path, monkeypatch):
    import errno

    import tinygpt.tiny.recipe as recipe
    from tinygpt.errors import UserError

    out = tmp_path / "out"
    _fake_recipe(monkeypatch, out, vqa=0.25)
    recipe.run_tiny_recipe(out_dir=out, data_dir=tmp_path / "data", max_steps=1, progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert sorted(before) == ["results.json", "results.png", "results.txt"]

    def full_disk(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    _fake_recipe(monkeypatch, out, vqa=0.75)
    monkeypatch.setattr(recipe, "_plot", full_disk)  # the chart is the last of the three written
    with pytest.raises(UserError, match="what was there before is unchanged"):
        recipe.run_tiny_recipe(out_dir=out, data_dir=tmp_path / "data", max_steps=1, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no new table next to the old chart


def test_a_failed_tokenizer_cache_write_falls_back_instead_of_raising(tmp_path, monkeypatch):
    """tokenizers' save reports a failed write (a full disk, an I/O error) as a bare Exception, not an OSError."""
    import contextlib

    import tinygpt.tokenizer as tokenizer

    monkeypatch.setenv("TINYGPT_CACHE", str(tmp_path / "cache"))

    @contextlib.contextmanager
    def unwritable(path):
        yield Path("/proc/tinygpt-no-such-folder") / Path(path).name  # the real save fails there ("os error 2")

    monkeypatch.setattr(tokenizer, "atomic_path", unwritable)
    loaded = tokenizer.load_tokenizer("builtin")
    assert len(loaded) == tokenizer.PHI2_TOKENIZER_SIZE and not tokenizer.builtin_cache_path().exists()


def test_a_full_disk_while_caching_the_int8_vision_tower_is_only_a_notice_in_every_thread(tmp_path, monkeypatch,
                                                                                        capsys):
    """The layers are built (and put into the cache) on several threads: when one thread's write fails the writer
    closes its file, and a thread that was still building its layer must not write through the closed descriptor."""
    import errno
    import threading
    import warnings

    import torch

    from quantize import vision_cache

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's deprecation notice for quantized tensors
        qweight = torch.quantize_per_channel(torch.randn(2, 4), torch.full((2,), 0.1, dtype=torch.float64),
                                             torch.zeros(2, dtype=torch.long), 0, torch.qint8)
    writer = vision_cache.Writer(tmp_path / "entry.safetensors", {"a": (2, 4), "b": (2, 4)})
    failed, errors = threading.Event(), []

    class StillBuilding:  # layer b's int8 rows come out after layer a's write failed
        def int_repr(self):
            failed.wait(10)
            return qweight.int_repr()

        def q_per_channel_scales(self):
            return qweight.q_per_channel_scales()

    def build_b():
        try:
            writer.put("b", StillBuilding())
        except BaseException as exc:  # what the worker thread would raise into pool.map
            errors.append(exc)

    other = threading.Thread(target=build_b)
    other.start()

    def full_disk(fd, data, offset):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(vision_cache.os, "pwrite", full_disk)
        writer.put("a", qweight)
    failed.set()
    other.join(10)
    assert errors == [] and writer.commit() is False
    assert not list(tmp_path.iterdir())  # no entry, no temporary
    assert "was not cached" in capsys.readouterr().err


def test_two_exports_into_one_directory_at_once_leave_one_consistent_pair(tmp_path, monkeypatch):
    """Export B (model 2, f16) is writing when export A (model 1, q8_0) starts into the same directory: whatever the
    order they finish in, every llm-*.gguf left there pairs with vision.gguf (no file of the other model remains)."""
    import threading

    import quantize.export as export
    import quantize.gguf_names as names
    from quantize.gguf_file import open_gguf
    from quantize.random_model import write_random_model

    out = tmp_path / "gguf"
    b_writing, a_done, failures = threading.Event(), threading.Event(), []
    real = export.write_gguf_to

    def gated(tmp, final, *args, **kwargs):
        if threading.current_thread().name == "B" and final.name == names.VISION_FILE_NAME:
            b_writing.set()
            a_done.wait(1)  # A runs meanwhile (or waits for B)
        return real(tmp, final, *args, **kwargs)

    def export_b():
        try:
            write_random_model(out, "tiny", "f16", seed=2, progress=False)
        except BaseException as exc:  # reported by the assertion below
            failures.append(exc)

    monkeypatch.setattr(export, "write_gguf_to", gated)
    b = threading.Thread(name="B", target=export_b)
    b.start()
    assert b_writing.wait(60)
    write_random_model(out, "tiny", "q8_0", seed=1, progress=False)
    a_done.set()
    b.join(60)
    assert not failures and not b.is_alive()
    vision = open_gguf(out / names.VISION_FILE_NAME, names.ARCH_VISION).metadata[names.VISION_MODEL_ID]
    llms = {f.name: open_gguf(f, names.ARCH_LLM).metadata[names.MODEL_ID] for f in out.glob("llm-*.gguf")}
    assert llms and all(model_id == vision for model_id in llms.values()), (vision[:12], llms)


def test_the_recipe_names_data_written_with_other_settings(tmp_path, capsys):
    """The recipe reused any data folder holding a manifest, silently: data of another seed or scale (made with
    `python -m tinygpt.tiny.synthetic --scale small`) trained the recipe with nothing said and seed 0 recorded."""
    import json

    from tinygpt.tiny import recipe

    data = tmp_path / "data"
    (data / "eval").mkdir(parents=True)
    (data / "eval" / "vqa.json").write_text("[]")
    (data / "manifest.json").write_text(json.dumps({"version": recipe.GENERATOR_VERSION, "seed": 7,
                                                    "scale": "small"}))
    made = recipe._ensure_data(data, seed=0, progress=False)
    assert made == {"version": recipe.GENERATOR_VERSION, "seed": 7, "scale": "small"}
    err = capsys.readouterr().err
    assert "seed 7 (the recipe's: 0)" in err and "scale 'small' (the recipe's: 'tiny')" in err
    (data / "manifest.json").write_text(json.dumps({"version": recipe.GENERATOR_VERSION, "seed": 0, "scale": "tiny"}))
    assert recipe._ensure_data(data, seed=0, progress=False)["seed"] == 0
    assert capsys.readouterr().err == ""
