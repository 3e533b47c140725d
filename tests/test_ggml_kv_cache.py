"""The ggml runtime's KV cache grows with the positions used (quantize.ggml_kv_cache): it starts small, keeps every
head's cached positions when it grows, and a model whose cache grew many times (during prefill chunks and during
cached decode steps) computes the logits of one that held n_ctx positions from the start."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest

ggml = pytest.importorskip("ggml")

from quantize import ggml_kv_cache  # noqa: E402
from quantize.ggml_kv_cache import KVCache  # noqa: E402


def _heads(t, capacity: int, n_heads: int, head_dim: int) -> np.ndarray:
    n = capacity * n_heads * head_dim
    return np.ctypeslib.as_array((ctypes.c_float * n).from_address(t.contents.data)).reshape(n_heads, capacity,
                                                                                           head_dim)


def test_a_full_size_cache_starts_at_start_positions_and_grows_keeping_every_head():
    kv = KVCache(n_layers=32, head_dim=80, n_heads=32, n_ctx=2048, ggml_type=ggml.GGML_TYPE_F32)
    try:
        # a short chat holds 256 positions (168 MB), not n_ctx's 1.34 GB
        assert kv.capacity == ggml_kv_cache.START == 256
        assert kv.nbytes < 2 * 32 * 256 * 80 * 32 * 4 + (4 << 20)
        assert tuple(kv.k[5].contents.ne[:3]) == (80, 256, 32)
        assert kv.bytes_per_position == 2 * 32 * 32 * 80 * 4  # what a decode step reads per cached position
        rng = np.random.default_rng(0)
        written = {}
        for il in (0, 31):
            for cache in (kv.k, kv.v):
                data = rng.standard_normal((32, 200, 80)).astype(np.float32)
                _heads(cache[il], kv.capacity, 32, 80)[:, :200] = data
                written[(il, cache is kv.k)] = data
        assert not kv.reserve(256)  # room already
        assert kv.reserve(257) and kv.capacity == 512
        assert kv.reserve(1500) and kv.capacity == 1536  # more than doubling when asked for more
        for (il, is_k), data in written.items():
            heads = _heads((kv.k if is_k else kv.v)[il], kv.capacity, 32, 80)
            assert np.array_equal(heads[:, :200], data)
            assert not heads[:, 256:].any()
        assert kv.reserve(2048) and kv.capacity == 2048
        with pytest.raises(ValueError, match="past n_ctx"):
            kv.reserve(2049)
    finally:
        kv.close()


@pytest.mark.parametrize("kv_type", ["f32", "f16"])
def test_a_cache_that_grew_many_times_gives_the_logits_of_one_that_did_not(tmp_path, monkeypatch, kv_type):
    from quantize.ggml_llm import GgmlLLM
    from quantize.gguf_file import find_llm_file, open_gguf
    from quantize.random_model import write_random_model

    write_random_model(tmp_path, size="tiny", qtype="q4_k", seed=8, progress=False)
    f = open_gguf(find_llm_file(tmp_path, "q4_k"), "phi2")
    whole = GgmlLLM(f, n_ctx=200, kv_type=kv_type)  # START 256 > n_ctx: all 200 positions from the start
    monkeypatch.setattr(ggml_kv_cache, "START", 16)
    grown = GgmlLLM(f, n_ctx=200, kv_type=kv_type)
    assert (whole.kv.capacity, grown.kv.capacity) == (200, 16)
    rng = np.random.default_rng(1)
    capacities = []

    def both(step):
        a, b = step(whole), step(grown)
        capacities.append(grown.kv.capacity)
        assert np.abs(a - b).max() <= 1e-5 * np.abs(a).max()

    ids = rng.integers(0, whole.hp.vocab_size, 200).tolist()
    both(lambda m: m.eval_tokens(ids[:20]))  # prefill: 16 -> 32
    for t in ids[20:40]:  # cached decode steps: 32 -> 64 at position 32
        both(lambda m: m.eval_tokens([t]))
    rows = rng.standard_normal((30, whole.hp.hidden_size)).astype(np.float32)
    both(lambda m: m.eval_embeddings(rows))  # 70 positions: 64 -> 128
    for t in ids[40:43]:  # back into the bucket of the decode graph built before the cache grew: it must be rebuilt
        both(lambda m: (m.truncate(40), m.eval_tokens([t]))[1])
    both(lambda m: (m.truncate(10), m.eval_tokens(ids[10:12]))[1])  # truncation keeps the capacity
    both(lambda m: m.eval_tokens(ids[12:190]))  # 190: 128 -> 200 (n_ctx)
    for t in ids[190:195]:
        both(lambda m: m.eval_tokens([t]))
    assert capacities[0] == 32 and 64 in capacities and capacities[-1] == 200
    assert capacities == sorted(capacities)


def test_a_growth_interrupted_half_way_leaves_a_whole_cache_and_no_stale_graph(tmp_path, monkeypatch):
    """Ctrl-C while the cache grows (the interactive chat goes on after it): the new buffer used to be in place with
    only the layers copied so far, the rest zeros, and the decode graph built on the old tensors kept: later turns
    computed wrong logits from the 'cached' prefix. Now the copy completes and the graph goes first."""
    from quantize.ggml_llm import GgmlLLM
    from quantize.gguf_file import find_llm_file, open_gguf
    from quantize.random_model import write_random_model

    write_random_model(tmp_path, size="tiny", qtype="f32", seed=3, progress=False)
    f = open_gguf(find_llm_file(tmp_path, "f32"), "phi2")
    ids = np.random.default_rng(0).integers(0, 1000, 60).tolist()
    reference = GgmlLLM(f, n_ctx=96, kv_type="f32")
    monkeypatch.setattr(ggml_kv_cache, "START", 32)  # one decode bucket (ggml_decode_graph.BUCKET)
    model = GgmlLLM(f, n_ctx=96, kv_type="f32")
    model.eval_tokens(ids[:26])
    for t in ids[26:32]:  # a decode graph is built; the cache holds its 32 positions
        model.eval_tokens([t])
    real, releases = ggml_kv_cache.release_pages, []

    def interrupted(buf):
        releases.append(1)
        if len(releases) == 3:
            raise KeyboardInterrupt
        return real(buf)

    monkeypatch.setattr(ggml_kv_cache, "release_pages", interrupted)
    with pytest.raises(KeyboardInterrupt):
        model.eval_tokens([ids[32]])  # position 32: the cache grows
    monkeypatch.setattr(ggml_kv_cache, "release_pages", real)
    assert model.kv.capacity == 64 and model.n_past == 32
    want = reference.eval_tokens(ids[:40])
    model.truncate(24)  # the next turn keeps a prefix of what was cached
    assert np.abs(model.eval_tokens(ids[24:40]) - want).max() <= 1e-5 * np.abs(want).max()
    reference.truncate(26)
    model.truncate(26)
    for t in ids[26:30]:  # cached decode steps in the bucket of the graph built before the growth
        a, b = reference.eval_tokens([t]), model.eval_tokens([t])
        assert np.abs(a - b).max() <= 1e-5 * np.abs(a).max()
