"""Damaged records the loaders must refuse as bad records rather than load wrongly or crash on: NaN or wrongly typed
boxes and image sizes (RefCOCO, Visual Genome), JSONL lines that are not UTF-8 (a byte-order mark is allowed), texts
holding half of an escaped UTF-16 pair."""

from __future__ import annotations

import pytest


@pytest.mark.parametrize("box,width,height,message", [
    ([float("nan"), 10, 40, 30], 100, 100, "4 finite numbers"),
    ([0, 10, float("inf"), 30], 100, 100, "4 finite numbers"),
    ([0, 10, 40, 30], "100", 100, "width must be a positive number"),
    ([0, 10, 40, 30], 100, float("nan"), "height must be a positive number"),
    ([0, 10, 40, 30], [100], 100, "width must be a positive number"),
])
def test_box_checks_refuse_nan_and_wrongly_typed_sizes(box, width, height, message):
    """A damaged annotation (NaN parses as JSON; a width as a string) is a bad record, not a clamped full-width box
    or a TypeError."""
    from tinygpt.data.bad_records import BadRecord
    from tinygpt.data.formats.refcoco import check_box_xywh
    with pytest.raises(BadRecord, match=message):
        check_box_xywh(box, width, height)
    assert check_box_xywh([0, 10, 40, 30], 100, 100) == (0.0, 10.0, 40.0, 40.0)


def test_jsonl_lines_that_are_not_utf8_are_bad_records_and_a_bom_is_allowed(tmp_path, caplog):
    """A Latin-1 line used to load with U+FFFD in place of its letters, silently; a UTF-8 byte-order mark at the start
    of the file used to make line 1 a bad record."""
    from tinygpt.data.bad_records import BadRecordCounter
    from tinygpt.data.formats.base import iter_jsonl
    path = tmp_path / "mixed.jsonl"
    path.write_bytes('\ufeff{"a": "caf\u00e9"}\n'.encode("utf-8") + '{"a": "caf\u00e9"}\n'.encode("latin-1")
                     + b'{"a": "ok"}\n')
    counter = BadRecordCounter(str(path))
    rows = list(iter_jsonl(path, counter))
    assert [(where.rsplit(":", 1)[1], obj) for where, obj in rows] == [("1", {"a": "caf\u00e9"}), ("3", {"a": "ok"})]
    assert counter.bad == 1 and "not UTF-8 text" in caplog.text


def test_a_text_with_an_unpaired_surrogate_is_a_bad_record_in_every_kind(tmp_path, caplog):
    """JSON may escape half of a UTF-16 pair ("\\ud83d": an emoji cut in two by a scraper). It parses, and used to
    load as a good record; the tokenizer then raised a TypeError inside a training step, with no file or line. Now it
    is a bad record naming where: generic JSONL when indexed, the other kinds (LLaVA here) when the sample is made,
    webdataset captions as read; the JSONL writer refuses it."""
    import io
    import json
    import logging
    import tarfile

    from PIL import Image

    from tinygpt.data.bad_records import BadRecordPolicy
    from tinygpt.data.formats.generic_jsonl import GenericJsonl, write_generic_jsonl
    from tinygpt.data.formats.llava import LlavaDataset
    from tinygpt.data.formats.webdataset_pairs import WebDatasetPairs
    from tinygpt.errors import UserError

    half = '"a cat \\ud83d"'  # as the JSON text holds it
    whole = '"a cat \\ud83d\\udc31"'  # a complete pair: a real emoji, fine
    Image.new("RGB", (20, 20)).save(tmp_path / "1.jpg")
    lenient = BadRecordPolicy(max_bad_fraction=1.0)
    line = '{"images": ["1.jpg"], "conversations": [{"user": "<image> what?", "assistant": %s}]}'
    (tmp_path / "mine.jsonl").write_text("\n".join(line % text for text in (whole, half, whole)) + "\n")
    with caplog.at_level(logging.WARNING, logger="tinygpt.data"):
        generic = GenericJsonl(str(tmp_path / "mine.jsonl"), image_size=14, seed=0, bad_records=lenient)
    assert len(generic) == 2 and generic.record_counter.bad == 1
    assert generic[1]["turns"][0]["assistant"] == "a cat \U0001f431"
    assert (f"{tmp_path / 'mine.jsonl'}:2: skipped bad record: conversations[0].assistant holds an unpaired "
            "surrogate (\\ud83d, half of an escaped UTF-16 pair)") in caplog.text

    records = '[{"id": "1", "conversations": [{"from": "human", "value": "<image>\\nWhat?"}, {"from": "gpt", ' \
              '"value": %s}]}, {"id": "1", "conversations": [{"from": "human", "value": "<image>\\nWhat?"}, ' \
              '{"from": "gpt", "value": %s}]}]'
    (tmp_path / "llava.json").write_text(records % (half, whole))
    Image.new("RGB", (20, 20)).save(tmp_path / "COCO_train2014_1.jpg")
    llava = LlavaDataset(str(tmp_path / "llava.json"), str(tmp_path), image_size=14, seed=0, bad_records=lenient)
    assert llava[0]["turns"][0]["assistant"] == "a cat \U0001f431"  # record 0 is bad: the good one stands in
    assert llava.image_counter.bad == 1
    assert "record 0: skipped bad record: turn 1's assistant text holds an unpaired surrogate" in caplog.text

    jpeg = io.BytesIO()
    Image.new("RGB", (20, 20)).save(jpeg, format="JPEG")
    with tarfile.open(tmp_path / "s0.tar", "w") as tar:
        for key, caption in (("00000", half), ("00001", whole)):
            for extension, data in (("jpg", jpeg.getvalue()), ("json", ('{"caption": %s}' % caption).encode())):
                info = tarfile.TarInfo(f"{key}.{extension}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    pairs = WebDatasetPairs(str(tmp_path / "s0.tar"), image_size=14, seed=0, resampled=False, bad_records=lenient,
                            process_text=False)
    assert [s["turns"][0]["assistant"] for s in pairs] == ["a cat \U0001f431"] and pairs.counter.bad == 1
    assert f"{tmp_path / 's0.tar'}:00000: skipped bad record: turn 1's assistant text holds" in caplog.text

    broken = {"images": [], "turns": [{"user": "hi", "assistant": json.loads(half)}]}
    with pytest.raises(UserError, match=r"record 0 cannot be written: conversations\[0\]\.assistant holds an unpaired"):
        write_generic_jsonl([broken], tmp_path / "out.jsonl")
    assert not (tmp_path / "out.jsonl").exists()


