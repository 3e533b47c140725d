"""Loader checks users rely on: box text in generic JSONL and in every Flickr box, unnatural-instruction constraints
given as a list, LLaVA image-name fields of the wrong type, and ``train.py --check`` finding the files a loader
builds from its root (RefCOCO's ``refs(umd).p`` and ``instances.json``) before any model loads. All data is written
in tmp_path."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from PIL import Image

from tinygpt.data.bad_records import BadRecordPolicy

S = 16
LENIENT = BadRecordPolicy(max_bad_fraction=1.0)


def make_image(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 30), (200, 30, 30)).save(path)
    return path


def write_json(path: Path, content) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content))
    return path


def skipped(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "skipped bad record" in r.getMessage()]


# --- 1. generic JSONL: boxes in the conversation --------------------------------------------------------------------

@pytest.mark.parametrize("answer,reason", [
    ("The cat {<10><20><30>}.", "malformed box '{<10><20><30>}' in conversations[0].assistant"),
    ("The cat {<10><20><30.5><40>}.", "malformed box '{<10><20><30.5><40>}'"),
    ("The cat {<10><20><30><40>", "malformed box '{<10><20><30><40>'"),
    ("The cat {<120><340><560><700>}.", "box {<120><340><560><700>} in conversations[0].assistant lies outside "
                                        "the 0-100 grid"),
    ("Cats {<1><2><3><4>}<delim>{<50><2><30><4>}.", "box {<50><2><30><4>} in conversations[0].assistant lies "
                                                    "outside the 0-100 grid or is reversed"),
])
def test_generic_jsonl_refuses_malformed_or_out_of_range_boxes_in_answers(tmp_path, caplog, answer, reason):
    from tinygpt.data.formats.generic_jsonl import GenericJsonl
    make_image(tmp_path / "a.png")
    good = {"images": ["a.png"], "conversations": [{"user": "<image> [refer] the cat", "assistant":
                                                     "{<10><20><30><40>}<delim>{<0><0><100><100>}"}]}
    bad = {"images": ["a.png"], "conversations": [{"user": "<image> where?", "assistant": answer}]}
    path = tmp_path / "mine.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    with caplog.at_level(logging.WARNING, logger="tinygpt.data"):
        dataset = GenericJsonl(str(path), image_size=S, seed=0, bad_records=LENIENT)
    assert len(dataset) == 1 and dataset[0]["turns"][0]["assistant"] == good["conversations"][0]["assistant"]
    [message] = skipped(caplog)
    assert message.startswith(f"{path}:2: skipped bad record: ") and reason in message


def test_generic_jsonl_checks_user_boxes_and_the_writer_refuses_bad_boxes(tmp_path):
    from tinygpt.data.bad_records import BadRecord
    from tinygpt.data.formats.generic_jsonl import parse_generic_record, write_generic_jsonl
    from tinygpt.errors import UserError
    with pytest.raises(BadRecord, match=r"malformed box '\{<1><2><3>\}' in conversations\[1\]\.user"):
        parse_generic_record({"conversations": [{"user": "hi", "assistant": "hello"},
                                                {"user": "[identify] {<1><2><3>}", "assistant": "a cat"}]})
    # texts without box-like tokens stay as written: braces, HTML, a lone number in angle brackets
    parse_generic_record({"conversations": [{"user": "Code?", "assistant": "<b>x</b> {a: 1} <5> 3<4"}]})
    # tags that merely hold a digit are not boxes: headings, cells, templated names
    parse_generic_record({"conversations": [{"user": "HTML?", "assistant": "<h1><h2>T</h2></h1> <td2><td3> {<h1>}"}]})
    with pytest.raises(BadRecord, match=r"malformed box '\{<-1><2><3><4>\}'"):
        parse_generic_record({"conversations": [{"user": "where?", "assistant": "{<-1><2><3><4>}"}]})
    with pytest.raises(UserError, match=r"record 0 cannot be written: box \{<0><0><101><5>\} in "):
        write_generic_jsonl([{"turns": [{"user": "box?", "assistant": "{<0><0><101><5>}"}]}], tmp_path / "o.jsonl")


# --- 2. Flickr: every box of a record ---------------------------------------------------------------------------------

@pytest.mark.parametrize("task,field,text", [
    ("grounded_caption", "grounded_caption", "a <p>dog</p> {<1><2><3><4>}<delim>{<5><6><7>} runs"),
    ("grounded_caption", "grounded_caption", "a <p>dog</p> {<1><2><3><4>} and a <p>cat</p> {<5><6><7><8.5>}"),
    ("caption_to_phrase", "output", "<p>dog</p> {<1><2><3><4>}<delim>{<a><6><7><8>}"),
    ("object_to_phrase", "bbox", "{<1><2><3><4>}<delim>{<5><6><7><8>"),
])
def test_flickr_a_malformed_later_box_makes_the_record_bad(tmp_path, caplog, task, field, text):
    from tinygpt.data.formats.flickr import FlickrGrounding
    make_image(tmp_path / "img" / "1000.jpg")
    good = {"grounded_caption": "a <p>dog</p> {<1><2><3><4>}<delim>{<5><6><7><8>} runs",
            "output": "<p>dog</p> {<1><2><3><4>}<delim>{<5><6><7><8>}",
            "bbox": "{<1><2><3><4>}<delim>{<5><6><7><8>}"}[field]
    extra = {"caption": "a dog", "phrase": "dog"}
    path = write_json(tmp_path / f"{task}.json", [{"image_id": "1000", **extra, field: good},
                                                  {"image_id": "1000", **extra, field: text}])
    with caplog.at_level(logging.WARNING, logger="tinygpt.data"):
        dataset = FlickrGrounding(str(path), str(tmp_path / "img"), task=task, image_size=S, seed=0,
                                  bad_records=LENIENT)
    assert len(dataset) == 1
    [message] = skipped(caplog)
    assert message.startswith(f"{path} record 1: skipped bad record: malformed box ") and f"field {field!r}" in message


# --- 3. unnatural instructions: constraints as a list ---------------------------------------------------------------

def test_unnatural_constraints_list_is_joined_and_other_types_are_bad(tmp_path, caplog):
    from tinygpt.data.formats.unnatural import UnnaturalInstructions

    def entry(constraints):
        return {"instances": [{"instruction_with_input": "Sort: B, A.", "constraints": constraints, "output": "A, B."}]}

    path = write_json(tmp_path / "unnatural.json", [entry(["Use Commas.", " ", "Be brief."]), entry({"a": 1}),
                                                    entry(["ok", 3]), entry(None)])
    with caplog.at_level(logging.WARNING, logger="tinygpt.data"):
        dataset = UnnaturalInstructions(str(path), image_size=S, seed=0, bad_records=LENIENT)
    assert [dataset[i]["turns"][0]["user"] for i in range(len(dataset))] == ["sort b, a use commas be brief",
                                                                             "sort b, a"]
    assert skipped(caplog) == [
        f"{path} record 1: skipped bad record: field 'constraints' must be a string or a list of strings, got dict",
        f"{path} record 2: skipped bad record: field 'constraints' must be a string or a list of strings, got a "
        "list holding a non-string"]
    raw = UnnaturalInstructions(str(path), image_size=S, seed=0, bad_records=LENIENT, process_text=False)
    assert raw[0]["turns"][0]["user"] == "Sort: B, A. Use Commas. Be brief."


# --- 4. LLaVA: id / image of the wrong type -------------------------------------------------------------------------

@pytest.mark.parametrize("field,value,image_name,reason", [
    ("id", ["000000000042"], "COCO_train2014_{id}.jpg", "field 'id' has the wrong type (list)"),
    ("id", None, "COCO_train2014_{id}.jpg", "field 'id' has the wrong type (NoneType)"),
    ("image", ["COCO_train2014_000000000042.jpg"], "{image}", "field 'image' has the wrong type (list)"),
    ("image", " ", "{image}", "field 'image' is empty"),
])
def test_llava_id_or_image_of_the_wrong_type_is_a_bad_record_not_a_missing_file(tmp_path, caplog, field, value,
                                                                                 image_name, reason):
    from tinygpt.data.formats.llava import LlavaDataset
    make_image(tmp_path / "coco" / "COCO_train2014_000000000042.jpg")
    conversations = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A cat."}]
    good = {"id": "000000000042", "image": "COCO_train2014_000000000042.jpg", "conversations": conversations}
    path = write_json(tmp_path / "detail_23k.json", [good, {**good, field: value}])
    with caplog.at_level(logging.WARNING, logger="tinygpt.data"):
        dataset = LlavaDataset(str(path), str(tmp_path / "coco"), image_size=S, seed=0, bad_records=LENIENT,
                               image_name=image_name)
    assert len(dataset) == 1 and dataset[0]["turns"][0]["assistant"] == "A cat."
    assert skipped(caplog) == [f"{path} record 1: skipped bad record: {reason}; the image name pattern "
                               f"{image_name!r} needs " + ("it" if "empty" in reason else "a string or an integer")]


# --- 5. --check: files a loader builds from its root ----------------------------------------------------------------

def _refcocog_config(tmp_path: Path) -> Path:
    (tmp_path / "ann" / "refcocog").mkdir(parents=True)
    (tmp_path / "img").mkdir()
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "model: {}\ndata:\n  datasets:\n    grounding: {kind: refcocog, sample_ratio: 1, batch_size: 2, params: "
        f"{{ann_root: {tmp_path / 'ann'}, image_root: {tmp_path / 'img'}}}}}\n"
        "schedule: {init_lr: 1.0e-4, min_lr: 1.0e-5, total_steps: 10}\n"
        f"run: {{output_dir: {tmp_path / 'out'}}}\n")
    return cfg


def test_train_check_names_a_missing_refs_pickle_and_instances_json(tmp_path, capsys):
    from tinygpt.cli.train import main as train
    cfg = _refcocog_config(tmp_path)
    key = "data.datasets.grounding.params.ann_root"
    folder = tmp_path / "ann" / "refcocog"
    assert train(["--cfg-path", str(cfg), "--check"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {cfg}: {key}: dataset 'grounding' (kind 'refcocog') reads {folder / 'refs(umd).p'}, "
                   "which does not exist"]
    (folder / "refs(umd).p").mkdir()
    assert train(["--cfg-path", str(cfg), "--check"]) == 2
    assert "refs(umd).p, which is not a file" in capsys.readouterr().err
    (folder / "refs(umd).p").rmdir()
    (folder / "refs(umd).p").write_bytes(b"")
    assert train(["--cfg-path", str(cfg), "--check"]) == 2
    assert f"{key}: dataset 'grounding' (kind 'refcocog') reads {folder / 'instances.json'}, which does not exist" \
        in capsys.readouterr().err
    (folder / "instances.json").write_text("{}")
    assert train(["--cfg-path", str(cfg), "--check"]) == 0  # existence only: the empty files are not parsed here
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"{cfg}: ok"  # after where the run starts


def test_run_stage_stops_on_a_missing_refs_pickle_before_the_model_loads(tmp_path, monkeypatch):
    from tinygpt.config import load_config
    from tinygpt.errors import UserError
    from tinygpt.train import stage

    def no_model(*args, **kwargs):
        raise AssertionError("the model must not load")

    monkeypatch.setattr(stage, "build_model", no_model)
    monkeypatch.setattr(stage, "make_accelerator", no_model)
    cfg = load_config(_refcocog_config(tmp_path))
    with pytest.raises(UserError, match=r"params\.ann_root: dataset 'grounding' .*refs\(umd\)\.p, which does not"):
        stage.run_stage(cfg)


@pytest.mark.parametrize("kind,params,make,expected", [
    ("cc_sbu_align", {"root": "."}, ["image/"], ("root", "filter_cap.json", "does not exist")),
    ("cc_sbu_align", {"root": "."}, ["filter_cap.json"], ("root", "image", "does not exist")),
    ("cc_sbu_align", {"root": "."}, ["filter_cap.json", "image"], ("root", "image", "is not a folder")),
    ("refvg", {"root": "."}, ["region_descriptions.json"], ("root", "image_data.json", "does not exist")),
    ("qformer_features", {"root": "."}, [], ("root", "manifest.json", "does not exist")),
    ("refcoco", {"ann_root": ".", "image_root": "."}, ["refcoco/refs(unc).p", "refcoco/instances.json"], None),
    ("refcocop", {"ann_root": ".", "image_root": ".", "split_by": "google"}, ["refcoco+/refs(unc).p"],
     ("ann_root", "refcoco+/refs(google).p", "does not exist")),
    ("generic_jsonl", {"path": "x.jsonl"}, [], None),  # a kind whose files are all params: check_paths' work
])
def test_missing_input_lists_files_built_from_a_root(tmp_path, kind, params, make, expected):
    from tinygpt.data.registry import missing_input
    for name in make:
        target = tmp_path / name.rstrip("/")
        if name.endswith("/"):
            target.mkdir(parents=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text("")
    params = {k: str(tmp_path / v) if k.endswith("root") else v for k, v in params.items()}
    found = missing_input(kind, params)
    assert found == (None if expected is None else (expected[0], tmp_path / expected[1], expected[2]))


def test_a_broken_jsonl_line_names_the_column_where_it_breaks(tmp_path, caplog):
    from tinygpt.data.formats.generic_jsonl import GenericJsonl
    make_image(tmp_path / "a.png")
    good = json.dumps({"images": ["a.png"], "conversations": [{"user": "<image> hi", "assistant": "red"}]})
    broken = '{"images": ["a.png"], "conversations": ['  # cut off after 40 characters
    (tmp_path / "mine.jsonl").write_text(f"{good}\n{broken}\n")
    with caplog.at_level(logging.WARNING, logger="tinygpt.data"):
        GenericJsonl(str(tmp_path / "mine.jsonl"), image_size=S, seed=0, bad_records=LENIENT)
    [message] = skipped(caplog)
    assert message.endswith(f"mine.jsonl:2: skipped bad record: not valid JSON (Expecting value at column "
                            f"{len(broken) + 1})")
