"""The int8 vision tower's cache (quantize.vision_cache): the second load of a file reads its int8 rows instead of
requantizing and encodes bit for bit the same; a damaged entry is rebuilt; an unwritable cache costs a notice only;
TINYGPT_VISION_CACHE=0, fp32 mode and files without a model_id write nothing; only the newest entries are kept."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from quantize import gguf_names as names
from quantize import vision_cache
from quantize import vision_runtime
from quantize.gguf_file import find_vision_file, open_gguf
from quantize.random_model import write_random_model


@pytest.fixture(scope="module")
def vision_file(tmp_path_factory):
    out = tmp_path_factory.mktemp("pair")
    write_random_model(out, size="tiny", qtype="q4_k", seed=3, progress=False)
    return find_vision_file(out)


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("TINYGPT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv(vision_cache.ENV, "1")
    return tmp_path / "cache" / "vision-int8"


def _encode(path, cache_state=None, **kw):
    encoder = vision_runtime.VisionEncoder(open_gguf(path, names.ARCH_VISION), n_threads=2, **kw)
    if cache_state is not None:
        assert encoder.cache_state == cache_state
    pixels = torch.linspace(-1, 1, 3 * encoder.image_size ** 2).reshape(1, 3, encoder.image_size, -1)
    return encoder.encode_pixels(pixels)


def test_the_second_load_reads_the_int8_rows_and_encodes_the_same(vision_file, cache_dir, monkeypatch):
    first = _encode(vision_file, "written")
    entries = list(cache_dir.glob("*.safetensors"))
    assert len(entries) == 1 and not list(cache_dir.glob(".*.tmp"))

    def no_requantizing(weight):
        raise AssertionError("requantized although the cache holds the rows")

    monkeypatch.setattr(vision_runtime, "per_row_int8", no_requantizing)
    assert np.array_equal(_encode(vision_file, "read"), first)
    monkeypatch.undo()
    # a damaged entry (cut short) is rebuilt, and the rebuilt entry serves again
    monkeypatch.setenv("TINYGPT_CACHE", str(cache_dir.parent))
    monkeypatch.setenv(vision_cache.ENV, "1")
    entries[0].write_bytes(entries[0].read_bytes()[:1000])
    assert np.array_equal(_encode(vision_file, "written"), first)
    assert entries[0].stat().st_size > 1000
    monkeypatch.setattr(vision_runtime, "per_row_int8", no_requantizing)
    assert np.array_equal(_encode(vision_file), first)
    monkeypatch.undo()
    # a layer that fails to read mid-load (the entry changed under the reader, an I/O error) is rebuilt alone
    monkeypatch.setenv("TINYGPT_CACHE", str(cache_dir.parent))
    monkeypatch.setenv(vision_cache.ENV, "1")
    real_get, failed = vision_cache.Reader.get, []

    def get_failing_once(self, name):
        if not failed:
            failed.append(name)
            raise OSError("short read")
        return real_get(self, name)

    monkeypatch.setattr(vision_cache.Reader, "get", get_failing_once)
    assert np.array_equal(_encode(vision_file, "read"), first) and len(failed) == 1


def test_nothing_is_written_when_off_in_fp32_mode_or_unwritable(vision_file, cache_dir, monkeypatch, capsys):
    monkeypatch.setenv(vision_cache.ENV, "0")
    _encode(vision_file, "off")
    _encode(vision_file, "off", int8=False)
    assert not cache_dir.exists()
    monkeypatch.setenv(vision_cache.ENV, "1")
    _encode(vision_file, "off", int8=False)
    assert not cache_dir.exists()
    cache_dir.parent.mkdir(parents=True)
    cache_dir.write_text("a file where the cache directory should be")
    out = _encode(vision_file, "off")
    assert np.isfinite(out).all()
    assert capsys.readouterr().err.count("notice: the int8 vision tower was not cached") == 1


def test_a_failed_build_leaves_no_entry(vision_file, cache_dir, monkeypatch):
    from tinygpt.errors import UserError
    real_get = vision_runtime.VisionEncoder._get

    def broken(self, torch_name, by_torch_name, shape):
        if torch_name.endswith("fc2.weight"):
            raise UserError("tensor 'v.enc.1.fc2.weight' is missing")
        return real_get(self, torch_name, by_torch_name, shape)

    monkeypatch.setattr(vision_runtime.VisionEncoder, "_get", broken)
    with pytest.raises(UserError, match="is missing"):
        _encode(vision_file)
    assert list(cache_dir.iterdir()) == []


def test_no_model_id_no_entry_and_only_the_newest_entries_are_kept(vision_file, cache_dir, monkeypatch):
    f = open_gguf(vision_file, names.ARCH_VISION)
    linear = [n for n in f.tensors if n.endswith(".weight") and len(f.tensors[n].shape) == 2]
    assert vision_cache.cache_file(f, linear).parent == cache_dir
    monkeypatch.setattr(f, "metadata", {k: v for k, v in f.metadata.items() if k != names.VISION_MODEL_ID})
    assert vision_cache.cache_file(f, linear) is None
    weight = vision_runtime.per_row_int8(torch.randn(4, 8))
    for k in range(vision_cache.KEEP + 2):
        writer = vision_cache.Writer(cache_dir / f"entry{k}.safetensors", {"layer": (4, 8)})
        writer.put("layer", weight)
        assert writer.commit()
    kept = sorted(p.name for p in cache_dir.glob("*.safetensors"))
    assert len(kept) == vision_cache.KEEP and f"entry{vision_cache.KEEP + 1}.safetensors" in kept
    reader = vision_cache.open_entry(cache_dir / kept[-1], ["layer"])
    rows, scales = reader.get("layer")
    reader.close()
    assert torch.equal(rows, weight.int_repr()) and torch.equal(scales, weight.q_per_channel_scales())
    assert vision_cache.open_entry(cache_dir / kept[-1], ["layer", "another"]) is None
    # the entry is a standard safetensors file
    assert torch.equal(load_file(cache_dir / kept[-1])["layer.weight"], weight.int_repr())
    # cut short, or a header that is not one: rebuilt (None), never an exception
    whole = (cache_dir / kept[-1]).read_bytes()
    (cache_dir / "cut.safetensors").write_bytes(whole[:-3])
    (cache_dir / "junk.safetensors").write_bytes(b"\xff" * 64)
    for name in ("cut.safetensors", "junk.safetensors"):
        assert vision_cache.open_entry(cache_dir / name, ["layer"]) is None


def test_a_damaged_entry_of_the_same_size_is_caught_by_its_crcs_and_written_again(vision_file, cache_dir):
    first = _encode(vision_file, "written")
    (entry,) = cache_dir.glob("*.safetensors")
    data = bytearray(entry.read_bytes())
    (length,) = np.frombuffer(bytes(data[:8]), "<u8")
    for k in range(8 + int(length), len(data), 997):  # bit rot in the arrays; the header and the size intact
        data[k] ^= 0x5A
    entry.write_bytes(bytes(data))
    assert np.array_equal(_encode(vision_file, "read"), first)  # every damaged layer rebuilt from the file
    assert not entry.exists()  # and the entry dropped, so that
    assert np.array_equal(_encode(vision_file, "written"), first)  # the next load writes it again
    assert np.array_equal(_encode(vision_file, "read"), first)


def test_an_array_never_written_fails_its_check(cache_dir):
    weight = vision_runtime.per_row_int8(torch.randn(4, 8))
    writer = vision_cache.Writer(cache_dir / "partial.safetensors", {"a": (4, 8), "b": (4, 8)})
    writer.put("a", weight)
    assert writer.commit()
    reader = vision_cache.open_entry(cache_dir / "partial.safetensors", ["a", "b"])
    assert torch.equal(reader.get("a")[0], weight.int_repr())
    with pytest.raises(OSError, match="CRC-32"):
        reader.get("b")
    reader.close()
    assert not (cache_dir / "partial.safetensors").exists()
