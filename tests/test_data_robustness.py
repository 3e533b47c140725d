"""Bad records are skipped, counted and reported with file and line; too many stop loading; nothing leaves the root."""

import json
import logging
import os
import pickle

import pytest

from test_data_formats import S, make_image, pair, write_json, write_refcoco, write_shard
from tinygpt.data.bad_records import BadRecordPolicy
from tinygpt.data.formats.generic_jsonl import GenericJsonl
from tinygpt.errors import UserError

GOOD = {"images": ["ok.png"], "conversations": [{"user": "<image> what?", "assistant": "a square"}]}


def write_jsonl(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def bad_warnings(caplog):
    return [r.getMessage() for r in caplog.records
            if r.levelno == logging.WARNING and "skipped bad record" in r.getMessage()]


def test_bad_json_line_is_skipped_and_reported_with_file_and_line(tmp_path, caplog):
    make_image(tmp_path / "ok.png")
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, "{not json", GOOD])
    with caplog.at_level(logging.WARNING, logger="tinygpt.data"):
        dataset = GenericJsonl(str(path), image_size=S, seed=0)
    assert len(dataset) == 2
    assert dataset.record_counter.bad == 1 and dataset.record_counter.seen == 3
    [message] = bad_warnings(caplog)
    assert message.startswith(f"{path}:2: skipped bad record: not valid JSON")


@pytest.mark.parametrize("content", [b"", b"not an image at all", None])
def test_missing_or_corrupt_image_is_skipped_lazily_and_next_record_returned(tmp_path, caplog, content):
    make_image(tmp_path / "ok.png")
    if content is not None:
        (tmp_path / "broken.jpg").write_bytes(content)
    broken = {"images": ["broken.jpg"], "conversations": [{"user": "<image>", "assistant": "never"}]}
    path = write_jsonl(tmp_path / "d.jsonl", [broken, GOOD])
    dataset = GenericJsonl(str(path), image_size=S, seed=0)
    assert len(dataset) == 2  # images are decoded lazily
    with caplog.at_level(logging.WARNING, logger="tinygpt.data"):
        sample = dataset[0]
    assert sample["turns"][0]["assistant"] == "a square"  # the (only) good record stands in
    assert dataset.image_counter.bad == 1
    [message] = bad_warnings(caplog)
    assert message.startswith(f"{path}:1: skipped bad record: image broken.jpg")
    assert ("does not exist" in message) == (content is None)
    dataset[0]
    assert dataset.image_counter.bad == 1  # a bad record is remembered, not retried


def test_truncated_image_is_bad(tmp_path):
    make_image(tmp_path / "ok.png")
    make_image(tmp_path / "full.jpg", size=(64, 64))
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    cut = {"images": ["cut.jpg"], "conversations": [{"user": "<image>", "assistant": "never"}]}
    dataset = GenericJsonl(str(write_jsonl(tmp_path / "d.jsonl", [cut, GOOD])), image_size=S, seed=0)
    assert dataset[0]["turns"][0]["assistant"] == "a square" and dataset.image_counter.bad == 1


def test_paths_escaping_the_root_are_refused_at_construction(tmp_path, caplog):
    root = tmp_path / "root"
    make_image(root / "ok.png")
    secret = make_image(tmp_path / "outside.png")  # a valid image that must never be read
    (root / "link.png").symlink_to(secret)
    (root / "sub").mkdir()
    escaping = [str(secret), "../outside.png", "sub/../../outside.png", "link.png", "C:\\outside.png",
                "\\\\host\\x.png"]
    lines = [GOOD] + [{"images": [p], "conversations": [{"user": "<image>", "assistant": "leak"}]} for p in escaping]
    path = write_jsonl(root / "d.jsonl", lines)
    with caplog.at_level(logging.WARNING, logger="tinygpt.data"):
        dataset = GenericJsonl(str(path), image_size=S, seed=0, bad_records=BadRecordPolicy(max_bad_fraction=1.0))
    assert len(dataset) == 1 and dataset.record_counter.bad == len(escaping)
    messages = bad_warnings(caplog)
    assert [m.split(":", 2)[1] for m in messages] == [str(n) for n in range(2, 2 + len(escaping))]
    assert any("absolute" in m for m in messages) and any("'..'" in m for m in messages)
    assert any("resolves outside the dataset root" in m for m in messages)
    assert all(s["turns"][0]["assistant"] == "a square" for s in (dataset[0],))


