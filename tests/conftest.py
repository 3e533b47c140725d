"""Shared fixtures: offline settings, the builtin tokenizer, tiny models, hand-written tiny GGUF files."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# the int8 vision cache keeps the newest 2 entries of the user's cache: tests must not evict a real model's entry
# (tests/test_vision_cache.py turns it on in a temporary cache)
os.environ.setdefault("TINYGPT_VISION_CACHE", "0")

import pytest  # noqa: E402
import torch  # noqa: E402

# 2 threads, or the cores' share of each pytest-xdist worker (-n N): N workers of 2 threads each on 2 cores would
# oversubscribe them, and OpenMP's spinning threads then burn what the other worker needs. ggml's threads are left as
# each test asks: tests/test_runtime_llm.py checks its 2-4 thread splits (capping them made the ggml tests 25% faster)
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
_THREADS = max(1, min(2, torch.get_num_threads() // _WORKERS))
torch.set_num_threads(_THREADS)
if _WORKERS > 1:  # the child processes a test starts (a killed run it then resumes here) compute on as many threads:
    os.environ["OMP_NUM_THREADS"] = str(_THREADS)  # float sums in the same order, bit for bit


@pytest.fixture(autouse=True)
def _torch_threads():
    """Every test starts on ``_THREADS`` torch threads: torch's count is process-wide and some code under test sets it
    (quantize's VisionEncoder(n_threads=2)); a resumed run must sum in the order its killed child did."""
    torch.set_num_threads(_THREADS)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config) -> int:
    """``-n auto`` (pyproject.toml's addopts): one worker per core this process may use, up to 4 (each worker builds
    the session's tiny models and data again; more workers than that buy little on this suite)."""
    return max(1, min(4, len(os.sched_getaffinity(0))))


