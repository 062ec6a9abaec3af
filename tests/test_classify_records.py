"""Reading image+text classification records: the generator's set round trip, every kind of
bad record reported by FILE:LINE with the others kept, the imagefolder layout, and the
one-paragraph errors when nothing usable remains."""

from __future__ import annotations

import hashlib
import struct
import json
import re
import shutil

import numpy as np
import pytest
from PIL import Image

from logitstore.errors import LogitStoreError
from logitstore.toolkit.classify_records import (
    ClassifyDataError,
    load_rgb,
    read_classify_records,
    sample_id_of,
)
from logitstore.toolkit.synthetic_classify import HEADS, generate


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic") / "set"
    generate(root, samples=40, seed=0, image_size=24)
    return root


def write_png(path, value: int = 0, size: int = 8) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.full((size, size, 3), value, np.uint8)
    rgb[0, 0] = (value + 1) % 256
    Image.fromarray(rgb).save(path, format="PNG")
    return path.read_bytes()


def write_jsonl(path, lines: list) -> None:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))


# ----------------------------------------------------------------------------- JSONL

def test_generated_set_round_trip(dataset):
    data = read_classify_records(dataset / "train.jsonl")
    records, problems = data  # unpacks as the pair
    raw = [json.loads(line) for line in (dataset / "train.jsonl").read_text().splitlines()]
    assert problems == [] and len(records) == len(raw) == 32
    assert data.heads == {"modality": 5, "location": 12} and data.class_names == HEADS
    for number, (record, line) in enumerate(zip(records, raw), start=1):
        assert record.record_id == line["id"] and record.text == line["text"]
        assert record.labels == line["labels"]
        assert record.image_path == (dataset / line["image"]).resolve()
        assert record.location == f"{dataset / 'train.jsonl'}:{number}"
        image_bytes = record.image_path.read_bytes()  # FORMAT.md §4.3's id, computed by hand
        digest = hashlib.sha256(struct.pack("<Q", len(image_bytes)) + image_bytes
                                + line["text"].encode("utf-8"))
        assert record.sample_id == digest.hexdigest()
        image = load_rgb(record.image_path)
        assert (image.mode, image.size) == ("RGB", (24, 24))
    assert "32 usable record(s), 0 skipped" in data.summary()


def test_sample_ids_do_not_depend_on_where_the_data_lives(dataset, tmp_path):
    moved = tmp_path / "elsewhere"
    shutil.copytree(dataset, moved)
    before = [r.sample_id for r in read_classify_records(dataset / "val.jsonl").records]
    after = [r.sample_id for r in read_classify_records(moved / "val.jsonl").records]
    assert before == after and len(set(before)) == 4


def test_heads_pick_what_is_read_and_must_agree_with_the_class_names(dataset):
    data = read_classify_records(dataset / "test.jsonl", {"location": 12})
    assert data.heads == {"location": 12} and list(data.class_names) == ["location"]
    assert all(list(r.labels) == ["location"] for r in data.records)
    with pytest.raises(ClassifyDataError, match=r"'modality' has 6 classes in `heads` but 5"):
        read_classify_records(dataset / "test.jsonl", {"modality": 6})
    with pytest.raises(ClassifyDataError, match="number of classes"):
        read_classify_records(dataset / "test.jsonl", {"modality": 0})