def test_indexing_resolves_each_folder_once_and_still_refuses_a_linked_folder(tmp_path, monkeypatch, caplog):
    """Indexing N records under a few folders resolves each folder once (the per-record full resolution cost a
    tiny stage 5 ~20 s of its ~30 and a million-image dataset minutes); a folder that is a symlink out of the root is
    still refused at construction, and every record's own file is still checked for being a link."""
    root = tmp_path / "root"
    make_image(root / "ok.png")
    make_image(root / "sub" / "deep" / "ok.png")
    outside = tmp_path / "outside"
    make_image(outside / "x.png")
    (root / "linked").symlink_to(outside)
    (root / "sub" / "deep" / "link.png").symlink_to(outside / "x.png")
    record = {"images": ["sub/deep/ok.png"], "conversations": [{"user": "<image>", "assistant": "a square"}]}
    leaks = [{"images": [p], "conversations": [{"user": "<image>", "assistant": "leak"}]}
             for p in ("linked/x.png", "sub/deep/link.png")]
    path = write_jsonl(root / "d.jsonl", [GOOD, record] * 50 + leaks)
    resolved = []
    real = os.path.realpath
    monkeypatch.setattr(os.path, "realpath", lambda p, *a, **k: resolved.append(p) or real(p, *a, **k))
    with caplog.at_level(logging.WARNING, logger="tinygpt.data"):
        dataset = GenericJsonl(str(path), image_size=S, seed=0, bad_records=BadRecordPolicy(max_bad_fraction=1.0))
    assert len(dataset) == 100 and dataset.record_counter.bad == 2
    assert all("resolves outside the dataset root" in m for m in bad_warnings(caplog))
    assert len(resolved) == 4  # the root, sub/deep, linked and the linked file: not 2 per record (204)
    assert dataset.resolved_dirs == {}  # dropped once indexed: opening an image resolves its whole path again


def test_symlink_planted_after_indexing_is_refused_at_open(tmp_path):
    root = tmp_path / "root"
    make_image(root / "ok.png")
    make_image(root / "later.png")
    secret = make_image(tmp_path / "outside.png")
    later = {"images": ["later.png"], "conversations": [{"user": "<image>", "assistant": "leak"}]}
    dataset = GenericJsonl(str(write_jsonl(root / "d.jsonl", [later, GOOD])), image_size=S, seed=0)
    (root / "later.png").unlink()
    (root / "later.png").symlink_to(secret)
    assert dataset[0]["turns"][0]["assistant"] == "a square" and dataset.image_counter.bad == 1


def test_box_outside_the_image_is_skipped(tmp_path, caplog):
    from tinygpt.data.formats.flickr import FlickrGrounding
    from tinygpt.data.formats.refcoco import RefCOCO
    extra = [{"ref_id": 9, "ann_id": 12, "image_id": 5, "split": "train", "sentences": [{"raw": "x"}]}]
    ann_root, image_root = write_refcoco(tmp_path, bbox=(90, 20, 30, 40), extra_refs=extra)  # x 90..120 > width 100
    with caplog.at_level(logging.WARNING, logger="tinygpt.data"), \
            pytest.raises(UserError, match="2 of 2 records are bad"):
        RefCOCO(ann_root, image_root, image_size=S, seed=0)
    messages = bad_warnings(caplog)
    assert "record 0: skipped bad record: box [90, 20, 30, 40] lies outside the 100x200 image" in messages[0]
    assert "record 2: skipped bad record: ann_id 12 is not in instances.json" in messages[1]

    make_image(tmp_path / "f" / "1.jpg")
    ann = write_json(tmp_path / "phrasetobbox.json", [
        {"image_id": 1, "phrase": "dog", "bbox": "{<1><2><3><4>}"},
        {"image_id": 1, "phrase": "cat", "bbox": "{<50><2><130><4>}"}])
    dataset = FlickrGrounding(str(ann), str(tmp_path / "f"), task="object_to_phrase", image_size=S, seed=0,
                              bad_records=BadRecordPolicy(max_bad_fraction=0.5))
    assert len(dataset) == 1 and dataset.record_counter.bad == 1


