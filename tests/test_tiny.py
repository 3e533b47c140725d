"""Tiny backbones (cache, pretraining value), the shapes metrics, and a very short run of the whole tiny recipe.

One small backbone build (a few dozen pretraining steps) is shared by the tests of this module; the full-size
default build (``ensure_tiny_backbones()``) is exercised by ``python train.py`` and measured in the README.
"""

from __future__ import annotations

import json
import os
import time

import pytest
import torch

from tinygpt.tiny.shapes import (attribute_recall, caption_scores, grounding_iou, normalize_answer, token_f1,
                                       vqa_correct)
from tinygpt.model import build_config
from tinygpt.tiny.backbones import (BUILD_SOURCES, MARKER, PACKAGE_ROOT, backbones_key, ensure_tiny_backbones,
                                    sources_digest)
from tinygpt.tiny.pretrain_llm import LLMPretrainSettings
from tinygpt.tiny.pretrain_vision import PATCH_CLASSES, query_outputs, render_pool
from tinygpt.tiny.scene_code import (CODE_LENGTH, NUMBER_CLASSES, VOCABULARY, code_token_ids, scene_code,
                                    slot_embeddings, slot_is_number, vocabulary_token_ids)

from tiny_settings import SMALL_LLM, SMALL_VISION  # noqa: E402  (the small build shared with conftest's fixture)


# --- metrics on hand-made cases -------------------------------------------------------------------------------------

def test_vqa_normalisation_and_exact_match():
    assert normalize_answer("Two.") == "2"
    assert normalize_answer("The  Red!") == "red"
    assert vqa_correct("Red", ["red"] * 10)
    assert vqa_correct("three", ["3"])
    assert not vqa_correct("reddish", ["red"])
    assert not vqa_correct("red circle", ["red"])


def test_caption_metrics_exact_numbers():
    # articles dropped: [large red circle on left] vs [large red circle on right] -> 4 common of 5 and 5
    assert token_f1("a large red circle on the left.", "a large red circle on the right.") == pytest.approx(0.8)
    assert token_f1("", "a red circle") == 0.0
    reference = "a large red circle on the left and a small green square at the bottom."
    assert attribute_recall("large red circle and small blue square", reference) == 0.5
    assert attribute_recall("A large red circle, a small green square.", reference) == 1.0
    scores = caption_scores(reference.upper(), [reference])
    assert scores == {"f1": 1.0, "exact": 1.0, "attribute_recall": 1.0}


def test_grounding_iou_exact_numbers():
    assert grounding_iou("{<0><0><50><50>}", [0, 0, 112, 112], 224, 224) == pytest.approx(1.0)
    # (56,0)-(168,112) vs (0,0)-(112,112): intersection 56x112, union 2*112^2 - 56*112 -> 1/3
    assert grounding_iou("<p>x</p> {<25><0><75><50>}", [0, 0, 112, 112], 224, 224) == pytest.approx(1 / 3)
    assert grounding_iou("<10><10><20><20>", [22.4, 22.4, 22.4, 22.4], 224, 224) == pytest.approx(1.0)
    assert grounding_iou("on the left", [0, 0, 10, 10], 224, 224) is None


# --- scene code -----------------------------------------------------------------------------------------------------

