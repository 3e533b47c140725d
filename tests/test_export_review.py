"""A user's fine-tune through `python -m quantize export`: config.json settings the runtimes refuse are one UserError
naming config.json and the field, before any weight is loaded or file written; LoRA with a non-default alpha / r in a
trainable-only stage output is merged once, scaled alpha / r (quantize.export)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("gguf")

from test_export import SMALL_VOCAB, _save_tiny  # noqa: E402

from quantize import gguf_names as names  # noqa: E402
from quantize.export import export_model  # noqa: E402
from quantize.gguf_file import open_gguf  # noqa: E402
from tinygpt.errors import UserError  # noqa: E402


@pytest.fixture(scope="module")
def moe_model(tmp_path_factory) -> Path:
    """A tiny VLM (small vocabulary) upcycled to 2 experts, top-1, in layer 1."""
    from tinygpt.model.checkpoint_io import save_vlm
    from tinygpt.model.moe import upcycle

    root = tmp_path_factory.mktemp("review-moe")
    model = _save_tiny(root / "dense", text_overrides=SMALL_VOCAB)
    upcycle(model.language_model, {"num_experts": 2, "top_k": 1, "layers": [1]}, seed=0)
    return save_vlm(model, root / "moe")


def edited(model: Path, where: Path, edit) -> Path:
    """A copy of model whose config.json went through edit(dict)."""
    shutil.copytree(model, where)
    config = json.loads((where / "config.json").read_text())
    edit(config)
    (where / "config.json").write_text(json.dumps(config))
    return where


@pytest.mark.parametrize("layers, shown", [([1, 1], r"\[1, 1\]"), ("1", "'1'"), ([9], r"\[9\]")],
                         ids=["duplicate", "string", "past-the-layers"])
def test_moe_layers_the_runtimes_refuse_are_a_config_error(moe_model, tmp_path, layers, shown):
    """Duplicate layers were exported (the runtimes then refused the file); a string crashed building the model
    (TypeError); an index past the layers was an 'incomplete checkpoint' about the weights."""
    bad = edited(moe_model, tmp_path / "bad", lambda c: c["text_config"]["moe"].update(layers=layers))
    with pytest.raises(UserError, match=rf"bad/config.json: text_config.moe.layers is {shown}, expected a non-empty "
                                        r"list of distinct layer indices 0..3"):
        export_model(bad, tmp_path / "out", "f32", progress=False)
    assert not (tmp_path / "out").exists()


def test_moe_expert_count_is_checked_before_the_weights(moe_model, tmp_path):
    """num_experts 0 was a shape error about the router weight in model.safetensors."""
    bad = edited(moe_model, tmp_path / "bad", lambda c: c["text_config"]["moe"].update(num_experts=0))
    with pytest.raises(UserError, match=r"config.json: text_config.moe.num_experts is 0, expected a positive integer"):
        export_model(bad, tmp_path / "out", "f32", progress=False)


def test_prompt_template_with_two_placeholders_is_refused_by_the_export(tmp_path):
    """It was exported, and every runtime then refused the LLM file."""
    _save_tiny(tmp_path / "model", text_overrides=SMALL_VOCAB)
    bad = edited(tmp_path / "model", tmp_path / "bad", lambda c: c.update(prompt_template="Q: {} again {} A: "))
    with pytest.raises(UserError, match=r"--model: .*bad/config.json field prompt_template 'Q: \{\} again \{\} A: ' "
                                        r"holds more than one '\{\}'"):
        export_model(bad, tmp_path / "out", "f32", progress=False)
    assert not (tmp_path / "out").exists()
    ok = edited(tmp_path / "model", tmp_path / "ok", lambda c: c.update(prompt_template="Q: "))  # appended, as trained
    export_model(ok, tmp_path / "out", "f32", progress=False)
    assert open_gguf(tmp_path / "out" / "llm-f32.gguf", names.ARCH_LLM).metadata[names.PROMPT_TEMPLATE] == "Q: {}"


def test_config_json_that_is_not_an_object_says_so(tmp_path):
    """A JSON list was reported as 'not valid JSON ('list' object has no attribute 'get')'."""
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("[1, 2]")
    with pytest.raises(UserError, match=r"--model: .*config.json holds a JSON list, not a model config object"):
        export_model(tmp_path / "model", tmp_path / "out", "f32", progress=False)
    assert not (tmp_path / "out").exists()


def _trained_like(lora: dict | None):
    """The tiny VLM (small vocabulary, toy tokenizer) with lora, its weights drawn as _save_tiny draws them."""
    from test_export import _toy_tokenizer

    from tinygpt.model.presets import build_config
    from tinygpt.model.vlm import TinyGPTVForConditionalGeneration

    config = build_config("tiny", lora=lora)
    for key, value in SMALL_VOCAB.items():
        setattr(config.text_config, key, value)
    model = TinyGPTVForConditionalGeneration(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + torch.randn_like(p) * 0.05 if p.ndim == 1 and name.endswith("weight") else
                    torch.randn_like(p) * 0.02)
    model.tokenizer = _toy_tokenizer()
    return model


def test_lora_stage_with_non_default_alpha_and_r_is_merged_once_scaled_alpha_over_r(tmp_path):
    """A trainable-only stage output (the adapters, unmerged) over a whole base without LoRA: the export holds
    W + alpha / r * B A (alpha 32, r 4: scale 8, not the default alpha's 4), whatever the dropout."""
    from tinygpt.model.checkpoint_io import save_vlm

    torch.manual_seed(0)
    model = _trained_like({"r": 4, "alpha": 32, "dropout": 0.3})
    base = _trained_like(None)
    base.load_state_dict({k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if ".lora_" not in k})
    save_vlm(base, tmp_path / "base")
    for name, p in model.named_parameters():
        p.requires_grad_(".lora_" in name)
    save_vlm(model, tmp_path / "stage", trainable_only=True, base_model=str(tmp_path / "base"))
    export_model(tmp_path / "stage", tmp_path / "out", "f32", progress=False)
    tensors = open_gguf(tmp_path / "out" / "llm-f32.gguf", names.ARCH_LLM).tensors
    for module, gguf in (("qkv", "attn_qkv"), ("dense", "attn_output")):
        layer = getattr(model.language_model.model.layers[2].self_attn, module)
        weight, a, b = (t.detach().numpy() for t in (layer.base_layer.weight, layer.lora_A["default"].weight,
                                                     layer.lora_B["default"].weight))
        assert np.abs(8.0 * b @ a).max() > 1e-2  # the delta shows
        np.testing.assert_allclose(np.asarray(tensors[f"blk.2.{gguf}.weight"].data), weight + 8.0 * b @ a, atol=1e-6)


def test_a_model_with_nan_weights_is_refused_not_exported(tmp_path):
    """A diverged fine-tune exported silently at every qtype: a file that answers garbage."""
    from tinygpt.model.checkpoint_io import save_vlm

    model = _save_tiny(tmp_path / "model", text_overrides=SMALL_VOCAB)
    with torch.no_grad():
        model.language_model.model.layers[0].mlp.fc1.weight[3, 5] = float("nan")
    save_vlm(model, tmp_path / "diverged")
    with pytest.raises(UserError, match=r"--model .*diverged: tensor .*layers\.0\.mlp\.fc1\.weight holds NaN or "
                                        r"infinite values \(did the training diverge\?\)"):
        export_model(tmp_path / "diverged", tmp_path / "out", "q4_k", progress=False)
    assert not (tmp_path / "out").exists()


def test_a_training_checkpoint_given_as_the_model_says_what_to_export_instead(tmp_path):
    """A step_N folder of run.checkpoint_dir was 'not a saved tinygpt model' with no hint of what to give."""
    step = tmp_path / "stage4-checkpoints" / "step_100"
    step.mkdir(parents=True)
    for name in ("trainable.safetensors", "optimizer.pt", "rng_0.pt"):
        (step / name).write_bytes(b"x")
    with pytest.raises(UserError, match=r"--model: .*step_100 is a training checkpoint \(the state a run resumes "
                                        r"from\), not a saved model; export the stage's run.output_dir"):
        export_model(step, tmp_path / "out", "q4_k", progress=False)
    assert not (tmp_path / "out").exists()