def test_placeholder_inside_dataset_text_is_bad(tmp_path):
    from tinygpt.data.formats.llava import LlavaDataset
    make_image(tmp_path / "COCO_train2014_1.jpg")
    make_image(tmp_path / "COCO_train2014_2.jpg")
    def conv(answer):
        return [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": answer}]
    ann = write_json(tmp_path / "a.json", [{"id": "1", "conversations": conv("see <ImageHere>")},
                                           {"id": "2", "conversations": conv("fine")}])
    dataset = LlavaDataset(str(ann), str(tmp_path), image_size=S, seed=0)
    assert dataset[0]["turns"][0]["assistant"] == "fine" and dataset.image_counter.bad == 1


def test_bad_fraction_over_limit_raises_naming_file_and_fraction(tmp_path):
    make_image(tmp_path / "ok.png")
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD] * 25 + ["{bad"] * 5)
    with pytest.raises(UserError) as error:
        GenericJsonl(str(path), image_size=S, seed=0)
    assert str(error.value).startswith(f"{path}: 5 of 30 records are bad (16.7% > limit 1.0%)")
    assert "first: " in str(error.value) and ":26:" in str(error.value)
    dataset = GenericJsonl(str(path), image_size=S, seed=0, bad_records=BadRecordPolicy(max_bad_fraction=0.2))
    assert len(dataset) == 25


def test_all_images_missing_stops_after_min_records(tmp_path):
    lines = [{"images": [f"missing{i}.png"], "conversations": [{"user": "<image>", "assistant": "x"}]}
             for i in range(50)]
    dataset = GenericJsonl(str(write_jsonl(tmp_path / "d.jsonl", lines)), image_size=S, seed=0)
    with pytest.raises(UserError, match=r"20 of 20 images are bad"):
        dataset[0]


def test_warnings_are_capped(tmp_path, caplog):
    make_image(tmp_path / "ok.png")
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD] + ["{bad"] * 30)
    with caplog.at_level(logging.WARNING, logger="tinygpt.data"):
        dataset = GenericJsonl(str(path), image_size=S, seed=0,
                               bad_records=BadRecordPolicy(max_bad_fraction=1.0, max_warnings=5))
    assert dataset.record_counter.bad == 30 and len(bad_warnings(caplog)) == 5
    assert any("further bad records are counted but not shown" in r.getMessage() for r in caplog.records)


def test_malformed_or_missing_annotation_file_is_a_user_error(tmp_path):
    from tinygpt.data.formats.llava import LlavaDataset
    (tmp_path / "a.json").write_text('[{"id": 1,\n "conversations": ]')
    with pytest.raises(UserError, match=r"a.json: not valid JSON at line 2 column"):
        LlavaDataset(str(tmp_path / "a.json"), str(tmp_path), image_size=S, seed=0)
    with pytest.raises(UserError, match=r"nope.json: annotation file does not exist"):
        LlavaDataset(str(tmp_path / "nope.json"), str(tmp_path), image_size=S, seed=0)
    write_json(tmp_path / "b.json", [])
    with pytest.raises(UserError, match="image root of dataset 'llava' is not a directory"):
        LlavaDataset(str(tmp_path / "b.json"), str(tmp_path / "no_dir"), image_size=S, seed=0)


class _Evil:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return os.mkdir, (self.target,)


def test_restricted_unpickler_refuses_globals_and_reduce(tmp_path):
    from tinygpt.data.formats.safe_pickle import load_plain_pickle
    target = tmp_path / "pwned"
    for protocol in (0, 2, 5):
        path = tmp_path / f"refs{protocol}.p"
        path.write_bytes(pickle.dumps([{"ref_id": 1, "payload": _Evil(str(target))}], protocol=protocol))
        with pytest.raises(UserError, match=r"refused global (posix|os|nt)\.mkdir; only plain data"):
            load_plain_pickle(path)
    assert not target.exists()
    plain = {"a": [1, 2.5, "x", None, True, (3, 4), b"raw"], "s": {1, 2}, "f": frozenset({3})}
    for protocol in (0, 2, 5):
        (tmp_path / "plain.p").write_bytes(pickle.dumps(plain, protocol=protocol))
        assert load_plain_pickle(tmp_path / "plain.p") == plain
    (tmp_path / "junk.p").write_bytes(b"\x80\x02junk")
    with pytest.raises(UserError, match="junk.p: not a valid pickle"):
        load_plain_pickle(tmp_path / "junk.p")


def test_refcoco_with_malicious_refs_file_is_refused(tmp_path):
    from tinygpt.data.formats.refcoco import RefCOCO
    ann_root, image_root = write_refcoco(tmp_path)
    refs = tmp_path / "ann" / "refcoco" / "refs(unc).p"
    refs.write_bytes(pickle.dumps([_Evil(str(tmp_path / "pwned"))], protocol=2))
    with pytest.raises(UserError, match=r"refs\(unc\).p: refused global"):
        RefCOCO(ann_root, image_root, image_size=S, seed=0)
    assert not (tmp_path / "pwned").exists()


