"""Two writers of the same int8 vision cache entry in one process (quantize.vision_cache.Writer; e.g. a server
loading the same GGUF pair twice, on two threads): each streams into a temporary file of its own, so neither
truncates, renames or removes the other's half-written file; both commit, and the entry holds every layer intact.
The cleanup of stale temporary files (a process killed while writing) still works."""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest
import torch

from quantize import gguf_names as names
from quantize import vision_cache
from quantize import vision_runtime
from quantize.gguf_file import find_vision_file, open_gguf
from quantize.random_model import write_random_model

SHAPES = {"a": (4, 8), "b": (6, 8)}


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("TINYGPT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv(vision_cache.ENV, "1")
    return tmp_path / "cache" / "vision-int8"


def _weights() -> dict:
    torch.manual_seed(0)
    return {name: vision_runtime.per_row_int8(torch.randn(*shape)) for name, shape in SHAPES.items()}


def _assert_entry_holds(path, weights) -> None:
    reader = vision_cache.open_entry(path, list(weights))
    assert reader is not None
    try:
        for name, weight in weights.items():
            rows, scales = reader.get(name)  # an array another writer zeroed fails its CRC-32 here
            assert torch.equal(rows, weight.int_repr())
            assert torch.equal(scales, weight.q_per_channel_scales().to(torch.float64))
    finally:
        reader.close()


def test_two_writers_of_one_entry_in_one_process_do_not_share_a_temporary(cache_dir, capsys):
    """Interleaved as two threads may run them: B opens while A is half-written, A commits first, B after."""
    path, weights = cache_dir / "entry.safetensors", _weights()
    first = vision_cache.Writer(path, SHAPES)
    first.put("a", weights["a"])
    second = vision_cache.Writer(path, SHAPES)  # used to truncate the first's file (the same temporary name)
    first.put("b", weights["b"])
    assert first.commit()
    _assert_entry_holds(path, weights)
    second.put("a", weights["a"])  # used to write into the entry just renamed into place
    second.put("b", weights["b"])
    assert second.commit()
    assert "notice" not in capsys.readouterr().err  # used to fail to rename its (already renamed) temporary
    _assert_entry_holds(path, weights)
    assert [p.name for p in cache_dir.iterdir()] == [path.name]  # no temporary left


def test_one_writer_aborting_leaves_the_others_temporary_alone(cache_dir, capsys):
    path, weights = cache_dir / "entry.safetensors", _weights()
    first = vision_cache.Writer(path, SHAPES)
    first.put("a", weights["a"])
    second = vision_cache.Writer(path, SHAPES)
    second.abort()  # its build failed: it used to remove the first's half-written file
    first.put("b", weights["b"])
    assert first.commit()
    assert "notice" not in capsys.readouterr().err
    _assert_entry_holds(path, weights)


def test_stale_temporaries_are_still_removed_and_fresh_ones_kept(cache_dir):
    cache_dir.mkdir(parents=True)
    stale, fresh = cache_dir / ".old.safetensors.1234.tmp", cache_dir / ".other.safetensors.99.0.tmp"
    for p in (stale, fresh):
        p.write_bytes(b"x")
    hours_ago = time.time() - 2 * 3600
    os.utime(stale, (hours_ago, hours_ago))
    writer = vision_cache.Writer(cache_dir / "entry.safetensors", SHAPES)
    assert writer._tmp.name.startswith(".entry.safetensors.") and writer._tmp.name.endswith(".tmp")
    for name, weight in _weights().items():
        writer.put(name, weight)
    assert writer.commit()
    assert not stale.exists() and fresh.exists()  # another writer's live temporary (under an hour old) is kept


@pytest.fixture(scope="module")
def vision_file(tmp_path_factory):
    out = tmp_path_factory.mktemp("pair")
    write_random_model(out, size="tiny", qtype="q8_0", seed=5, progress=False)
    return find_vision_file(out)


def test_two_encoders_of_one_file_built_at_once_on_two_threads(vision_file, cache_dir, monkeypatch, capsys):
    """Both encoders open their writer before either puts a layer (a barrier in the requantizing), then race."""
    barrier, seen = threading.Barrier(2, timeout=60), threading.local()
    requantize = vision_runtime.per_row_int8

    def in_step(weight):
        if not getattr(seen, "waited", False):
            seen.waited = True
            barrier.wait()
        return requantize(weight)

    monkeypatch.setattr(vision_runtime, "per_row_int8", in_step)
    encoders, errors = [None, None], []

    def build(k):
        try:
            encoders[k] = vision_runtime.VisionEncoder(open_gguf(vision_file, names.ARCH_VISION), n_threads=1)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=build, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert [e.cache_state for e in encoders] == ["written", "written"]  # the second used to end "off"
    assert "notice" not in capsys.readouterr().err
    monkeypatch.undo()
    monkeypatch.setenv("TINYGPT_CACHE", str(cache_dir.parent))
    monkeypatch.setenv(vision_cache.ENV, "1")
    assert len(list(cache_dir.glob("*.safetensors"))) == 1 and not list(cache_dir.glob(".*.tmp"))
    again = vision_runtime.VisionEncoder(open_gguf(vision_file, names.ARCH_VISION), n_threads=2)
    assert again.cache_state == "read"
    pixels = torch.linspace(-1, 1, 3 * again.image_size ** 2).reshape(1, 3, again.image_size, -1)
    assert np.array_equal(again.encode_pixels(pixels), encoders[0].encode_pixels(pixels))
