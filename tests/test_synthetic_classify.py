"""The synthetic image+text classification set: deterministic bytes, balanced labels, and
labels that need both modalities (exactly, from the generating process, and measured on the
written files by reading shapes and positions out of the pixels and words out of the captions).
"""

from __future__ import annotations

import functools
import json
import re
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from logitstore.toolkit import synthetic_classify as sc
from logitstore.toolkit.synthetic_classify import (
    CUES,
    HEADS,
    SHAPES,
    SIDES,
    SyntheticDataError,
    bayes_accuracy,
    cell_box,
    generate,
    shape_mask,
)


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


def read_split(root: Path, split: str) -> list[dict]:
    return [json.loads(line) for line in (root / f"{split}.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------- determinism

def test_same_seed_same_bytes_and_another_seed_differs(tmp_path):
    generate(tmp_path / "a", samples=60, seed=3, image_size=32)
    generate(tmp_path / "b", samples=60, seed=3, image_size=32)
    generate(tmp_path / "c", samples=60, seed=4, image_size=32)
    a, b, c = (tree_bytes(tmp_path / name) for name in "abc")
    assert len(a) == 60 + 5  # images + 3 splits + classes.json + dataset.json
    assert a == b
    assert a.keys() == c.keys()
    changed = [name for name in a if a[name] != c[name]]
    assert {"train.jsonl", "val.jsonl", "test.jsonl"} <= set(changed)
    assert sum(name.startswith("images/") for name in changed) == 60  # every image differs


def test_layout_records_and_classes(tmp_path):
    info = generate(tmp_path, samples=40, seed=0, image_size=32)
    assert info["splits"] == {"train": 32, "val": 4, "test": 4}
    assert json.loads((tmp_path / "classes.json").read_text()) == {"heads": HEADS}
    assert json.loads((tmp_path / "dataset.json").read_text())["bayes_accuracy"] == \
        bayes_accuracy(0.1)
    ids = set()
    for split, n in info["splits"].items():
        records = read_split(tmp_path, split)
        assert len(records) == n
        for record in records:
            assert list(record) == ["id", "image", "text", "labels"]
            assert record["image"] == f"images/{record['id']}.png"
            assert record["id"].startswith(split + "-")
            with Image.open(tmp_path / record["image"]) as image:
                assert (image.format, image.mode, image.size) == ("PNG", "RGB", (32, 32))
            assert 0 <= record["labels"]["modality"] < 5
            assert 0 <= record["labels"]["location"] < 12
            ids.add(record["id"])
    assert len(ids) == 40


def test_labels_are_balanced_in_every_split(tmp_path):
    generate(tmp_path, samples=300, seed=1, image_size=24)
    for split in ("train", "val", "test"):
        records = read_split(tmp_path, split)
        for head, names in HEADS.items():
            counts = Counter(r["labels"][head] for r in records)
            if len(records) >= len(names):
                assert set(counts) == set(range(len(names))), (split, head)
            assert max(counts.values()) - min(counts.values()) <= 1, (split, head, counts)


@pytest.mark.parametrize("kwargs, expected", [
    ({"samples": 5}, "samples must be at least 10"),
    ({"image_size": 16}, "image_size must be in [24, 256]"),
    ({"ambiguous": 1.0}, "ambiguous must be a probability"),
])
def test_bad_settings_are_refused_before_writing(tmp_path, kwargs, expected):
    with pytest.raises(SyntheticDataError, match=re.escape(expected)):
        generate(tmp_path / "out", **{"samples": 20, **kwargs})
    assert not (tmp_path / "out").exists()


def test_a_non_empty_output_directory_is_refused(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(SyntheticDataError, match="not an empty directory"):
        generate(tmp_path, samples=20)
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_cli_writes_the_set_and_reports_bayes_accuracy(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        sc.main(["--out", str(tmp_path / "d"), "--samples", "20", "--image-size", "24"])
    assert exit_info.value.code == 0
    assert "bayes accuracy modality: chance 0.200, image 0.500, text 0.470, both 0.950" in \
        capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:  # a second run into the same directory
        sc.main(["--out", str(tmp_path / "d"), "--samples", "20"])
    assert exit_info.value.code == 1
    assert "synthetic-classify: error:" in capsys.readouterr().err


# ----------------------------------------------------------------------------- both modalities

def test_bayes_accuracy_from_the_generating_process():
    exact = bayes_accuracy(0.1)
    assert exact["modality"] == pytest.approx(
        {"chance": 0.2, "image": 0.5, "text": 0.9 * 0.5 + 0.1 * 0.2, "both": 0.9 + 0.1 * 0.5})
    assert exact["location"] == pytest.approx(
        {"chance": 1 / 12, "image": 0.5, "text": 0.9 / 6 + 0.1 / 12, "both": 0.9 + 0.1 * 0.5})
    unambiguous = bayes_accuracy(0.0)
    assert unambiguous["modality"]["both"] == unambiguous["location"]["both"] == 1.0
    assert unambiguous["modality"]["text"] == unambiguous["modality"]["image"] == 0.5
    for a in (0.0, 0.1, 0.3):
        for head, figures in bayes_accuracy(a).items():
            assert figures["chance"] < min(figures["image"], figures["text"])
            assert max(figures["image"], figures["text"]) + 0.3 < figures["both"], (a, head)


@functools.cache
def template_centroid(shape: str) -> np.ndarray:
    """(dy, dx) from a shape's centre to its centroid, per unit of radius."""
    fine = np.mgrid[-1.2:1.2:241j, -1.2:1.2:241j]
    return np.array([axis[shape_mask(shape, *fine, 1.0)].mean() for axis in fine])


def detect_shape_and_region(rgb: np.ndarray) -> tuple[int, int]:
    """(shape index, region) read from the pixels alone: the brightest blob over a plane fitted
    to the background around it, matched against each shape's mask at a range of radii."""
    size = rgb.shape[0]
    gray = rgb.astype(np.float64).mean(axis=2)
    half = size // 6  # half a grid cell's height
    box = np.lib.stride_tricks.sliding_window_view(np.pad(gray, 2, mode="edge"), (5, 5))
    peak_y, peak_x = np.unravel_index(box.mean(axis=(2, 3)).argmax(), gray.shape)
    top, left = max(peak_y - half, 0), max(peak_x - half, 0)
    window = gray[top:peak_y + half + 1, left:peak_x + half + 1]
    yy, xx = np.mgrid[0:window.shape[0], 0:window.shape[1]].astype(np.float64)
    ring = np.ones(window.shape, bool)
    ring[2:-2, 2:-2] = False
    design = np.stack([np.ones(ring.sum()), yy[ring], xx[ring]], axis=1)
    plane = np.linalg.lstsq(design, window[ring], rcond=None)[0]
    mask = window - (plane[0] + plane[1] * yy + plane[2] * xx) > 40
    cy, cx = yy[mask].mean(), xx[mask].mean()
    cell_h = size // 3
    best = (-1.0, 0)
    for index, shape in enumerate(SHAPES):
        for radius in np.linspace(0.26, 0.38, 13) * cell_h:
            offset = template_centroid(shape) * radius
            template = shape_mask(shape, yy - cy + offset[0], xx - cx + offset[1], radius)
            iou = (template & mask).sum() / (template | mask).sum()
            best = max(best, (iou, index))
    centre_y, centre_x = top + cy, left + cx
    region = next(r for r in range(6) if cell_box(r, size)[0] <= centre_y < cell_box(r, size)[1]
                  and cell_box(r, size)[2] <= centre_x < cell_box(r, size)[3])
    return best[1], region


def caption_cues(text: str) -> tuple[int | None, int | None]:
    """(protocol word index, side index) read from a caption, None where it names none."""
    words = re.findall(r"[a-z]+", text.lower())
    cue = next((CUES.index(w) for w in words if w in CUES), None)
    side = next((SIDES.index(w) for w in words if w in SIDES), None)
    return cue, side


def lookup_accuracy(train: list, test: list) -> float:
    """Accuracy on `test` of the majority label per feature value seen in `train`
    ((feature, label) pairs); an unseen value predicts the overall majority."""
    by_value: dict = defaultdict(Counter)
    for feature, label in train:
        by_value[feature][label] += 1
    overall = Counter(label for _, label in train).most_common(1)[0][0]
    hits = [(by_value[f].most_common(1)[0][0] if f in by_value else overall) == label
            for f, label in test]
    return float(np.mean(hits))


def test_image_and_caption_each_carry_half_and_both_are_needed(tmp_path):
    generate(tmp_path, samples=1000, seed=0, image_size=48)
    rows = {}
    for split in ("train", "val", "test"):
        rows[split] = []
        for record in read_split(tmp_path, split):
            rgb = np.asarray(Image.open(tmp_path / record["image"]).convert("RGB"))
            shape, region = detect_shape_and_region(rgb)
            cue, side = caption_cues(record["text"])
            rows[split].append((shape, region, cue, side, record["labels"]))
    every = [row for split_rows in rows.values() for row in split_rows]
    # The pixels show what the process put there: the region of the location and one of
    # the modality's two shapes.
    assert np.mean([region == labels["location"] % 6 for _, region, _, _, labels in every]) > 0.99
    assert np.mean([(labels["modality"] - shape) % 5 in (0, 1)
                    for shape, _, _, _, labels in every]) > 0.99
    # Per head, the image factor and the caption factor that matter (the others are drawn
    # independently of that head), alone and together, through a majority-vote lookup table.
    views = {"modality": {"image": lambda r: r[0], "text": lambda r: r[2],
                          "both": lambda r: (r[0], r[2])},
             "location": {"image": lambda r: r[1], "text": lambda r: r[3],
                          "both": lambda r: (r[1], r[3])}}
    held_out = rows["val"] + rows["test"]
    bayes = bayes_accuracy(0.1)
    for head, features in views.items():
        measured = {view: lookup_accuracy([(feature(r), r[4][head]) for r in rows["train"]],
                                          [(feature(r), r[4][head]) for r in held_out])
                    for view, feature in features.items()}
        for view, value in measured.items():  # 200 held-out samples: sd of about 0.035
            assert abs(value - bayes[head][view]) < 0.12, (head, view, measured)
        assert measured["both"] > max(measured["image"], measured["text"]) + 0.3, (head, measured)