def test_webdataset_bad_samples_and_truncated_shard(tmp_path, caplog):
    from tinygpt.data.formats.webdataset_pairs import WebDatasetPairs
    good = [pair(f"{i:05d}", f"caption {i}") for i in range(4)]
    corrupt = ("00090", {"jpg": b"garbage", "json": b'{"caption": "x"}'})
    no_json = ("00091", {"jpg": good[0][1]["jpg"]})
    bad_json = ("00092", {"jpg": good[0][1]["jpg"], "json": b"{oops"})
    write_shard(tmp_path / "s0.tar", good[:2] + [corrupt, no_json, bad_json])
    full = write_shard(tmp_path / "s1.tar", good[2:])
    data = full.read_bytes()
    (tmp_path / "s1.tar").write_bytes(data[: 512 + 300])  # header of the first member + part of its data
    with caplog.at_level(logging.WARNING, logger="tinygpt.data"):
        dataset = WebDatasetPairs(str(tmp_path / "s{0,1,7}.tar"), image_size=S, seed=0, resampled=False,
                                  bad_records=BadRecordPolicy(max_bad_fraction=1.0))
        samples = list(dataset)
    assert sorted(s["turns"][0]["assistant"] for s in samples) == ["caption 0", "caption 1"]
    assert dataset.counter.bad == 4
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "1 of 3 shards are missing" in text
    assert f"{tmp_path / 's0.tar'}:00090: skipped bad record: image 00090.jpg cannot be decoded" in text
    assert f"{tmp_path / 's0.tar'}:00091: skipped bad record: no .json member" in text
    assert f"{tmp_path / 's0.tar'}:00092: skipped bad record: the .json member is not valid JSON" in text
    assert f"{tmp_path / 's1.tar'}: skipped bad record: unreadable tar" in text



@pytest.mark.parametrize("cut_in,kept", [("00002.jpg", ["caption 0", "caption 1"]), ("00001.json", ["caption 0"])])
def test_webdataset_truncated_shard_keeps_the_samples_before_the_damage(tmp_path, caplog, cut_in, kept):
    """A shard cut inside a member: the complete samples before it are kept, the group it cuts is dropped, one bad
    record names the shard, and the pass goes on with the next shard."""
    import tarfile

    from tinygpt.data.formats.webdataset_pairs import WebDatasetPairs
    full = write_shard(tmp_path / "s0.tar", [pair(f"{i:05d}", f"caption {i}") for i in range(3)])
    with tarfile.open(full) as tar:
        offset = tar.getmember(cut_in).offset_data
    full.write_bytes(full.read_bytes()[: offset + 5])
    write_shard(tmp_path / "s1.tar", [pair("00009", "caption 9")])
    with caplog.at_level(logging.WARNING, logger="tinygpt.data"):
        dataset = WebDatasetPairs(str(tmp_path / "s{0,1}.tar"), image_size=S, seed=0, resampled=False,
                                  bad_records=BadRecordPolicy(max_bad_fraction=1.0))
        samples = list(dataset)
    assert sorted(s["turns"][0]["assistant"] for s in samples) == kept + ["caption 9"]
    assert dataset.counter.bad == 1
    assert (f"{tmp_path / 's0.tar'}: skipped bad record: unreadable tar after key '{len(kept) - 1:05d}' "
            "(ReadError: unexpected end of data") in caplog.text


def test_webdataset_duplicate_member_keeps_the_first_and_is_counted(tmp_path, caplog):
    import io
    import tarfile

    from tinygpt.data.bad_records import BadRecordCounter
    from tinygpt.data.formats.webdataset_pairs import iter_tar_samples
    with tarfile.open(tmp_path / "s.tar", "w") as tar:
        for name, data in (("0001.jpg", b"first"), ("0001.JPG", b"second"), ("0001.json", b"{}")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    counter = BadRecordCounter("s.tar", BadRecordPolicy(max_bad_fraction=1.0))
    with caplog.at_level(logging.WARNING, logger="tinygpt.data"):
        assert list(iter_tar_samples(tmp_path / "s.tar", counter)) == [("0001", {"jpg": b"first", "json": b"{}"})]
    assert counter.bad == 1
    assert f"{tmp_path / 's.tar'}: skipped bad record: member skipped, the first is kept (0001.JPG: " in caplog.text


def test_webdataset_without_any_shard_is_a_user_error(tmp_path):
    from tinygpt.data.formats.webdataset_pairs import WebDatasetPairs
    with pytest.raises(UserError, match=r"no shard file exists"):
        WebDatasetPairs(str(tmp_path / "{000..003}.tar"), image_size=S, seed=0)