def test_the_feature_cache_holds_each_good_record_once(tiny_vlm, tmp_path, caplog):
    """A record whose image is missing is left out of a feature cache and counted; training stands the next record
    in for it (a batch keeps its size), and the cache writer used to read that way too, storing the next record
    twice for every later stage to train on."""
    import json

    from PIL import Image

    from tinygpt.data.bad_records import BadRecordPolicy
    from tinygpt.data.formats.generic_jsonl import GenericJsonl
    from tinygpt.train.features import write_features

    model = tiny_vlm()
    lines = []
    for i in range(6):
        if i != 2:
            Image.new("RGB", (20, 20), (40 * i, 0, 0)).save(tmp_path / f"{i}.jpg")
        lines.append(json.dumps({"images": [f"{i}.jpg"], "conversations": [
            {"user": "<image> which?", "assistant": f"record {i}"}]}))
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    dataset = GenericJsonl(str(tmp_path / "d.jsonl"), image_size=model.config.image_size, seed=0,
                           bad_records=BadRecordPolicy(max_bad_fraction=1.0))
    stand_in = dataset[2]["turns"][0]["assistant"]  # training: a good record stands in, the same one every time
    assert stand_in in {"record 0", "record 1", "record 3", "record 4", "record 5"}
    assert dataset[2]["turns"][0]["assistant"] == stand_in
    out = write_features(model, dataset, tmp_path / "cache", "mine", None, progress=False)
    cached = [json.loads(line)["turns"][0]["assistant"]
              for line in (out / "samples-00000.jsonl").read_text().splitlines()]
    assert cached == ["record 0", "record 1", "record 3", "record 4", "record 5"]
    assert json.loads((out / "manifest.json").read_text())["samples"] == 5
    assert dataset.image_counter.bad == 1 and "d.jsonl:3: skipped bad record" in caplog.text


def test_an_entry_that_is_no_object_is_named_so_where_an_image_name_is_built():
    """A TextCaps ``data`` entry that is a string used to read "str.format() argument after ** must be a mapping"."""
    from tinygpt.data.bad_records import BadRecord
    from tinygpt.data.formats.base import image_file_name
    with pytest.raises(BadRecord, match=r"^expected a JSON object, got str$"):
        image_file_name("{image_id}.jpg", "0001")
    assert image_file_name("{image_id}.jpg", {"image_id": 7}) == "7.jpg"


def test_bad_records_are_stood_in_for_by_records_spread_over_the_dataset(tmp_path):
    """Training stands a good record in for a bad one so that a batch keeps its size. It used to be the next good
    record, so with every other image missing each good record was read twice per epoch and its neighbours' share
    doubled; the stand-in is now drawn per index (seeded: the same on every read, so resume stays exact)."""
    import collections
    import json

    from PIL import Image

    from tinygpt.data.bad_records import BadRecordPolicy
    from tinygpt.data.formats.generic_jsonl import GenericJsonl

    lines = []
    for i in range(40):
        if i < 20 or i % 2:  # the second half: every even record's image is missing
            Image.new("RGB", (8, 8)).save(tmp_path / f"{i}.png")
        lines.append(json.dumps({"images": [f"{i}.png"], "conversations": [{"user": "<image>", "assistant": f"r{i}"}]}))
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")

    def read_all(seed):
        dataset = GenericJsonl(str(tmp_path / "d.jsonl"), image_size=14, seed=seed,
                               bad_records=BadRecordPolicy(max_bad_fraction=1.0))
        return [dataset[i]["turns"][0]["assistant"] for i in range(40)]

    answers = read_all(0)
    stand_ins = [answers[i] for i in range(20, 40, 2)]
    assert all(answer == f"r{i}" for i, answer in enumerate(answers) if i < 20 or i % 2)
    neighbours = sum(s == f"r{i + 1}" for s, i in zip(stand_ins, range(20, 40, 2)))
    assert neighbours <= 3  # it was 10 of 10: each bad record's next one, read twice per epoch
    assert max(collections.Counter(stand_ins).values()) <= 3
    assert read_all(0) == answers and read_all(1) != answers  # seeded
