"""Every loader reads a small sample of its real file format, generated here (tiny PIL images in tmp_path)."""

import io
import json
import pickle
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from tinygpt.data.collate import collate_samples
from tinygpt.data.image import CLIP_MEAN, CLIP_STD, ImageTransform
from tinygpt.data.text import blip_caption, load_prompt_list
from tinygpt.tasks import IMAGE_PLACEHOLDER, IMAGE_TAG, parse_boxes

S = 16  # image size used by the loaders under test


def make_image(path: Path, size=(40, 30), color=(200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def jpeg_bytes(size=(20, 20), color=(0, 128, 255)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="JPEG")
    return buffer.getvalue()


def write_json(path: Path, content) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content))
    return path


def write_shard(path: Path, samples: list) -> Path:
    """img2dataset layout: <key>.jpg, <key>.txt, <key>.json per sample."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for extension, data in members.items():
                info = tarfile.TarInfo(f"{key}.{extension}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def pair(key: str, caption: str, color=(0, 128, 255)):
    return key, {"jpg": jpeg_bytes(color=color), "txt": caption.encode(),
                 "json": json.dumps({"caption": caption}).encode()}


def assert_contract(sample, n_images):
    images = sample["images"]
    assert images.dtype == torch.float32 and tuple(images.shape) == (n_images, 3, S, S)
    assert sample["turns"] and all(set(t) == {"user", "assistant"} for t in sample["turns"])
    assert sum(t["user"].count(IMAGE_PLACEHOLDER) for t in sample["turns"]) == n_images
    assert isinstance(sample["dataset"], str)


# --- shared pieces ------------------------------------------------------------------------------------------------

def test_blip_caption_matches_original_processing():
    assert blip_caption("A Dog: running!  (fast)\n") == "a dog running fast"
    assert blip_caption(" ".join(["w"] * 60)) == " ".join(["w"] * 50)
    assert blip_caption("Hi.", prompt="a photo of ") == "a photo of hi"


def test_alignment_prompts_ship_with_package():
    prompts = load_prompt_list()
    assert prompts[0] == f"{IMAGE_TAG} Describe this image in detail."
    assert len(prompts) == 4


def test_image_transform_is_bicubic_resize_and_clip_normalisation():
    image = Image.new("RGB", (50, 20), (255, 0, 128))
    tensor = ImageTransform(S)(image)
    assert tuple(tensor.shape) == (3, S, S)
    expected = [(v / 255 - m) / s for v, m, s in zip((255, 0, 128), CLIP_MEAN, CLIP_STD)]
    for channel in range(3):
        assert torch.allclose(tensor[channel], torch.full((S, S), expected[channel]), atol=1e-5)


def test_collate_concatenates_images_in_order():
    a = {"images": torch.ones(2, 3, S, S), "turns": [{"user": "x", "assistant": "y"}], "dataset": "a"}
    b = {"images": torch.zeros(0, 3, S, S), "turns": [{"user": "t", "assistant": "u"}], "dataset": "b"}
    c = {"images": torch.full((1, 3, S, S), 5.0), "turns": [{"user": "p", "assistant": "q"}], "dataset": "c"}
    batch = collate_samples([a, b, c])
    assert batch["image_counts"] == [2, 0, 1]
    assert tuple(batch["images"].shape) == (3, 3, S, S) and batch["images"][2].max() == 5.0
    assert batch["dataset"] == ["a", "b", "c"] and batch["turns"][1][0]["user"] == "t"


# --- stage 1/2: webdataset shards -----------------------------------------------------------------------------------

def test_webdataset_pairs_reads_brace_pattern_once_per_epoch(tmp_path):
    from tinygpt.data.formats.webdataset_pairs import WebDatasetPairs
    write_shard(tmp_path / "00000.tar", [pair(f"0000{i}", f"A Cat number {i}!") for i in range(3)])
    write_shard(tmp_path / "00001.tar", [pair(f"0001{i}", f"Dog {i}.") for i in range(2)])
    dataset = WebDatasetPairs(str(tmp_path / "{00000..00001}.tar"), image_size=S, seed=0, resampled=False,
                              shuffle_buffer=4, name="laion")
    samples = list(dataset)
    assert len(samples) == 5
    for sample in samples:
        assert_contract(sample, 1)
        assert sample["turns"][0]["user"] == IMAGE_PLACEHOLDER and sample["dataset"] == "laion"
    assert sorted(s["turns"][0]["assistant"] for s in samples) == [
        "a cat number 0", "a cat number 1", "a cat number 2", "dog 0", "dog 1"]
    again = [s["turns"][0]["assistant"] for s in dataset]
    assert again == [s["turns"][0]["assistant"] for s in samples]  # same seed, same epoch -> same order


def test_webdataset_resampled_is_endless_and_seeded(tmp_path):
    from itertools import islice

    from tinygpt.data.formats.webdataset_pairs import WebDatasetPairs
    write_shard(tmp_path / "a.tar", [pair(f"{i:04d}", f"cap {i}") for i in range(4)])
    def first(seed):
        dataset = WebDatasetPairs(str(tmp_path / "{a,a}.tar"), image_size=S, seed=seed, shuffle_buffer=3)
        return [s["turns"][0]["assistant"] for s in islice(iter(dataset), 12)]
    assert len(first(1)) == 12
    assert first(1) == first(1)



def test_shard_patterns_expand_with_zero_padding_and_refuse_what_they_cannot_expand():
    from tinygpt.data.formats.webdataset_pairs import expand_braces
    from tinygpt.errors import UserError
    assert expand_braces("/d/{000..002}.tar") == ["/d/000.tar", "/d/001.tar", "/d/002.tar"]
    assert expand_braces("a{08..10}b{x,y}") == ["a08bx", "a08by", "a09bx", "a09by", "a10bx", "a10by"]
    assert expand_braces("s{9..11}") == ["s9", "s10", "s11"]
    assert expand_braces("/d/plain.tar") == ["/d/plain.tar"]
    assert expand_braces("/d\\x/{a,b}.tar") == ["/d\\x/a.tar", "/d\\x/b.tar"]  # a backslash stays as it is
    for pattern, group in (("/d/{abc}.tar", "{abc}"), ("/d/{0..2}-{}.tar", "{}")):
        with pytest.raises(UserError, match=f"shard pattern '{pattern}': cannot expand {group}") as raised:
            expand_braces(pattern)
        assert "use {000..123} or {a,b}" in str(raised.value)
    with pytest.raises(UserError, match=r"shard pattern '/d/\{000\.\.002\.tar': unbalanced braces"):
        expand_braces("/d/{000..002.tar")


def test_tar_members_group_by_key_with_folders_lower_case_extensions_and_are_streamed(tmp_path, monkeypatch):
    """Directories, names without a dot or starting with one are skipped; a key keeps its folders; the tar is read
    as a stream (mode r|*), never opened for random access."""
    from tinygpt.data.bad_records import BadRecordCounter
    from tinygpt.data.formats.webdataset_pairs import iter_tar_samples
    with tarfile.open(tmp_path / "s.tar", "w") as tar:
        info = tarfile.TarInfo("a.b")
        info.type = tarfile.DIRTYPE
        tar.addfile(info)
        for name in ("a.b/0001.JPG", "a.b/0001.Json", "README", ".hidden.jpg", "x/.seen.jpg", "a.b/c",
                     "0002.tar.gz", "0003.jpg", "0004.jpg", "0003.json"):
            info = tarfile.TarInfo(name)
            info.size = len(name)
            tar.addfile(info, io.BytesIO(name.encode()))
    modes = []
    real_open = tarfile.open
    monkeypatch.setattr(tarfile, "open", lambda *args, **kwargs: modes.append(kwargs.get("mode")) or real_open(
        *args, **kwargs))
    counter = BadRecordCounter("s.tar")
    samples = list(iter_tar_samples(tmp_path / "s.tar", counter))
    assert samples == [("a.b/0001", {"jpg": b"a.b/0001.JPG", "json": b"a.b/0001.Json"}),
                       ("0002", {"tar.gz": b"0002.tar.gz"}), ("0003", {"jpg": b"0003.jpg"}),
                       ("0004", {"jpg": b"0004.jpg"}), ("0003", {"json": b"0003.json"})]  # a key split up: twice
    assert modes == ["r|*"] and counter.bad == 0


# --- stage 3: cc_sbu_align ------------------------------------------------------------------------------------------

def test_cc_sbu_align(tmp_path):
    from tinygpt.data.formats.cc_sbu_align import CCSBUAlign
    for image_id in ("2", "7"):
        make_image(tmp_path / "image" / f"{image_id}.jpg")
    write_json(tmp_path / "filter_cap.json", {"annotations": [
        {"image_id": "2", "caption": "The image shows a Red square."},
        {"image_id": "7", "caption": "Another image."}]})
    dataset = CCSBUAlign(str(tmp_path), image_size=S, seed=0)
    assert len(dataset) == 2
    sample = dataset[0]
    assert_contract(sample, 1)
    assert sample["turns"][0]["user"] in load_prompt_list()
    assert sample["turns"][0]["assistant"] == "The image shows a Red square."  # raw, no processing
    assert sample["dataset"] == "cc_sbu_align"


# --- stage 4: LLaVA ------------------------------------------------------------------------------------------------

LLAVA_RECORD = {"id": "000000000042", "conversations": [
    {"from": "human", "value": "<image>\nWhat Is the man doing?"},
    {"from": "gpt", "value": "He is Riding a horse."},
    {"from": "human", "value": "Why?"},
    {"from": "gpt", "value": "To travel."}]}


def test_llava_detail_single_turn(tmp_path):
    from tinygpt.data.formats.llava import LlavaDataset
    make_image(tmp_path / "coco" / "COCO_train2014_000000000042.jpg")
    ann = write_json(tmp_path / "detail_23k.json", [LLAVA_RECORD])
    sample = LlavaDataset(str(ann), str(tmp_path / "coco"), image_size=S, seed=0, name="llava_detail")[0]
    assert_contract(sample, 1)
    assert sample["turns"] == [{"user": f"{IMAGE_TAG} what is the man doing? ", "assistant": "He is Riding a horse."}]


def test_llava_conversation_multi_turn(tmp_path):
    from tinygpt.data.formats.llava import LlavaDataset
    make_image(tmp_path / "coco" / "COCO_train2014_000000000042.jpg")
    ann = write_json(tmp_path / "conversation_58k.json", [LLAVA_RECORD])
    sample = LlavaDataset(str(ann), str(tmp_path / "coco"), image_size=S, seed=0, multi_turn=True)[0]
    assert_contract(sample, 1)
    assert sample["turns"] == [
        {"user": f"{IMAGE_TAG} What Is the man doing? ", "assistant": "He is Riding a horse."},
        {"user": "Why? ", "assistant": "To travel."}]


# --- stage 4: RefCOCO family ---------------------------------------------------------------------------------------

def write_refcoco(root: Path, dataset="refcoco", split_by="unc", bbox=(10, 20, 30, 40), extra_refs=()):
    images = root / "coco"
    make_image(images / "COCO_train2014_000000000005.jpg", size=(100, 200))
    refs = [{"ref_id": 1, "ann_id": 11, "image_id": 5, "split": "train", "category_id": 1,
             "sentences": [{"raw": "The Left Man", "sent": "the left man", "tokens": [], "sent_id": 3}]},
            {"ref_id": 2, "ann_id": 11, "image_id": 5, "split": "val", "category_id": 1,
             "sentences": [{"raw": "val only", "sent": "val only", "tokens": [], "sent_id": 4}]}, *extra_refs]
    folder = root / "ann" / dataset
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"refs({split_by}).p").write_bytes(pickle.dumps(refs, protocol=2))
    write_json(folder / "instances.json", {
        "images": [{"id": 5, "width": 100, "height": 200, "file_name": "COCO_train2014_000000000005.jpg"}],
        "annotations": [{"id": 11, "image_id": 5, "bbox": list(bbox), "category_id": 1}],
        "categories": [{"id": 1, "name": "person"}]})
    return str(root / "ann"), str(images)


@pytest.mark.parametrize("dataset,split_by", [("refcoco", "unc"), ("refcoco+", "unc"), ("refcocog", "umd")])
def test_refcoco_refer_uses_train_split_and_box_text(tmp_path, dataset, split_by):
    from tinygpt.data.formats.refcoco import RefCOCO
    ann_root, image_root = write_refcoco(tmp_path, dataset, split_by)
    loaded = RefCOCO(ann_root, image_root, image_size=S, seed=0, dataset=dataset)
    assert len(loaded) == 1  # the val ref is not used
    sample = loaded[0]
    assert_contract(sample, 1)
    turn = sample["turns"][0]
    assert turn["assistant"] == "{<10><10><40><30>}"  # x 10..40 of 100, y 20..60 of 200
    assert turn["user"].startswith(f"{IMAGE_TAG} [refer] ") and "the left man" in turn["user"]
    assert turn["user"].endswith(" ")


def test_inverse_refcoco_identify(tmp_path):
    from tinygpt.data.formats.refcoco import RefCOCO
    ann_root, image_root = write_refcoco(tmp_path)
    turn = RefCOCO(ann_root, image_root, image_size=S, seed=0, inverse=True)[0]["turns"][0]
    assert turn["user"].startswith(f"{IMAGE_TAG} [identify] ") and "{<10><10><40><30>}" in turn["user"]
    assert turn["assistant"] == "the left man"
    assert parse_boxes(turn["user"]) == [(None, (10, 10, 40, 30))]


# --- stage 4: Visual Genome, Flickr, captions, VQA, unnatural ----------------------------------------------------

def test_visual_genome_refer_keeps_small_regions_only(tmp_path):
    from tinygpt.data.formats.visual_genome import VisualGenomeRefer
    make_image(tmp_path / "VG_100K_2" / "1.jpg", size=(200, 100))
    write_json(tmp_path / "image_data.json", [
        {"image_id": 1, "url": "https://cs.stanford.edu/people/rak248/VG_100K_2/1.jpg", "width": 200, "height": 100}])
    write_json(tmp_path / "region_descriptions.json", [{"id": 1, "regions": [
        {"region_id": 10, "image_id": 1, "phrase": "A Red Ball", "x": 20, "y": 10, "width": 40, "height": 50},
        {"region_id": 11, "image_id": 1, "phrase": "the whole picture", "x": 0, "y": 0, "width": 200, "height": 99}]}])
    dataset = VisualGenomeRefer(str(tmp_path), image_size=S, seed=0)
    assert len(dataset) == 1  # 200*99 >= 16384 is left out
    sample = dataset[0]
    assert_contract(sample, 1)
    assert sample["turns"][0]["assistant"] == "{<10><10><30><60>}"
    assert "a red ball" in sample["turns"][0]["user"] and "[refer]" in sample["turns"][0]["user"]


def test_flickr_three_tasks(tmp_path):
    from tinygpt.data.formats.flickr import FlickrGrounding
    make_image(tmp_path / "flickr" / "1000.jpg")
    grounded = write_json(tmp_path / "groundedcaption.json", [
        {"image_id": "1000", "grounded_caption": "a <p>dog</p> {<1><2><3><4>}<delim>{<5><6><7><8>} runs"}])
    caption = write_json(tmp_path / "captiontobbox.json", [
        {"image_id": "1000", "caption": "a dog runs", "output": "<p>dog</p> {<1><2><3><4>}"}])
    phrase = write_json(tmp_path / "phrasetobbox.json", [{"image_id": 1000, "phrase": "dog", "bbox": "{<1><2><3><4>}"}])
    root = str(tmp_path / "flickr")
    turn = FlickrGrounding(str(grounded), root, task="grounded_caption", image_size=S, seed=0)[0]["turns"][0]
    assert turn["user"].startswith(f"{IMAGE_TAG} [grounding] ") and turn["assistant"].startswith("a <p>dog</p>")
    turn = FlickrGrounding(str(caption), root, task="caption_to_phrase", image_size=S, seed=0)[0]["turns"][0]
    assert turn == {"user": f"{IMAGE_TAG} [detection] a dog runs ", "assistant": "<p>dog</p> {<1><2><3><4>}"}
    sample = FlickrGrounding(str(phrase), root, task="object_to_phrase", image_size=S, seed=0)[0]
    assert_contract(sample, 1)
    assert sample["turns"][0] == {"user": f"{IMAGE_TAG} [detection] dog ", "assistant": "<p>dog</p> {<1><2><3><4>}"}
    assert sample["dataset"] == "flickr_object_to_phrase"


def test_textcaps_and_coco_caption(tmp_path):
    from tinygpt.data.formats.captions import COCOCaption, TextCaps
    from tinygpt.tasks import CAPTION_PROMPTS
    make_image(tmp_path / "img" / "abc.jpg")
    make_image(tmp_path / "img" / "COCO_train2014_000000000009.jpg")
    textcaps = write_json(tmp_path / "TextCaps_0.1_train.json",
                          {"data": [{"image_id": "abc", "caption_str": "A Sign."}]})
    coco = write_json(tmp_path / "coco_karpathy_train.json", [
        {"image": "train2014/COCO_train2014_000000000009.jpg", "caption": "Two Cats.", "image_id": "coco_9"},
        {"image": "val2014/COCO_val2014_000000000001.jpg", "caption": "not train", "image_id": "coco_1"}])
    sample = TextCaps(str(textcaps), str(tmp_path / "img"), image_size=S, seed=0)[0]
    assert_contract(sample, 1)
    assert sample["turns"][0]["assistant"] == "a sign"
    assert sample["turns"][0]["user"] in [f"{IMAGE_TAG} {p} " for p in CAPTION_PROMPTS]
    dataset = COCOCaption(str(coco), str(tmp_path / "img"), image_size=S, seed=0)
    assert len(dataset) == 1 and dataset[0]["turns"][0]["assistant"] == "two cats"


def test_vqa_answer_sampled_by_frequency_and_seeded(tmp_path):
    from tinygpt.data.formats.vqa import VQADataset
    make_image(tmp_path / "coco" / "COCO_train2014_000000000001.jpg")
    answers = ["Yes"] * 9 + ["no"]
    ann = write_json(tmp_path / "vqa_train.json", [
        {"question_id": 1, "question": "Is it Red?", "answer": answers,
         "image": "train2014/COCO_train2014_000000000001.jpg"},
        {"question_id": 2, "question": "Gone?", "answer": ["x"], "image": "train2014/COCO_train2014_000000000404.jpg"}])
    dataset = VQADataset([str(ann)], str(tmp_path / "coco"), variant="coco_vqa", image_size=S, seed=3)
    assert len(dataset) == 1  # the question with a missing image is dropped, as the original
    drawn = []
    for epoch in range(200):
        dataset.set_epoch(epoch)
        turn = dataset[0]["turns"][0]
        long_form = "Based on the image, respond to this question with a short answer: is it red? "
        assert turn["user"] in (f"{IMAGE_TAG} [vqa] is it red? ", f"{IMAGE_TAG} [vqa] {long_form}")
        drawn.append(turn["assistant"])
    assert set(drawn) == {"yes", "no"} and 0.8 < drawn.count("yes") / len(drawn) < 0.97
    dataset.set_epoch(5)
    first = dataset[0]["turns"]
    assert dataset[0]["turns"] == first  # same (seed, epoch, index) -> same draw


def test_aok_vqa_and_gqa(tmp_path):
    from tinygpt.data.formats.vqa import VQADataset
    make_image(tmp_path / "img" / "000000000007.jpg")
    make_image(tmp_path / "img" / "n1.jpg")
    aok = write_json(tmp_path / "aokvqa_v1p0_train.json", [{"question_id": "q", "question": "What?",
                     "direct_answers": ["tree"] * 10, "choices": ["a", "tree"], "image": "train2017/000000000007.jpg"}])
    gqa = write_json(tmp_path / "train_balanced_questions.json",
                     [{"image": "n1.jpg", "question": "Color?", "answer": "Blue"}])
    turn = VQADataset(str(aok), str(tmp_path / "img"), variant="aok_vqa", image_size=S, seed=0)[0]["turns"][0]
    assert turn["assistant"] == "tree"
    sample = VQADataset(str(gqa), str(tmp_path / "img"), variant="gqa", image_size=S, seed=0)[0]
    assert_contract(sample, 1)
    assert sample["turns"][0]["assistant"] == "blue" and sample["dataset"] == "gqa"


@pytest.mark.parametrize("as_jsonl", [False, True])
def test_unnatural_instructions_text_only(tmp_path, as_jsonl):
    from tinygpt.data.formats.unnatural import UnnaturalInstructions
    entry = {"instances": [{"instruction_with_input": "Sort: B, A.", "constraints": "Use Commas.", "output": "A, B."}]}
    path = tmp_path / "unnatural.json"
    path.write_text(json.dumps(entry) + "\n" if as_jsonl else json.dumps([entry]))
    sample = UnnaturalInstructions(str(path), image_size=S, seed=0)[0]
    assert_contract(sample, 0)
    assert sample["turns"] == [{"user": "sort b, a use commas", "assistant": "a, b"}]  # ":" and "." stripped


# --- generic JSONL -------------------------------------------------------------------------------------------------

def test_generic_jsonl_round_trips_multi_image_multi_turn(tmp_path):
    from tinygpt.data.formats.generic_jsonl import GenericJsonl, write_generic_jsonl
    make_image(tmp_path / "pics" / "a.png", color=(255, 0, 0))
    make_image(tmp_path / "pics" / "b.png", color=(0, 0, 255))
    record = {"images": ["pics/a.png", "pics/b.png"], "turns": [
        {"user": f"Compare {IMAGE_TAG} with {IMAGE_TAG}.", "assistant": "The first is red."},
        {"user": "And the second?", "assistant": "Blue."}]}
    text_only = {"images": [], "turns": [{"user": "Say hi", "assistant": "hi"}]}
    path = tmp_path / "mine.jsonl"
    assert write_generic_jsonl([record, text_only], path) == 2
    first_line = json.loads(path.read_text().splitlines()[0])
    assert first_line["conversations"][0]["user"] == "Compare <image> with <image>."
    dataset = GenericJsonl(str(path), image_size=S, seed=0)
    sample = dataset[0]
    assert_contract(sample, 2)
    assert sample["turns"] == record["turns"] and sample["dataset"] == "mine"
    assert sample["images"][0, 0].mean() > sample["images"][1, 0].mean()  # red first, then blue: order kept
    assert_contract(dataset[1], 0)
    assert dataset[1]["turns"] == text_only["turns"]


def test_generic_jsonl_writer_refuses_mismatched_markers(tmp_path):
    from tinygpt.data.formats.generic_jsonl import write_generic_jsonl
    from tinygpt.errors import UserError
    with pytest.raises(UserError, match="record 0 .*1 <image> markers in user texts but 2 images"):
        write_generic_jsonl([{"images": ["a.png", "b.png"], "turns": [{"user": "<image>", "assistant": "x"}]}],
                            tmp_path / "bad.jsonl")
    assert not (tmp_path / "bad.jsonl").exists()


# --- registry ------------------------------------------------------------------------------------------------------

def test_registry_builds_kinds_and_names_them(tmp_path):
    from tinygpt.data.registry import KINDS, build_dataset
    ann_root, image_root = write_refcoco(tmp_path, "refcocog", "umd")
    dataset = build_dataset("invrefcocog", image_size=S, seed=0, ann_root=ann_root, image_root=image_root)
    assert dataset[0]["dataset"] == "invrefcocog" and "[identify]" in dataset[0]["turns"][0]["user"]
    assert len(KINDS) == 25


@pytest.mark.parametrize("kind,params,message", [
    ("refcocoo", {}, "unknown dataset kind 'refcocoo'; did you mean 'refcoco'"),
    ("refcoco", {"ann_rot": "x", "image_root": "y"}, "unknown param 'ann_rot'; did you mean 'ann_root'"),
    ("refcoco", {"image_root": "y"}, "missing param 'ann_root'"),
    ("coco_vqa", {"ann_paths": ["a"], "image_root": "b", "process_text": "yes"},
     "'process_text' must be true or false"),
    ("gqa", {"ann_paths": ["a"], "image_root": "b", "skip_missing_images": "false"},  # a quoted false: was truthy
     "'skip_missing_images' must be true or false, got 'false'"),
    ("webdataset_pairs", {"shards": 5}, "'shards' must be a string or a non-empty list of strings, got 5"),
    ("coco_vqa", {"ann_paths": 5, "image_root": "b"}, "'ann_paths' must be a string or a non-empty list"),
    ("coco_vqa", {"ann_paths": ["a", 3], "image_root": "b"}, "'ann_paths' must be a string or a non-empty list"),
    ("refcoco", {"ann_root": "a", "image_root": 7}, "'image_root' must be a string, got 7"),
    ("llava_detail", {"ann_path": ["x"], "image_root": "y"}, "'ann_path' must be a string"),
])
def test_registry_errors_name_the_problem(kind, params, message):
    from tinygpt.data.registry import build_dataset
    from tinygpt.errors import UserError
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace("[", r"\[")):
        build_dataset(kind, image_size=S, seed=0, **params)


def test_registry_accepts_bad_records_mapping(tmp_path):
    from tinygpt.data.registry import build_dataset
    from tinygpt.errors import UserError
    make_image(tmp_path / "image" / "1.jpg")
    write_json(tmp_path / "filter_cap.json", {"annotations": [{"image_id": "1", "caption": "c"}]})
    build_dataset("cc_sbu_align", image_size=S, seed=0, root=str(tmp_path), bad_records={"max_bad_fraction": 0.5})
    with pytest.raises(UserError, match="unknown field 'max_bad_fractoin'; did you mean 'max_bad_fraction'"):
        build_dataset("cc_sbu_align", image_size=S, seed=0, root=str(tmp_path), bad_records={"max_bad_fractoin": 1})