def bad_records_file(tmp_path):
    """A JSONL file whose good lines are 1, 21 and 22; every other non-blank line is bad."""
    good = write_png(tmp_path / "img" / "good.png", 10)
    (tmp_path / "img" / "garbage.png").write_bytes(b"this is not an image at all")
    (tmp_path / "img" / "cut.png").write_bytes(good[: len(good) // 2])
    (tmp_path / "img" / "folder.png").mkdir()
    for k in range(3):
        write_png(tmp_path / "img" / f"ok{k}.png", 50 + k)
    ok = {"image": "img/ok0.png", "text": "a", "labels": {"modality": 1, "location": 2}}
    lines = [
        {"id": "first", "image": "img/good.png", "text": "left", "labels": {"modality": 0,
                                                                            "location": 0}},
        '{"image": "img/ok1.png", "text": ',
        "[1, 2]",
        {"image": "img/ok1.png", "labels": {"modality": 0, "location": 0}},
        {**ok, "image": "img/absent.png"},
        {**ok, "image": "img/garbage.png"},
        {**ok, "image": "img/cut.png"},
        {**ok, "labels": {"modality": "xray", "location": 0}},
        {**ok, "labels": {"modality": 0, "location": 12}},
        {**ok, "labels": {"modality": -1, "location": 0}},
        {**ok, "labels": {"modality": True, "location": 0}},
        {**ok, "labels": {"modality": 0}},
        {**ok, "image": "https://example.org/scan.png"},
        {**ok, "labels": [0, 0]},
        {**ok, "text": 7},
        {"id": "again", "image": "img/good.png", "text": "left",
         "labels": {"modality": 3, "location": 3}},
        {**ok, "image": "img/folder.png"},
        {**ok, "image": ""},
        "",
        {**ok, "labels": {"modality": 1.0, "location": 0}},
        {**ok, "image": "img/ok1.png",
         "labels": {"modality": "ct", "location": "right lower lateral"}},
        {"image": None, "text": "text only", "labels": {"modality": 4, "location": 11}},
    ]
    path = tmp_path / "records.jsonl"
    write_jsonl(path, lines)
    (tmp_path / "classes.json").write_text(json.dumps({"heads": HEADS}))
    return path


BAD_LINES = {
    2: r"not valid JSON \(",
    3: r"expected a JSON object, got list",
    4: r"missing field\(s\) text \(have: image, labels\)",
    5: r"image .*img/absent\.png not found",
    6: r"image .*img/garbage\.png is unreadable or corrupt \(UnidentifiedImageError",
    7: r"image .*img/cut\.png is unreadable or corrupt \(",
    8: r"unknown label 'xray' for head 'modality' \(classes: radiograph, ct, mri",
    9: r"label 12 of head 'location' is out of range \[0, 12\)",
    10: r"label -1 of head 'modality' is out of range \[0, 5\)",
    11: r"label of head 'modality' must be an integer or a class name, got True",
    12: r"no label for head\(s\) location",
    13: r"image 'https://example\.org/scan\.png' is a URL: records reference local files only",
    14: r"'labels' must be an object \{head: label\}, got \[0, 0\]",
    15: r"'text' must be a string, got int",
    16: r"same image and text as .*records\.jsonl:1 \(sample id [0-9a-f]{12}\.\.\.\)",
    17: r"image .*img/folder\.png is not a file",
    18: r"'image' must be a file path \(or null\), got ''",
    20: r"label of head 'modality' must be an integer or a class name, got 1\.0",
}


def test_bad_records_are_reported_by_file_and_line_and_the_rest_kept(tmp_path):
    path = bad_records_file(tmp_path)
    records, problems = read_classify_records(path)
    assert len(problems) == len(BAD_LINES)
    for problem, (line, reason) in zip(problems, sorted(BAD_LINES.items())):
        assert problem.startswith(f"{path}:{line}: "), problem
        assert re.search(reason, problem), (problem, reason)
        assert "\n" not in problem
    assert [r.location for r in records] == [f"{path}:{n}" for n in (1, 21, 22)]
    assert records[0].record_id == "first" and records[0].labels == {"modality": 0, "location": 0}
    assert records[1].labels == {"modality": 1, "location": 11}  # class names -> indices
    text_only = records[2]
    assert text_only.image_path is None and load_rgb(text_only.image_path) is None
    assert text_only.sample_id == sample_id_of(b"", "text only")


def test_nothing_usable_is_one_paragraph_error(tmp_path):
    write_jsonl(tmp_path / "bad.jsonl", [
        {"image": f"missing{k}.png", "text": "t", "labels": {"y": 0}} for k in range(7)])
    with pytest.raises(ClassifyDataError) as error:
        read_classify_records(tmp_path / "bad.jsonl", {"y": 2})
    message = str(error.value)
    assert "\n" not in message and isinstance(error.value, LogitStoreError)
    assert "no usable image+text records" in message and "all 7 record(s) are bad" in message
    assert "bad.jsonl:1: image" in message and "and 2 more" in message
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(ClassifyDataError, match="it holds no records"):
        read_classify_records(tmp_path / "empty.jsonl", {"y": 2})


@pytest.mark.parametrize("name, content, expected", [
    ("absent.jsonl", None, "no classification data at"),
    ("data.csv", "image,text\n", "neither a JSONL file"),
    ("latin.jsonl", b"\xff\xfe{}", "is not UTF-8 text"),
    ("nolabels.jsonl", '{"image": null, "text": "t", "labels": {}}\n', "no classification heads"),
])
def test_unreadable_layouts_are_refused(tmp_path, name, content, expected):
    if isinstance(content, str):
        (tmp_path / name).write_text(content)
    elif content is not None:
        (tmp_path / name).write_bytes(content)
    with pytest.raises(ClassifyDataError, match=expected):
        read_classify_records(tmp_path / name)


def test_a_url_as_the_data_is_refused():
    with pytest.raises(ClassifyDataError, match="is a URL: classification data is read from"):
        read_classify_records("https://example.org/train.jsonl")


def test_a_broken_classes_file_is_refused(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", [{"image": None, "text": "t", "labels": {"y": 0}}])
    (tmp_path / "classes.json").write_text('{"heads": {"y": "ab"}}')
    with pytest.raises(ClassifyDataError,
                       match=r"cannot read the class names in .*each head needs a list"):
        read_classify_records(tmp_path / "d.jsonl")
    (tmp_path / "classes.json").write_text('{"heads": {"y": ["a", "a"]}}')
    with pytest.raises(ClassifyDataError, match="no name twice"):
        read_classify_records(tmp_path / "d.jsonl")


def test_heads_are_inferred_from_integer_labels_without_class_names(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", [
        {"image": None, "text": "a", "labels": {"y": 0, "z": 1}},
        {"image": None, "text": "b", "labels": {"y": 3, "z": 0}},
        {"image": None, "text": "c", "labels": {"y": "cat", "z": 0}},
    ])
    data = read_classify_records(tmp_path / "d.jsonl")
    assert data.heads == {"y": 4, "z": 2} and data.class_names == {}
    assert [r.labels for r in data.records] == [{"y": 0, "z": 1}, {"y": 3, "z": 0}]
    assert len(data.problems) == 1 and "d.jsonl:3: label 'cat' of head 'y' is a name" in \
        data.problems[0]
    names = read_classify_records(tmp_path / "d.jsonl",
                                  class_names={"y": ["a", "b", "cat", "d"], "z": ["n", "p"]})
    assert names.problems == [] and names.records[2].labels == {"y": 2, "z": 0}


# ----------------------------------------------------------------------------- imagefolder

def make_folder(root) -> dict[str, bytes]:
    images = {
        "cat/a.png": write_png(root / "cat" / "a.png", 1),
        "cat/b.PNG": write_png(root / "cat" / "b.PNG", 2),
        "dog/c.png": write_png(root / "dog" / "c.png", 3),
        "dog/deep/d.png": write_png(root / "dog" / "deep" / "d.png", 4),
    }
    (root / "dog" / "notes.txt").write_text("not an image, ignored")
    (root / ".cache").mkdir()
    write_png(root / ".cache" / "x.png", 9)  # hidden folder: not a class
    return images


def test_imagefolder_without_captions(tmp_path):
    images = make_folder(tmp_path)
    records, problems = read_classify_records(tmp_path)
    assert problems == []
    assert [(r.record_id, r.labels, r.text) for r in records] == [
        ("cat/a.png", {"label": 0}, ""), ("cat/b.PNG", {"label": 0}, ""),
        ("dog/c.png", {"label": 1}, ""), ("dog/deep/d.png", {"label": 1}, "")]
    assert records[0].sample_id == sample_id_of(images["cat/a.png"], "")
    data = read_classify_records(tmp_path, {"species": 3})  # a larger head: a split lacks a class
    assert data.heads == {"species": 3} and data.records[2].labels == {"species": 1}


def test_imagefolder_with_captions_and_class_names(tmp_path):
    images = make_folder(tmp_path)
    (tmp_path / "fish").mkdir()
    write_png(tmp_path / "fish" / "e.png", 5)
    (tmp_path / "cat" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    write_jsonl(tmp_path / "metadata.jsonl", [
        {"file_name": "cat/a.png", "text": "a cat"},
        {"file_name": "dog/c.png", "text": "a dog"},
        {"file_name": "dog/deep/d.png", "text": "a deep dog"},
        {"file_name": "fish/e.png", "text": "a fish"},
        {"file_name": "cat/broken.png", "text": "broken"},
        "{not json",
        {"file_name": "cat/zzz.png", "text": "gone"},
        {"file_name": "dog/c.png", "text": "again"},
    ])
    (tmp_path / "classes.json").write_text(json.dumps({"heads": {"animal": ["dog", "bird",
                                                                           "cat"]}}))
    data = read_classify_records(tmp_path)
    meta = tmp_path / "metadata.jsonl"
    assert [(r.record_id, r.labels, r.text) for r in data.records] == [
        ("cat/a.png", {"animal": 2}, "a cat"), ("dog/c.png", {"animal": 0}, "a dog"),
        ("dog/deep/d.png", {"animal": 0}, "a deep dog")]
    assert data.records[1].sample_id == sample_id_of(images["dog/c.png"], "a dog")
    expected = [
        (f"{meta}:6: ", "not valid JSON"),
        (f"{meta}:8: ", f"a second caption for dog/c.png (first at {meta}:2)"),
        (f"{tmp_path / 'cat' / 'b.PNG'}: ", f"no caption for it in {meta}"),
        (f"{tmp_path / 'cat' / 'broken.png'}: ", "is unreadable or corrupt"),
        (f"{tmp_path / 'fish' / 'e.png'}: ", "unknown label 'fish' for head 'animal'"),
        (f"{meta}:7: ", "caption for cat/zzz.png, which is not an image in a class folder"),
    ]
    assert len(data.problems) == len(expected)
    for problem, (start, reason) in zip(data.problems, expected):
        assert problem.startswith(start) and reason in problem, (problem, start, reason)


def test_imagefolder_layout_errors(tmp_path):
    with pytest.raises(ClassifyDataError, match="has no class subfolders"):
        read_classify_records(tmp_path)
    make_folder(tmp_path)
    with pytest.raises(ClassifyDataError, match="label one head, but heads names 2"):
        read_classify_records(tmp_path, {"a": 2, "b": 2})
    (tmp_path / "bad" / "x").mkdir(parents=True)
    (tmp_path / "bad" / "x" / "y.png").write_bytes(b"not a png")
    with pytest.raises(ClassifyDataError, match=r"all 1 record\(s\) are bad \(.*y\.png: image"):
        read_classify_records(tmp_path / "bad")