def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (``--dist loadfile`` hands out whole files in collection order) the files with the most
    ``slow`` tests go first, so that no long file starts last and runs alone at the end; every worker sorts the same
    way (a stable sort of the collected order)."""
    if _WORKERS == 1:
        return
    from collections import Counter

    def file_of(item) -> str:
        return item.nodeid.split("::")[0]

    slow = Counter(file_of(item) for item in items if item.get_closest_marker("slow"))
    items.sort(key=lambda item: -slow[file_of(item)])


@pytest.fixture(scope="session")
def tokenizer():
    from tinygpt.tokenizer import load_tokenizer

    return load_tokenizer(None)


@pytest.fixture
def tiny_vlm(tokenizer):
    """A freshly initialised tiny TinyGPT-V (seeded), with the tokenizer attached, in eval mode."""
    from tinygpt.model import TinyGPTVForConditionalGeneration, build_config

    def make(lora=None, extra_norms=True, seed=0, lora_b_std=0.0, **overrides):
        """``lora_b_std``: draw LoRA B like a trained one (a fresh B is 0, so LoRA A gets no gradient)."""
        torch.manual_seed(seed)
        model = TinyGPTVForConditionalGeneration(build_config("tiny", lora=lora, extra_norms=extra_norms, **overrides))
        with torch.no_grad():
            for name, param in model.named_parameters():
                if lora_b_std and ".lora_B." in name:
                    param.normal_(0.0, lora_b_std)
        model.tokenizer = tokenizer
        return model.eval()

    return make


@pytest.fixture(scope="session")
def base_model(tmp_path_factory):
    """A random tiny model directory: the stand-in for the cached pretrained backbones (builtin:tiny)."""
    from tinygpt.model import TinyGPTVForConditionalGeneration, build_config, save_vlm
    from tinygpt.tokenizer import load_tokenizer

    torch.manual_seed(0)
    model = TinyGPTVForConditionalGeneration(build_config("tiny"))
    model.tokenizer = load_tokenizer(None)
    return save_vlm(model, tmp_path_factory.mktemp("base") / "tiny-base")


@pytest.fixture(scope="session")
def random_gguf_pairs(tmp_path_factory):
    """Tiny random GGUF pairs (Q8_0 LLM + vision) of the same weights: ``modified/`` with the extra norms, ``plain/``
    a stock phi2 file."""
    pytest.importorskip("gguf")
    from quantize.random_model import write_random_model

    root = tmp_path_factory.mktemp("gguf-pairs")
    write_random_model(root / "modified", size="tiny", qtype="q8_0", seed=2, progress=False)
    write_random_model(root / "plain", size="tiny", qtype="q8_0", seed=2, extra_norms=False, progress=False)
    return root


@pytest.fixture(scope="session")
def tiny_weights():
    """Random weights of the hand-written tiny GGUF LLM (``gguf_reference.py``), under GGUF names."""
    pytest.importorskip("gguf")
    from gguf_reference import random_llm_weights

    return random_llm_weights(seed=0)


@pytest.fixture(scope="session")
def llm_files(tmp_path_factory, tiny_weights):
    """``tiny_weights`` written as one LLM GGUF per type: {"f32", "f16", "q8_0", "q4_0", "q4_k"} -> path."""
    from gguf_reference import T, write_llm_gguf

    d = tmp_path_factory.mktemp("gguf")
    types = {"f32": T.F32, "f16": T.F16, "q8_0": T.Q8_0, "q4_0": T.Q4_0, "q4_k": T.Q4_K}
    return {name: write_llm_gguf(d / f"llm-{name}.gguf", tiny_weights, qt) for name, qt in types.items()}


@pytest.fixture(scope="session")
def small_backbones(tmp_path_factory):
    """(cache dir, backbones dir, build seconds) of one small tiny-backbone build shared by the session."""
    import time

    from tiny_settings import SMALL_LLM, SMALL_VISION
    from tinygpt.tiny.backbones import ensure_tiny_backbones

    # under pytest-xdist the workers share one cache: ensure_tiny_backbones builds under a lock, the others wait and
    # read it (the build takes both cores)
    shared = os.environ.get("PYTEST_XDIST_WORKER") is not None
    cache = tmp_path_factory.getbasetemp().parent / "tiny-cache" if shared else tmp_path_factory.mktemp("tiny-cache")
    start = time.monotonic()
    path = ensure_tiny_backbones(cache, llm=SMALL_LLM, vision=SMALL_VISION, progress=False)
    return cache, path, time.monotonic() - start


@pytest.fixture(scope="session")
def tiny_synthetic_data(tmp_path_factory):
    """The tiny synthetic dataset (seed 0, scale "tiny"), generated once for the session; the tests only read it."""
    from tinygpt.tiny.synthetic import generate

    out = tmp_path_factory.mktemp("synthetic") / "data"
    generate(out, seed=0, scale="tiny", progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_stage1_run(tiny_synthetic_data, base_model, tmp_path_factory):
    """A finished 3-step tiny stage 1 (tests/tiny_stage1.py): ``stage1/`` (output) and ``stage1-checkpoints/``
    holding steps 2 and 3 (the last step is always checkpointed; keep_last 2). Trained once for the session; the
    tests copy it (test_write_safety.copy_run) and change only their copy."""
    from tiny_stage1 import stage_options, train_main

    root = tmp_path_factory.mktemp("trained")
    assert train_main(stage_options(tiny_synthetic_data, root, base_model, 3, run__save_every=1, run__keep_last=2,
                                    run__resume="false")) == 0
    steps = sorted(p.name for p in (root / "stage1-checkpoints" / "checkpoints").iterdir())
    assert steps == ["step_00000002", "step_00000003"]
    return root


def save_decisive_tiny_model(out_dir, seed: int = 0):
    """A seeded random tiny VLM whose greedy choices are not near-ties (norms perturbed, logits scaled to O(10)),
    saved as a model directory: a stand-in for a trained model in the chat, demo and server tests."""
    from tinygpt.model import TinyGPTVForConditionalGeneration, build_config, save_vlm
    from tinygpt.tokenizer import load_tokenizer

    torch.manual_seed(seed)
    model = TinyGPTVForConditionalGeneration(build_config("tiny")).eval()
    model.tokenizer = load_tokenizer(None)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name.lower() and p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
        model.language_model.lm_head.weight.mul_(50.0)
    return save_vlm(model, out_dir)


@pytest.fixture(scope="session")
def chat_model(tmp_path_factory):
    """(model dir, its F16 GGUF export dir) of `save_decisive_tiny_model` (seed 0), shared by the session."""
    pytest.importorskip("gguf")
    from quantize.export import export_model

    d = tmp_path_factory.mktemp("chat-model")
    save_decisive_tiny_model(d / "model")
    export_model(d / "model", d / "gguf", qtype="f16", progress=False)
    return d / "model", d / "gguf"