def test_scene_code_is_32_slots_of_single_tokens_matching_box_text():
    from tinygpt.tiny.synthetic import texts
    from tinygpt.tiny.synthetic.scenes import sample_scene, scene_rng
    from tinygpt.tasks import parse_boxes
    from tinygpt.tokenizer import load_tokenizer

    assert len(vocabulary_token_ids(load_tokenizer())) == len(VOCABULARY)
    regions = ["left", "top", "center", "bottom", "right"]
    for i in range(20):
        scene = sample_scene(scene_rng(7, "test-code", i), 224)
        slots = scene_code(scene)
        assert len(slots) == CODE_LENGTH
        for obj in scene.objects:
            slot = regions.index(obj.region) * 6
            size, where = f" {obj.size}", f" {obj.region}"
            colour, shape = f" {obj.colour}", f" {obj.shape}"
            assert slots[slot : slot + 4] == [(colour, shape, size, where), (shape, colour, size, where),
                                              (where, colour, shape, size), (size, colour, shape, where)]
            box = parse_boxes(texts.box_text(scene, obj))[0][1]  # the top-left corner, on the box-text grid
            assert slots[slot + 4 : slot + 6] == [(str(box[0]), colour, shape), (str(box[1]), colour, shape)]
            assert [slot_is_number(k) for k in range(slot, slot + 6)] == [False] * 4 + [True] * 2
        for region in set(regions) - {o.region for o in scene.objects}:
            slot = regions.index(region) * 6
            assert slots[slot : slot + 6] == [(" none", f" {region}")] + [(" none",)] * 5
        assert slots[-2:] == [([" one", " two", " three"][len(scene.objects) - 1],), (".",)]


def test_slot_embedding_is_its_first_word_plus_half_weighted_context_rescaled():
    embedding = torch.nn.Embedding(10, 4)
    slots = torch.tensor([[1, 2, 3, 4], [5, -1, -1, -1], [6, 7, -1, -1]])
    got = slot_embeddings(slots, embedding, -1)
    w = embedding.weight
    assert torch.allclose(got[0], (w[1] + 0.5 * (w[2] + w[3] + w[4])) / (1 + 3 * 0.25) ** 0.5)
    assert torch.allclose(got[1], w[5])
    assert torch.allclose(got[2], (w[6] + 0.5 * w[7]) / 1.25 ** 0.5)


def test_vision_targets_weigh_a_slots_words_and_numbers_are_soft():
    from tinygpt.tiny.synthetic.scenes import sample_scene, scene_rng
    from tinygpt.tiny.pretrain_vision import soft_targets
    from tinygpt.tiny.scene_code import code_classes

    scene = sample_scene(scene_rng(7, "test-code", 3), 224)
    classes = torch.tensor([code_classes(scene)])
    target = soft_targets(classes, sigma=1.0)[0]
    assert torch.allclose(target.sum(-1), torch.ones(CODE_LENGTH))
    obj_slot = ["left", "top", "center", "bottom", "right"].index(scene.objects[0].region) * 6
    assert sorted(target[obj_slot].nonzero().flatten().tolist()) == sorted(classes[0, obj_slot].tolist())
    assert torch.allclose(target[obj_slot][classes[0, obj_slot]], torch.tensor([0.4, 0.2, 0.2, 0.2]))
    # a coordinate slot: its number's half of the mass spread over nearby numbers, its colour and shape a quarter each
    number_slot = classes[0, obj_slot + 4]
    numbers = torch.tensor(NUMBER_CLASSES)
    spread = target[obj_slot + 4][numbers]
    assert (spread > 0).sum() > 3 and numbers[spread.argmax()] == number_slot[0]
    assert spread.sum() == pytest.approx(0.5)
    assert target[obj_slot + 4][number_slot[1:3]].tolist() == pytest.approx([0.25, 0.25])


def test_code_accuracy_reads_a_coordinate_slots_number_past_its_context_words(monkeypatch):
    from tinygpt.tiny.synthetic.scenes import sample_scene, scene_rng
    from tinygpt.tiny import pretrain_vision
    from tinygpt.tiny.scene_code import code_classes

    scenes = [sample_scene(scene_rng(7, "test-code", i), 224) for i in range(4)]
    targets = torch.tensor([code_classes(scene) for scene in scenes])
    exact = pretrain_vision.soft_targets(targets, sigma=1.0)  # a head that predicts the targets exactly
    assert (exact.argmax(-1) != targets[..., 0]).any()  # a colour outweighs the spread-out number in some slots
    numbers = torch.tensor(NUMBER_CLASSES)
    off_by_ten = exact.clone()
    off_by_ten[..., numbers] = torch.roll(exact[..., numbers], 10, dims=-1)
    for logits, coordinates in ((exact, 1.0), (off_by_ten, 0.0)):
        monkeypatch.setattr(pretrain_vision, "query_outputs", lambda model, pixels, logits=logits: logits)
        figures = pretrain_vision.code_accuracy(None, torch.nn.Identity(), torch.zeros(4, 1), targets)
        assert figures == {"attribute_accuracy": 1.0, "coordinate_within_2": coordinates, "scene_exact": 1.0}


