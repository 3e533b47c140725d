"""Format review: answers that are blank (or that text processing empties) are bad records, not trained on; JSON files
may start with a byte-order mark (unnatural instructions' list detection included); a JSON list given to
generic_jsonl is one clear error; a damaged feature cache is a UserError, not a traceback. All data is written in
tmp_path."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from tinygpt.errors import UserError

from test_data_format_checks import LENIENT, S, make_image  # the same small images and bad-record policy


def write_json(path: Path, content, prefix: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(prefix + json.dumps(content, indent=1), encoding="utf-8")
    return path


def skipped(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "skipped bad record" in r.getMessage()]


def answers(dataset) -> list[str]:
    return [turn["assistant"] for i in range(len(dataset)) for turn in dataset[i]["turns"]]


# --- blank answers ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("multi_turn", [False, True])
def test_llava_blank_answer_or_question_is_a_bad_record(tmp_path, caplog, multi_turn):
    from tinygpt.data.formats.llava import LlavaDataset
    make_image(tmp_path / "img" / "COCO_train2014_1.jpg")
    q, a = {"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A ball."}
    path = write_json(tmp_path / "llava.json", [
        {"id": "1", "conversations": [q, a]},
        {"id": "1", "conversations": [q, {"from": "gpt", "value": " "}]},
        {"id": "1", "conversations": [q, a, {"from": "human", "value": ""}, a]},
        {"id": "1", "conversations": [{"from": "human", "value": "<image>\n..."}, a]},  # detail: emptied question
    ])
    with caplog.at_level(logging.WARNING, logger="tinygpt.data"):
        dataset = LlavaDataset(str(path), str(tmp_path / "img"), image_size=S, seed=0, bad_records=LENIENT,
                               multi_turn=multi_turn)
    assert len(dataset) == 1 + multi_turn and set(answers(dataset)) == {"A ball."}
    emptied = [] if multi_turn else [f"{path} record 3: skipped bad record: the first question is empty"]
    assert skipped(caplog) == [f"{path} record 1: skipped bad record: conversations[1] has an empty 'value'",
                               f"{path} record 2: skipped bad record: conversations[2] has an empty 'value'", *emptied]


def test_vqa_answers_that_text_processing_empties_are_not_drawn(tmp_path, caplog):
    from tinygpt.data.formats.vqa import VQADataset
    make_image(tmp_path / "img" / "COCO_train2014_1.jpg")
    image = "train2014/COCO_train2014_1.jpg"
    path = write_json(tmp_path / "vqa.json", [
        {"question": "Is it red?", "answer": ["...", "...", "...", "yes"], "image": image},
        {"question": "Is it red?", "answer": ["...", "!"], "image": image},
    ])
    with caplog.at_level(logging.WARNING, logger="tinygpt.data"):
        dataset = VQADataset(str(path), str(tmp_path / "img"), variant="coco_vqa", image_size=S, seed=0,
                             bad_records=LENIENT)
    assert len(dataset) == 1
    drawn = set()
    for epoch in range(8):  # "..." has weight 3/4: an empty answer would be drawn in some epoch
        dataset.set_epoch(epoch)
        drawn.update(answers(dataset))
    assert drawn == {"yes"}
    assert skipped(caplog) == [f"{path} record 1: skipped bad record: field 'answer' holds no answer text"]


def test_a_caption_that_text_processing_empties_is_a_bad_record(tmp_path, caplog):
    from tinygpt.data.formats.captions import TextCaps
    make_image(tmp_path / "img" / "abc.jpg")
    path = write_json(tmp_path / "textcaps.json", {"data": [{"image_id": "abc", "caption_str": "A sign."},
                                                            {"image_id": "abc", "caption_str": "..."}]})
    with caplog.at_level(logging.WARNING, logger="tinygpt.data"):
        dataset = TextCaps(str(path), str(tmp_path / "img"), image_size=S, seed=0, bad_records=LENIENT)
        assert answers(dataset) == ["a sign", "a sign"]  # the bad record has a good one stand in
    assert skipped(caplog) == [f"{path} record 1: skipped bad record: turn 1's answer is empty (after text "
                               "processing)"]


# --- byte-order marks and list / lines mix-ups ------------------------------------------------------------------------

def test_json_files_may_start_with_a_byte_order_mark(tmp_path):
    from tinygpt.data.formats.cc_sbu_align import CCSBUAlign
    from tinygpt.data.formats.unnatural import UnnaturalInstructions
    make_image(tmp_path / "cc" / "image" / "2.jpg")
    write_json(tmp_path / "cc" / "filter_cap.json", {"annotations": [{"image_id": "2", "caption": "A dog."}]}, "\ufeff")
    assert answers(CCSBUAlign(str(tmp_path / "cc"), image_size=S, seed=0)) == ["A dog."]
    instance = {"instruction_with_input": "Sort: B, A.", "output": "A, B."}
    path = write_json(tmp_path / "unnatural.json", [{"instances": [instance]}] * 3, "\ufeff")
    dataset = UnnaturalInstructions(str(path), image_size=S, seed=0)  # a list, not 20 bad JSON lines
    assert len(dataset) == 3 and dataset[0]["turns"] == [{"user": "sort b, a", "assistant": "a, b"}]


@pytest.mark.parametrize("indent", [None, 1])
def test_generic_jsonl_given_a_json_list_is_one_clear_error(tmp_path, caplog, indent):
    from tinygpt.data.formats.generic_jsonl import GenericJsonl
    record = {"images": [], "conversations": [{"user": "Hi?", "assistant": "Hello."}]}
    path = tmp_path / "mine.jsonl"
    path.write_text("\ufeff" + json.dumps([record] * 30, indent=indent), encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="tinygpt.data"), \
            pytest.raises(UserError, match=r"mine\.jsonl: a JSON list, but generic_jsonl reads JSON lines"):
        GenericJsonl(str(path), image_size=S, seed=0, bad_records=LENIENT)
    assert skipped(caplog) == []


# --- feature cache ----------------------------------------------------------------------------------------------------

def _feature_cache(root: Path) -> Path:
    import torch
    from safetensors.torch import save_file
    root.mkdir(parents=True, exist_ok=True)
    shard = {"features": "features-00000.safetensors", "samples": "samples-00000.jsonl"}
    write_json(root / "manifest.json", {"dataset": "x", "samples": 1, "model": None, "image_size": S,
                                        "num_query_tokens": 2, "hidden_size": 4, "shards": [shard]})
    save_file({"features": torch.zeros(1, 2, 4), "offsets": torch.tensor([0, 1])}, str(root / shard["features"]))
    (root / shard["samples"]).write_text(json.dumps({"turns": [{"user": "<ImageHere>", "assistant": "a"}],
                                                     "dataset": "x"}) + "\n")
    return root


@pytest.mark.parametrize("damage,message", [
    (lambda root: (root / "samples-00000.jsonl").unlink(), r"samples-00000\.jsonl: cannot read the feature cache's "
                                                           r"samples \(No such file or directory\); rebuild"),
    (lambda root: (root / "samples-00000.jsonl").write_text("{\"turns\": [\n"), r"samples-00000\.jsonl:1: not valid "
                                                                                 r"JSON"),
    (lambda root: (root / "features-00000.safetensors").unlink(), r"features-00000\.safetensors: feature shard does "
                                                                  r"not exist"),
    (lambda root: write_json(root / "manifest.json", {**json.loads((root / "manifest.json").read_text()),
                                                      "shards": "features-00000.safetensors"}),
     r"manifest\.json: 'shards' must be a list"),
])
def test_a_damaged_feature_cache_is_a_user_error(tmp_path, damage, message):
    from tinygpt.data.formats.qformer_features import FeatureDataset
    root = _feature_cache(tmp_path / "cache")
    assert FeatureDataset(str(root))[0]["turns"] == [{"user": "<ImageHere>", "assistant": "a"}]
    damage(root)
    with pytest.raises(UserError, match=message):
        FeatureDataset(str(root))
