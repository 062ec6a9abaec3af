"""logitstore/toolkit/classify_store_images.py: the one rule that finds a classifier store
sample's image file, shared by student-train and distill-eval --task classify."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from logitstore.errors import LogitStoreError
from logitstore.toolkit.classify_store_images import resolve_store_images, store_image_path


def _arrays(images, sources):
    return SimpleNamespace(images=images, sources=sources,
                           sample_ids=[f"{i:02d}" + "ab" * 10 for i in range(len(images))])


def test_the_rule(tmp_path, monkeypatch):
    (tmp_path / "folder").mkdir()
    jsonl = tmp_path / "data" / "train.jsonl"
    assert store_image_path("images/a.png", str(jsonl)) == tmp_path / "data/images/a.png"
    assert store_image_path("cls/a.png", str(tmp_path / "folder")) == tmp_path / "folder/cls/a.png"
    assert store_image_path("images/a.png", str(jsonl), "/root") == Path("/root/images/a.png")
    assert store_image_path("/abs/a.png", str(jsonl), "/root") == Path("/abs/a.png")
    monkeypatch.chdir(tmp_path)
    assert store_image_path("a.png", "") == tmp_path / "a.png"
    assert store_image_path("", str(jsonl)) is None and store_image_path(None, None) is None


def test_present_images_resolve_and_absent_ones_are_named(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.png").write_bytes(b"x")
    source = str(tmp_path / "train.jsonl")
    arrays = _arrays(["images/a.png"], [source])
    assert resolve_store_images(arrays, needed_by="student") == [tmp_path / "images/a.png"]
    arrays = _arrays(["images/a.png"] + [f"images/m{i}.png" for i in range(6)] + [""],
                     [source] * 8)
    # nothing reads the images: no check
    assert len(resolve_store_images(arrays)) == 8
    with pytest.raises(LogitStoreError) as caught:
        resolve_store_images(arrays, needed_by="student (run/final)", where="store S split 'val'",
                             fix="give --data-root")
    message = str(caught.value)
    assert message.startswith("store S split 'val': 7 of 8 images are missing, e.g. ")
    assert f"{tmp_path / 'images/m0.png'} (sample 01ababababab, from {source})" in message
    assert "and 2 more" in message and "no image (sample 07" not in message  # 5 shown
    assert "The student (run/final) reads every image" in message
    assert "beside each sample's data source" in message and message.endswith("give --data-root")
    with pytest.raises(LogitStoreError, match=r"read from /elsewhere: "):
        resolve_store_images(arrays, data_root="/elsewhere", needed_by="student")
