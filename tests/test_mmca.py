"""Multi-modal causal attention (``model.attention: mmca``): the model against the formula written out with loops,
the causal path unchanged, the KV cache, packing, generation, the GGUF runtimes and the config error."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tinygpt.config import load_config
from tinygpt.errors import UserError
from tinygpt.model import TinyGPTPhiConfig, TinyGPTPhiForCausalLM
from tinygpt.model.packing import RowLayout
from tinygpt.model.phi import apply_partial_rope, rope_cos_sin
from tinygpt.model.phi_config import attention_kind, set_attention_kind
from tinygpt.model.sequence import embed_inputs

REPO = Path(__file__).resolve().parents[1]


def small_lm(attention: str = "mmca", seed: int = 0) -> TinyGPTPhiForCausalLM:
    config = TinyGPTPhiConfig(vocab_size=120, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                              num_attention_heads=4, rotary_dim=6, resid_pdrop=0.0, bos_token_id=0, eos_token_id=119,
                              pad_token_id=0, max_position_embeddings=128)
    set_attention_kind(config, attention)
    torch.manual_seed(seed)
    model = TinyGPTPhiForCausalLM(config).eval()
    with torch.no_grad():  # non-trivial norms, so every part of the layer matters
        for name, p in model.named_parameters():
            if p.ndim == 1 and name.endswith("weight"):
                p.copy_(1 + torch.randn_like(p) * 0.1)
    return model


def flags(rows: list[str]) -> torch.Tensor:
    """'ttiit..' -> image mask (i = image position; t and . = text/padding)."""
    return torch.tensor([[c == "i" for c in row] for row in rows])


def padding(rows: list[str]) -> torch.Tensor:
    return torch.tensor([[c != "." for c in row] for row in rows], dtype=torch.long)


# ---- the formula, written out -----------------------------------------------------------------------------------
def formula_logits(lm, embeds, attention_mask, image_mask) -> torch.Tensor:
    """The decoder with MMCA spelled out per row, head and query: an image query gets one softmax over the earlier
    (non-padding) image keys; a text query gets softmax over the earlier text keys · V plus softmax over the earlier
    image keys · V, the second left out when there is no such key. Padding queries are left at 0."""
    cfg = lm.config
    batch, seq, _ = embeds.shape
    heads, dim = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    cos, sin = rope_cos_sin(positions, cfg.rotary_dim, cfg.rope_base, torch.float32)
    x = embeds
    for layer in lm.model.layers:
        h = layer.input_layernorm(x)
        att = layer.self_attn
        q, k, v = att.qkv(h).view(batch, seq, 3, heads, dim).unbind(2)
        q, k = att.q_layernorm(q), att.k_layernorm(k)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        q, k = apply_partial_rope(q, cos, sin), apply_partial_rope(k, cos, sin)
        out = torch.zeros_like(q)
        for b in range(batch):
            for i in range(seq):
                if not attention_mask[b, i]:
                    continue
                earlier = [j for j in range(i + 1) if attention_mask[b, j]]
                images = [j for j in earlier if image_mask[b, j]]
                texts = [j for j in earlier if not image_mask[b, j]]
                parts = [images] if image_mask[b, i] else [texts, images]
                for hd in range(heads):
                    for part in parts:
                        if not part:
                            continue
                        scores = torch.stack([q[b, hd, i] @ k[b, hd, j] for j in part]) / dim**0.5
                        weights = torch.softmax(scores, dim=0)
                        out[b, hd, i] += sum(w * v[b, hd, j] for w, j in zip(weights, part))
        a = layer.post_layernorm(att.dense(out.transpose(1, 2).reshape(batch, seq, -1)))
        x = x + a + layer.mlp(h)
    return lm.lm_head(lm.model.final_layernorm(x))


def test_mmca_equals_the_formula_including_a_text_token_with_no_image_before_it_and_a_padded_row():
    lm = small_lm()
    rows = ["ttiiittiit", "tttiiitt.."]  # row 0 starts with text before any image; row 1 is right-padded
    embeds = torch.randn(2, 10, 64)
    mask, images = padding(rows), flags(rows)
    with torch.no_grad():
        got = lm(inputs_embeds=embeds, attention_mask=mask, image_mask=images, use_cache=False).logits
        want = formula_logits(lm, embeds, mask, images)
        causal = small_lm("causal")(inputs_embeds=embeds, attention_mask=mask, use_cache=False).logits
    real = mask.bool()
    assert torch.isfinite(got).all()
    assert torch.allclose(got[real], want[real], atol=1e-5), (got[real] - want[real]).abs().max()
    assert (got[real] - causal[real]).abs().max() > 0.1  # the image split changes the answer...
    before_any_image = torch.tensor([[1, 1] + [0] * 8, [1, 1, 1] + [0] * 7], dtype=torch.bool)
    assert torch.allclose(got[before_any_image], causal[before_any_image], atol=1e-5)  # ...but not before any image


def test_an_empty_image_part_gives_finite_gradients():
    lm = small_lm().train()
    rows = ["tttiit", "iittt."]
    embeds = torch.randn(2, 6, 64, requires_grad=True)
    out = lm(inputs_embeds=embeds, attention_mask=padding(rows), image_mask=flags(rows), use_cache=False)
    out.logits.square().mean().backward()
    grads = [embeds.grad] + [p.grad for name, p in lm.named_parameters() if "embed_tokens" not in name]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)  # embed_tokens: unused (embeddings in)


def test_causal_path_is_unchanged_bit_for_bit():
    causal, mmca = small_lm("causal"), small_lm("mmca")
    assert not hasattr(causal.config, "attention") and attention_kind(causal.config) == "causal"
    assert "attention" not in json.loads(causal.config.to_json_string())  # saved config (and GGUF model id) as before
    rows = ["ttiiitt", "tiit..."]
    embeds = torch.randn(2, 7, 64)
    with torch.no_grad():
        plain = causal(inputs_embeds=embeds, attention_mask=padding(rows), use_cache=False).logits
        told = causal(inputs_embeds=embeds, attention_mask=padding(rows), image_mask=flags(rows),
                      use_cache=False).logits
        text_only = mmca(inputs_embeds=embeds, attention_mask=padding(rows), use_cache=False).logits
    assert torch.equal(plain, told)  # a causal model ignores the image mask
    assert torch.equal(plain, text_only)  # mmca without images is the causal model, bit for bit
    set_attention_kind(mmca.config, "causal")
    assert "attention" not in json.loads(mmca.config.to_json_string())


def test_bad_attention_kind_is_refused():
    with pytest.raises(ValueError, match="attention: 'flash' is not one of causal, mmca"):
        small_lm("flash")


# ---- the cache ----------------------------------------------------------------------------------------------------
def test_the_cache_remembers_which_positions_are_images():
    lm = small_lm()
    rows = ["ttiiittiitttt"]
    embeds, images = torch.randn(1, 13, 64), flags(rows)
    with torch.no_grad():
        full = lm(inputs_embeds=embeds, image_mask=images, use_cache=False).logits
        first = lm(inputs_embeds=embeds[:, :4], image_mask=images[:, :4], use_cache=True)
        second = lm(inputs_embeds=embeds[:, 4:9], image_mask=images[:, 4:9], cache=first.cache, use_cache=True)
        third = lm(inputs_embeds=embeds[:, 9:], cache=second.cache, use_cache=True)  # no mask given: text
    assert torch.equal(first.cache.image_keys, images)
    stepwise = torch.cat([first.logits, second.logits, third.logits], dim=1)
    assert torch.allclose(stepwise, full, atol=1e-5)


def hand_rolled_greedy(lm, embeds, mask, images, steps: int) -> torch.Tensor:
    """Greedy decoding by full forward passes (no cache): each new token is a text position."""
    tokens = []
    with torch.no_grad():
        for _ in range(steps):
            logits = lm(inputs_embeds=embeds, attention_mask=mask, image_mask=images, use_cache=False).logits[:, -1]
            token = logits.argmax(-1)
            tokens.append(token)
            embeds = torch.cat([embeds, lm.get_input_embeddings()(token)[:, None]], dim=1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            images = torch.cat([images, torch.zeros_like(images[:, :1])], dim=1)
    return torch.stack(tokens, dim=1)


def test_greedy_generation_with_and_without_the_cache_gives_the_same_tokens():
    lm = small_lm()
    rows = ["ttiiittiit", "..tiiitiit"]  # left-padded, as generate gets its prompts
    embeds = torch.randn(2, 10, 64) * 2
    mask, images = padding(rows), flags(rows)
    without = hand_rolled_greedy(lm, embeds, mask, images, steps=10)
    cached = lm.generate(inputs_embeds=embeds, attention_mask=mask, image_mask=images, max_new_tokens=10,
                         do_sample=False, eos_token_id=None)
    assert torch.equal(cached, without)
    ignored = lm.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=10, do_sample=False,
                          eos_token_id=None)
    assert not torch.equal(ignored, without)  # the image mask reached every step


# ---- the VLM: training rows, packing, generate, chat scoring -------------------------------------------------------
CONVERSATIONS = [
    [{"user": "<ImageHere> what is it?", "assistant": "a red square"}],
    [{"user": "hello", "assistant": "hi there"}, {"user": "<ImageHere> and <ImageHere> which?", "assistant": "left"}],
    [{"user": "count <ImageHere>", "assistant": "three"}],
]
COUNTS = [1, 2, 1]


@pytest.fixture
def mmca_vlm(tiny_vlm):
    model = tiny_vlm(seed=3)
    set_attention_kind(model.config.text_config, "mmca")
    return model


def features(model, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, model.config.num_query_tokens, model.config.qformer_config.hidden_size, generator=g)


def test_training_loss_is_the_same_packed_and_right_padded(mmca_vlm):
    feats = features(mmca_vlm, sum(COUNTS))
    with torch.no_grad():
        padded = mmca_vlm(turns=CONVERSATIONS, image_counts=COUNTS, image_features=feats).loss
        packed = mmca_vlm(turns=CONVERSATIONS, image_counts=COUNTS, image_features=feats,
                          row_layout=RowLayout(tokens_per_row=256)).loss
        set_attention_kind(mmca_vlm.config.text_config, "causal")
        causal = mmca_vlm(turns=CONVERSATIONS, image_counts=COUNTS, image_features=feats).loss
    assert torch.isfinite(padded) and abs(float(packed) - float(padded)) < 1e-5
    assert abs(float(causal) - float(padded)) > 1e-3


def test_vlm_generate_uses_the_image_positions_and_the_cache(mmca_vlm):
    convs = [[{"user": "<ImageHere> what is it?", "assistant": None}],
             [{"user": "hi, compare <ImageHere> with <ImageHere>", "assistant": None}]]
    counts = [1, 2]
    feats = features(mmca_vlm, 3, seed=1)
    got = mmca_vlm.generate(convs, counts, image_features=feats, max_new_tokens=6, do_sample=False,
                            stop_strings=[], eos_token_id=None)
    inputs = mmca_vlm.prepare_inputs(convs, counts, None, "left")
    embeds = embed_inputs(inputs, mmca_vlm.language_model.get_input_embeddings(), mmca_vlm.project(feats))
    want = hand_rolled_greedy(mmca_vlm.language_model, embeds, inputs.attention_mask, inputs.image_positions, 6)
    assert torch.equal(got, want)


def test_chat_scoring_sees_the_image_positions(mmca_vlm):
    from tinygpt.chat.backend import EncodedTurn
    from tinygpt.chat.torch_backend import TorchBackend

    backend = TorchBackend(mmca_vlm)
    feats = features(mmca_vlm, 1, seed=2)
    turns = [EncodedTurn(user="<ImageHere> what is it?", images=(feats[0],), assistant=None)]
    got = backend.score(turns, ["red", "a blue circle"])
    inputs = mmca_vlm.prepare_inputs([[{"user": "<ImageHere> what is it?", "assistant": None}]], [1], None, "left")
    lm = mmca_vlm.language_model
    prompt = embed_inputs(inputs, lm.get_input_embeddings(), mmca_vlm.project(feats))
    for candidate, score in zip(["red", "a blue circle"], got):
        ids = torch.tensor([mmca_vlm.tokenizer(candidate, add_special_tokens=False)["input_ids"]])
        embeds = torch.cat([prompt, lm.get_input_embeddings()(ids)], dim=1)
        images = torch.cat([inputs.image_positions, torch.zeros_like(ids, dtype=torch.bool)], dim=1)
        with torch.no_grad():
            logits = lm(inputs_embeds=embeds, image_mask=images, use_cache=False).logits[0]
        logp = torch.log_softmax(logits[prompt.shape[1] - 1:-1], dim=-1).gather(-1, ids[0][:, None]).sum()
        assert abs(float(logp) - score) < 1e-4


# ---- config -------------------------------------------------------------------------------------------------------
def test_bad_model_attention_is_one_line_naming_file_and_key(tmp_path):
    stage = tmp_path / "stage.yaml"
    base = os.path.relpath(REPO / "train_configs" / "stage4.yaml", tmp_path)
    stage.write_text(f"extends: [{base}]\nmodel:\n  attention: mmac\n")
    with pytest.raises(UserError) as info:
        load_config(stage)
    message = str(info.value)
    assert message.startswith(f"{stage}: model.attention: 'mmac' is not one of causal, mmca") and "\n" not in message
    assert load_config(REPO / "train_configs" / "stage4.yaml").model.attention is None  # the starting model's


def test_a_stage_trains_with_mmca_and_saves_it(base_model, tmp_path):
    """A tiny stage 3 with model.attention=mmca (2 steps, right-padded rows): a finite loss, the output model says
    mmca (packed rows: test_training_loss_is_the_same_packed_and_right_padded)."""
    from accelerate.state import AcceleratorState
    from PIL import Image

    from tinygpt.model import load_vlm
    from tinygpt.train.stage import run_stage

    root = tmp_path / "align"
    (root / "image").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(1, 5):
        Image.fromarray(rng.integers(0, 255, size=(40, 56, 3), dtype=np.uint8)).save(root / "image" / f"{i}.jpg")
    captions = [{"image_id": str(i), "caption": f"picture number {i}."} for i in range(1, 5)]
    (root / "filter_cap.json").write_text(json.dumps({"annotations": captions}))
    opts = [f"data.datasets.cc_sbu_align.params.root={root}", f"model.init_from={base_model}",
            "data.datasets.cc_sbu_align.batch_size=2", "schedule.total_steps=2", "schedule.warmup_steps=1",
            "run.progress=false", "run.resume=false", "model.lora.dropout=0.0", "model.attention=mmca"]
    AcceleratorState._reset_state(True)
    try:
        out = run_stage(load_config(REPO / "train_configs" / "tiny" / "stage3.yaml",
                                    opts + [f"run.output_dir={tmp_path / 'out'}"]))
    finally:
        AcceleratorState._reset_state(True)
    summary = json.loads((out / "train_summary.json").read_text())["summary"]
    assert np.isfinite(summary["last_loss"]) and summary["last_loss"] > 0
    assert attention_kind(load_vlm(out).config.text_config) == "mmca"
    # the next stage starts from it without naming model.attention: it stays mmca (unset = the starting model's)
    later = [o for o in opts if not o.startswith(("model.attention", "model.init_from"))]
    AcceleratorState._reset_state(True)
    try:
        out2 = run_stage(load_config(REPO / "train_configs" / "tiny" / "stage3.yaml",
                                     later + [f"model.init_from={out}", f"run.output_dir={tmp_path / 'out2'}"]))
    finally:
        AcceleratorState._reset_state(True)
    assert attention_kind(load_vlm(out2).config.text_config) == "mmca"


# ---- GGUF export and the runtimes ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    pytest.importorskip("gguf")
    sys.path.insert(0, str(Path(__file__).parent))
    from test_export import SMALL_VOCAB, _save_tiny

    from quantize.export import export_model

    root = tmp_path_factory.mktemp("mmca-gguf")
    model = _save_tiny(root / "model", text_overrides={**SMALL_VOCAB, "attention": "mmca"})
    export_model(root / "model", root / "out", "f16", progress=False)
    return root, model.eval()


def _runtime_logits(llm, ids: np.ndarray, image: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """Prefill [4 text, 32 image rows, 3 text, 1 image row] with all logits, then 3 single-token steps."""
    rows = [llm.eval_tokens(ids[:4], all_logits=True), llm.eval_embeddings(image[:-1], all_logits=True),
            llm.eval_tokens(ids[4:7], all_logits=True), llm.eval_embeddings(image[-1:], all_logits=True)]
    steps = [llm.eval_tokens(ids[7 + s:8 + s]) for s in range(3)]
    return np.concatenate(rows), steps


@pytest.mark.parametrize("backend", ["ggml", "torch"])
def test_gguf_runtime_logits_match_pytorch(exported, backend):
    """The f16 export under the ggml runtime (prefill and the cached decode graph) and the PyTorch fallback against
    the PyTorch model; tolerance as tests/test_runtime_llm.py uses for F16 (max|diff| / max|logit| < 0.005)."""
    from gguf_reference import rel_err

    from quantize import gguf_names as names
    from quantize.gguf_file import llm_hyperparams, open_gguf

    root, model = exported
    contents = open_gguf(root / "out" / "llm-f16.gguf", names.ARCH_LLM)
    assert contents.metadata[names.ATTENTION] == "mmca" and llm_hyperparams(contents).attention == "mmca"
    if backend == "ggml":
        ggml_llm = pytest.importorskip("quantize.ggml_llm")
        llm = ggml_llm.GgmlLLM(contents)
    else:
        from quantize.torch_llm import TorchLLM
        llm = TorchLLM(contents, dtype="fp32")
    rng = np.random.default_rng(5)
    ids = rng.integers(0, 256, 10)
    image = (rng.standard_normal((33, model.config.text_config.hidden_size)) * 0.5).astype(np.float32)
    prefill, steps = _runtime_logits(llm, ids, image)

    lm = model.language_model
    table = lm.get_input_embeddings().weight.detach().numpy()
    embeds = np.concatenate([table[ids[:4]], image[:-1], table[ids[4:7]], image[-1:], table[ids[7:10]]])
    images = torch.tensor([[False] * 4 + [True] * 32 + [False] * 3 + [True] + [False] * 3])
    with torch.no_grad():
        want = lm(inputs_embeds=torch.from_numpy(embeds)[None], image_mask=images, use_cache=False).logits[0].numpy()
    got = np.concatenate([prefill, np.stack(steps)])
    assert rel_err(got, want) < 0.005, rel_err(got, want)
    with torch.no_grad():  # and the image split matters here: the causal model is far off
        causal = lm(inputs_embeds=torch.from_numpy(embeds)[None], use_cache=False).logits[0].numpy()
    assert rel_err(causal, want) > 0.05


def test_a_file_without_the_key_is_causal_and_llama_cpp_refuses_mmca(exported, tmp_path):
    from quantize import gguf_names as names
    from quantize.export import export_model
    from quantize.gguf_file import llm_hyperparams, open_gguf
    from quantize.engine_choice import load_language_model

    from tinygpt.model import load_vlm, save_vlm

    root, _ = exported
    model = load_vlm(root / "model")
    set_attention_kind(model.config.text_config, "causal")
    save_vlm(model, tmp_path / "causal")
    export_model(tmp_path / "causal", tmp_path / "out", "f16", progress=False)
    contents = open_gguf(tmp_path / "out" / "llm-f16.gguf", names.ARCH_LLM)
    assert names.ATTENTION not in contents.metadata and llm_hyperparams(contents).attention == "causal"
    mmca = open_gguf(root / "out" / "llm-f16.gguf", names.ARCH_LLM)
    with pytest.raises(UserError, match="no multi-modal causal attention"):
        load_language_model(mmca, backend="llama-cpp")
