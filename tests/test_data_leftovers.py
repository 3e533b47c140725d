"""Records that used to be trained on quietly: a generic_jsonl turn with a blank user text, a Flickr phrase-to-box
``bbox`` with text after its boxes (it becomes the answer's tail), a VQA answer list with a non-string item (it was
dropped, which moved the other answers' weights). Each is now a bad record with one message. All data in tmp_path."""

from __future__ import annotations

import json
import logging

import pytest

from test_data_format_checks import LENIENT, S, make_image
from test_data_formats_review import answers, skipped, write_json


@pytest.mark.parametrize("user", ["", "  \n"])
def test_generic_jsonl_blank_user_text_is_a_bad_record(tmp_path, caplog, user):
    from tinygpt.data.formats.generic_jsonl import GenericJsonl
    good = {"images": [], "conversations": [{"user": "Hi?", "assistant": "Hello."}]}
    blank = {"images": [], "conversations": [{"user": "Hi?", "assistant": "Hello."},
                                             {"user": user, "assistant": "Bye."}]}
    path = tmp_path / "mine.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in (good, blank)) + "\n", encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="tinygpt.data"):
        dataset = GenericJsonl(str(path), image_size=S, seed=0, bad_records=LENIENT)
    assert len(dataset) == 1 and answers(dataset) == ["Hello."]
    assert skipped(caplog) == [f"{path}:2: skipped bad record: conversations[1].user is empty"]


def test_generic_jsonl_image_marker_alone_is_a_question(tmp_path):
    from tinygpt.data.formats.generic_jsonl import GenericJsonl
    make_image(tmp_path / "a.jpg")
    path = tmp_path / "mine.jsonl"
    path.write_text(json.dumps({"images": ["a.jpg"], "conversations": [{"user": "<image>", "assistant": "A dot."}]})
                    + "\n", encoding="utf-8")
    assert answers(GenericJsonl(str(path), image_size=S, seed=0)) == ["A dot."]


@pytest.mark.parametrize("bbox", ["{<1><2><3><4>} the dog", "the dog {<1><2><3><4>}",
                                  "{<1><2><3><4>}<delim>{<5><6><7><8>}.", "{<1><2><3><4>}{<5><6><7><8>}"])
def test_flickr_bbox_with_other_text_is_a_bad_record(tmp_path, caplog, bbox):
    from tinygpt.data.formats.flickr import FlickrGrounding
    make_image(tmp_path / "img" / "1000.jpg")
    path = write_json(tmp_path / "phrasetobbox.json", [
        {"image_id": "1000", "phrase": "dog", "bbox": "{<1><2><3><4>}"},
        {"image_id": "1000", "phrase": "dog", "bbox": " {<1><2><3><4>} <delim> {<5><6><7><8>} "},
        {"image_id": "1000", "phrase": "dog", "bbox": bbox}])
    with caplog.at_level(logging.WARNING, logger="tinygpt.data"):
        dataset = FlickrGrounding(str(path), str(tmp_path / "img"), task="object_to_phrase", image_size=S, seed=0,
                                  bad_records=LENIENT)
    assert len(dataset) == 2
    assert skipped(caplog) == [f"{path} record 2: skipped bad record: field 'bbox' must hold only boxes, several "
                               f"joined by <delim>, got {bbox!r}"]


@pytest.mark.parametrize("item", [2, None, {"answer": "two"}, ["two"]])
def test_vqa_answer_list_with_a_non_string_item_is_a_bad_record(tmp_path, caplog, item):
    from tinygpt.data.formats.vqa import VQADataset
    make_image(tmp_path / "img" / "COCO_train2014_1.jpg")
    image = "train2014/COCO_train2014_1.jpg"
    path = write_json(tmp_path / "vqa.json", [
        {"question": "How many?", "answer": ["two", "two", "three"], "image": image},
        {"question": "How many?", "answer": ["two", "three", item], "image": image}])
    with caplog.at_level(logging.WARNING, logger="tinygpt.data"):
        dataset = VQADataset(str(path), str(tmp_path / "img"), variant="coco_vqa", image_size=S, seed=0,
                             bad_records=LENIENT)
    assert len(dataset) == 1
    assert skipped(caplog) == [f"{path} record 1: skipped bad record: field 'answer'[2] is {type(item).__name__}, "
                               "not a string"]