# --- backbones ------------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_backbone_cache_is_made_once_and_reused(small_backbones):
    cache, path, first_seconds = small_backbones
    assert path.name == backbones_key(SMALL_LLM, SMALL_VISION)
    assert (path / MARKER).is_file() and (path / "config.json").is_file()
    marker = json.loads((path / MARKER).read_text())
    start = time.monotonic()
    again = ensure_tiny_backbones(cache, llm=SMALL_LLM, vision=SMALL_VISION, progress=False)
    assert again == path
    assert time.monotonic() - start < 0.5
    if "PYTEST_XDIST_WORKER" not in os.environ:  # under xdist another worker may have built the shared cache
        assert first_seconds > 0.5
    assert json.loads((path / MARKER).read_text()) == marker  # not rebuilt
    other = backbones_key(LLMPretrainSettings(steps=21), SMALL_VISION)
    assert other != path.name  # any change of recipe gets its own directory
    text = json.loads((path / "config.json").read_text())["text_config"]
    # the settings' width and depth, not the preset's
    assert (text["hidden_size"], text["intermediate_size"], text["num_hidden_layers"]) == (128, 512, 2)
    preset = build_config("tiny").text_config
    assert (preset.hidden_size, preset.num_hidden_layers) == (256, 4)



def test_backbone_key_follows_the_build_sources(tmp_path, monkeypatch):
    import tinygpt.tiny.backbones as backbones

    assert (PACKAGE_ROOT / "tiny/synthetic/texts.py").is_file()
    assert all((PACKAGE_ROOT / source).exists() for source in BUILD_SOURCES)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "texts.py").write_text("CAPTION = 'a red circle'\n")
    (tmp_path / "scene.py").write_text("SLOTS = 32\n")
    sources = ("data", "scene.py")
    first = sources_digest(tmp_path, sources)
    assert sources_digest(tmp_path, sources) == first  # deterministic
    monkeypatch.setattr(backbones, "sources_digest", lambda: first)
    key = backbones_key(SMALL_LLM, SMALL_VISION)
    (tmp_path / "data" / "texts.py").write_text("CAPTION = 'two shapes, a red circle'\n")  # a caption wording change
    second = sources_digest(tmp_path, sources)
    monkeypatch.setattr(backbones, "sources_digest", lambda: second)
    assert second != first and backbones_key(SMALL_LLM, SMALL_VISION) != key
    (tmp_path / "data" / "notes.txt").write_text("not a source")  # only .py files inside a folder count
    assert sources_digest(tmp_path, sources) == second


def _train_cli():
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("train_cli", Path(__file__).resolve().parents[1] / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_killed_builds_folders_are_swept_and_a_live_ones_kept(tmp_path):
    """A build killed outright (SIGKILL, power loss) leaves .NAME.building-PID / .NAME.scratch-PID beside the target;
    the next build removes those whose process is gone and keeps a running build's."""
    import subprocess

    from tinygpt.tiny.backbones import sweep_dead_builds

    gone = subprocess.Popen(["true"])
    gone.wait()
    target = tmp_path / "tiny-backbones-v6-0123456789"
    dead = [tmp_path / f".{target.name}.{kind}-{gone.pid}" for kind in ("building", "scratch")]
    live = tmp_path / f".{target.name}.scratch-{os.getpid()}"
    other = tmp_path / f".tiny-backbones-v6-9999999999.scratch-{gone.pid}"  # another key's: not this build's business
    for folder in dead + [live, other]:
        folder.mkdir()
        (folder / "config.json").write_text("{}")
    assert sweep_dead_builds(target) == sorted(dead)
    assert not any(p.exists() for p in dead) and live.is_dir() and other.is_dir()


def test_tiny_llm_steps_flag_reaches_the_recipe_with_enough_documents(monkeypatch, capsys):
    import tinygpt.tiny.recipe

    received = []
    monkeypatch.setattr(tinygpt.tiny.recipe, "run_tiny_recipe", lambda **kwargs: received.append(kwargs["llm"]))
    train = _train_cli()
    assert train.main([]) == 0 and train.main(["--tiny-llm-steps", "3000"]) == 0
    default, longer = received
    assert default == LLMPretrainSettings()  # no flag: the default build and its cache directory are unchanged
    assert default.documents >= default.steps * default.batch_size  # the default sees no document twice either
    assert (longer.steps, longer.documents) == (3000, 48000)  # batch 16 x 3,000 steps: no document seen twice
    assert backbones_key(longer, SMALL_VISION) != backbones_key(default, SMALL_VISION)
    assert LLMPretrainSettings().with_steps(100).documents == LLMPretrainSettings().documents  # never fewer
    assert train.main(["--tiny-llm-steps", "0"]) == 2
    assert capsys.readouterr().err.strip() == "error: --tiny-llm-steps: must be at least 1, got 0"
    assert train.main(["--cfg-path", "train_configs/tiny/stage1.yaml", "--tiny-llm-steps", "5"]) == 2
    assert "--tiny-llm-steps is for the tiny recipe" in capsys.readouterr().err
    assert len(received) == 2


def test_quiet_reaches_the_tiny_recipe(monkeypatch):
    """`python train.py --quiet` ("warnings only: no info lines, no progress bar") used to print every [tiny] line
    and progress bar of the default recipe: the flag reached only the logging level."""
    import tinygpt.tiny.recipe

    progress = []
    monkeypatch.setattr(tinygpt.tiny.recipe, "run_tiny_recipe", lambda **kwargs: progress.append(kwargs["progress"]))
    train = _train_cli()
    assert train.main(["--quiet"]) == 0 and train.main([]) == 0
    assert progress == [False, True]

def test_backbones_record_the_true_code_ceiling(small_backbones):
    marker = json.loads((small_backbones[1] / MARKER).read_text())
    ceiling = marker["figures"]["llm"]["true_code_ceiling"]
    assert ceiling["scenes"] == 4
    assert 0.0 <= ceiling["vqa_accuracy"] <= 1.0 and 0.0 <= ceiling["grounding_accuracy"] <= 1.0
    assert sum(len(kind) > 0 for kind in ceiling["vqa_by_kind"]) == 4  # one question per scene, kinds in turn


def test_llm_ceiling_scores_an_oracle_and_a_blind_model():
    """A stand-in LM that reads the code it is given back from the prompt embeddings scores 100%; one that always
    says the same thing scores what that answer is worth."""
    from tinygpt.tiny.synthetic import texts
    from tinygpt.tiny.synthetic.scenes import sample_scene, scene_rng
    from tinygpt.tiny.llm_ceiling import llm_ceiling
    from tinygpt.tiny.scene_code import padded_slots
    from tinygpt.tokenizer import load_tokenizer

    tokenizer = load_tokenizer()
    vocab = vocabulary_token_ids(tokenizer)
    torch.manual_seed(0)
    embedding = torch.nn.Embedding(51200, 8)

    class Config:
        bos_token_id, pad_token_id = 50256, 50256

    class StandIn(torch.nn.Module):
        config = Config()

        def __init__(self, answer_of):
            super().__init__()
            self.answer_of = answer_of

        def get_input_embeddings(self):
            return embedding

        def generate(self, inputs_embeds, **kwargs):  # like transformers: only the new tokens come back
            reply = tokenizer(self.answer_of(inputs_embeds[0]) + "###", add_special_tokens=False)["input_ids"]
            return torch.tensor([reply])

    scenes = [sample_scene(scene_rng(0, "llm-ceiling", i), 224) for i in range(6)]

    def oracle(embeds):  # find the scene whose code is in the prompt, answer from the scene itself
        text_ids = [int((embedding.weight - e).abs().sum(-1).argmin()) for e in embeds]
        prompt = tokenizer.decode([t for t, e in zip(text_ids, embeds) if torch.equal(embedding.weight[t], e)])
        for i, scene in enumerate(scenes):
            code = slot_embeddings(padded_slots(code_token_ids(scene, vocab)), embedding, -1)
            if any(torch.allclose(embeds[k : k + len(code)], code) for k in range(len(embeds) - len(code) + 1)):
                if "[refer]" in prompt:
                    obj = next(o for o in scene.objects if texts.phrase(o) in prompt)
                    return texts.box_text(scene, obj)
                kind = texts.VQA_KINDS[i % len(texts.VQA_KINDS)]
                qa = texts.question(scene, kind, scene_rng(0, "text:llm-ceiling", i))
                return qa.answer
        raise AssertionError("the scene code is not in the prompt")

    with torch.no_grad():
        perfect = llm_ceiling(StandIn(oracle), tokenizer, scenes=6)
        blind = llm_ceiling(StandIn(lambda embeds: "yes"), tokenizer, scenes=6)
    assert perfect["vqa_accuracy"] == 1.0 and perfect["grounding_accuracy"] == 1.0
    assert blind["grounding_accuracy"] == 0.0 and blind["vqa_accuracy"] < 0.5


def test_backbones_keep_projections_default_and_extra_norms_at_identity(small_backbones):
    from tinygpt.model import load_vlm

    model = load_vlm(small_backbones[1])
    for name, tensor in model.state_dict().items():
        if any(k in name for k in ("q_layernorm", "k_layernorm", "post_layernorm")) and "language_model" in name:
            expected = 1.0 if name.endswith("weight") else 0.0
            assert torch.all(tensor == expected), name
    # projections: PyTorch default init is uniform(-1/sqrt(fan_in), 1/sqrt(fan_in)), untouched by pretraining
    bound = 1 / model.proj1.weight.shape[1] ** 0.5
    assert model.proj1.weight.abs().max() <= bound and model.proj1.weight.std() > bound / 3


def test_pretrained_llm_embeddings_start_at_unit_scale_and_unused_rows_keep_the_init(small_backbones):
    from tinygpt.model import load_vlm
    from tinygpt.tiny.pretrain_llm import EMBEDDING_INIT_STD, UNUSED_LOGIT_BIAS

    model = load_vlm(small_backbones[1])
    table = model.language_model.get_input_embeddings().weight.detach()
    unused = model.language_model.lm_head.bias == UNUSED_LOGIT_BIAS  # tokens the pretraining never saw
    used = ~unused
    assert 300 < int(used.sum()) < 1000
    # 20 steps at lr <= 3e-3 move a weight by at most 0.06: the trained rows are still at the enlarged init scale
    assert abs(float(table[used].std()) - EMBEDDING_INIT_STD) < 0.15
    assert abs(float(table[unused].std()) - model.config.text_config.initializer_range) < 0.002


def test_pretrain_llm_calls_before_step_once_per_step_in_order():
    from tinygpt.model import TinyGPTVForConditionalGeneration
    from tinygpt.tiny.pretrain_llm import pretrain_llm
    from tinygpt.tokenizer import load_tokenizer

    config = build_config("tiny", tokenizer_source="builtin")
    config.text_config.hidden_size, config.text_config.intermediate_size = 128, 256
    language_model = TinyGPTVForConditionalGeneration(config).language_model
    seen = []
    settings = LLMPretrainSettings(hidden_size=128, intermediate_size=256, steps=3, batch_size=2, documents=12,
                                   ceiling_scenes=0)
    pretrain_llm(language_model, load_tokenizer(), settings, progress=False, heldout_documents=2,
                 before_step=seen.append)
    assert seen == [0, 1, 2]


def test_llm_documents_follow_the_document_mix():
    from collections import Counter

    from tinygpt.tiny.pretrain_llm import DOCUMENT_MIX, make_documents

    def kind(doc):
        turns, scenes, fmt = doc
        return "multi" if len(scenes) == 2 else "text" if not scenes else fmt

    only_captions = make_documents(60, seed=3, mix=(("caption", 1.0),))
    assert {kind(d) for d in only_captions} == {"caption"}
    assert all(" shape" in d[0][0]["assistant"].split(", a ")[0] for d in only_captions)  # "two shapes, a small ..."
    counts = Counter(kind(d) for d in make_documents(3000, seed=3))
    weights = dict(DOCUMENT_MIX)
    # instruct documents are framed by one of the three templates (caption-format one time in six): compare the
    # multi-image share and the caption-format single-image share (caption documents + a sixth of instruct ones)
    total = sum(weights.values())
    assert abs(counts["multi"] / 3000 - weights["multi"] / total) < 0.02
    assert abs(counts["caption"] / 3000 - (weights["caption"] + weights["instruct"] / 6) / total) < 0.03
    assert make_documents(50, seed=3) == make_documents(50, seed=3)
    with pytest.raises(ValueError, match="document_mix: unknown document kinds \\['captions'\\]"):
        make_documents(5, seed=3, mix=(("captions", 1.0),))


def _ridge_predict(x_train, y_train, x_held, lam: float = 1e-2):
    add_bias = lambda x: torch.cat([x, torch.ones(len(x), 1)], dim=1)  # noqa: E731
    x_train, x_held = add_bias(x_train), add_bias(x_held)
    weights = torch.linalg.solve(x_train.T @ x_train + lam * torch.eye(x_train.shape[1]), x_train.T @ y_train)
    return x_held @ weights


def _probes(model, train, held) -> dict:
    """Held-out linear (ridge) probes on frozen features.

    patch: ViT patch outputs -> colour x shape under the patch centre (foreground patches only);
    count: mean of the Q-Former outputs -> number of objects (what stage 1 receives, pooled).
    """
    with torch.no_grad():
        vit_train = model.vision_model(pixel_values=train[0]).last_hidden_state[:, 1:]
        vit_held = model.vision_model(pixel_values=held[0]).last_hidden_state[:, 1:]
        q_train, q_held = query_outputs(model, train[0]).mean(1), query_outputs(model, held[0]).mean(1)
    labels = torch.nn.functional.one_hot(train[2].flatten(), PATCH_CLASSES).float()
    patch_pred = _ridge_predict(vit_train.flatten(0, 1), labels, vit_held.flatten(0, 1)).argmax(-1)
    target, foreground = held[2].flatten(), held[2].flatten() > 0
    count_slot = CODE_LENGTH - 2
    counts = torch.nn.functional.one_hot(train[1][:, count_slot, 0], len(VOCABULARY)).float()
    count_pred = _ridge_predict(q_train, counts, q_held).argmax(-1)
    return {"patch": float((patch_pred[foreground] == target[foreground]).float().mean()),
            "count": float((count_pred == held[1][:, count_slot, 0]).float().mean())}


def test_pretrained_vision_beats_random_on_heldout_probes(small_backbones):
    from tinygpt.model import TinyGPTVForConditionalGeneration, build_config, load_vlm

    train = render_pool(150, 11, "probe-train", 112)
    held = render_pool(60, 11, "probe-heldout", 112)
    torch.manual_seed(0)
    random_model = TinyGPTVForConditionalGeneration(build_config("tiny")).eval()
    random_probes = _probes(random_model, train, held)
    pretrained_probes = _probes(load_vlm(small_backbones[1]), train, held)
    print(f"probes: random {random_probes}, pretrained {pretrained_probes}")
    assert pretrained_probes["patch"] > random_probes["patch"] + 0.05
    assert pretrained_probes["count"] > random_probes["count"] + 0.1
