"""A deterministic synthetic image+text classification set whose labels need both modalities.

No medical images can be downloaded here, so this stands in for seed 002's radiology data
(two heads: `modality` and `location`) in tests and in the classifier benchmark.

Interface (for the integrator)::

    from logitstore.toolkit.synthetic_classify import generate, bayes_accuracy, HEADS
    generate(out_dir, samples=3000, seed=0, image_size=48, ambiguous=0.1) -> dict  # dataset.json
    python -m logitstore.toolkit.synthetic_classify --out DIR --samples 3000 --seed 0

Output under DIR (refused when DIR exists and is not empty)::

    images/{split}-{index:06d}.png   RGB PNG, image_size x image_size
    {train,val,test}.jsonl           {"id", "image": "images/...png", "text",
                                      "labels": {"modality": int, "location": int}}
    classes.json                     {"heads": {"modality": [5 names], "location": [12 names]}}
    dataset.json                     the generator's settings, split sizes, bayes_accuracy()

Splits hold 80 / 10 / 10 % of the samples. Within each split both heads are balanced
(class counts differ by at most one), drawn independently of each other. Every byte of the
output is a function of (samples, seed, image_size, ambiguous): same arguments, same bytes
(given the same numpy random streams and Pillow/zlib PNG encoder, which tests check).

The generating process, per sample (`_latents`):

* `modality` m (5 classes) and `location` l = side * 6 + region (12 classes: 2 sides x
  6 regions, a 3 x 2 grid of upper/middle/lower x medial/lateral) are drawn balanced.
* The image shows one shape at the region's cell of the grid, with jittered size and
  position, a random tint, a smooth background texture and pixel noise. The shape is
  `SHAPES[(m - b) % 5]` for a fair coin b: one of two shapes per modality, so a shape
  leaves two modalities possible. The side is never visible (an unmarked crop).
* The caption names the side ("left"/"right") and a protocol word
  `CUES[(m - 2c) % 5]` for a fair coin c: each word also leaves two modalities possible,
  and a shape-word pair leaves exactly one. With probability `ambiguous` (each
  independently) the caption omits the side, or says "standard" instead of the protocol
  word, so even both modalities leave some samples uncertain: a teacher's soft targets then
  carry real information. Other caption words (finding, template) are uninformative.

Bayes-optimal accuracy (`bayes_accuracy(a)`, exact, by enumerating that process), at the
default a = 0.1::

    head       chance   image only           text only                  both
    modality   0.200    0.500                0.9*0.5 + 0.1*0.2 = 0.470  0.9 + 0.1*0.5 = 0.950
    location   0.083    0.500                0.9/6 + 0.1/12 = 0.158     0.9 + 0.1*0.5 = 0.950
"""

from __future__ import annotations

import json
import os
import re
from fractions import Fraction
from itertools import product
from pathlib import Path

import numpy as np

from logitstore.errors import LogitStoreError

MODALITIES = ("radiograph", "ct", "mri", "ultrasound", "nuclear")
SHAPES = ("circle", "square", "triangle", "cross", "diamond")
CUES = ("routine", "focused", "followup", "screening", "staging")  # protocol words
NO_CUE = "standard"  # the protocol word of an ambiguous caption: says nothing
SIDES = ("left", "right")
REGIONS = ("upper medial", "upper lateral", "middle medial", "middle lateral",
           "lower medial", "lower lateral")  # row-major over a 3 x 2 grid
LOCATIONS = tuple(f"{side} {region}" for side in SIDES for region in REGIONS)
HEADS = {"modality": list(MODALITIES), "location": list(LOCATIONS)}
GRID_ROWS, GRID_COLS = 3, 2
SPLITS = (("train", 0.8), ("val", 0.1), ("test", 0.1))
FINDINGS = ("small nodule", "subtle opacity", "focal lesion", "well-defined mass",
            "faint density", "ill-defined focus")
TEMPLATES = (
    "{finding} in the {side} field; {cue} study.",
    "{cue} study of the {side} field: {finding}.",
    "{side} field: {finding} ({cue} protocol).",
    "Findings: {finding}, {side} side. Technique: {cue}.",
)
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 24, 256


class SyntheticDataError(LogitStoreError):
    """Settings the generator cannot honour, or an output directory it will not overwrite."""


# ----------------------------------------------------------------------------- the process

def _latents(rng: np.random.Generator, n: int, ambiguous: float) -> list[dict]:
    """The hidden factors of n samples; both heads balanced (class counts differ by <= 1)."""
    modality = rng.permutation(np.arange(n) % len(MODALITIES))
    location = rng.permutation(np.arange(n) % len(LOCATIONS))
    shape_coin = rng.integers(0, 2, n)
    cue_coin = rng.integers(0, 2, n)
    cue_hidden = rng.random(n) < ambiguous
    side_hidden = rng.random(n) < ambiguous
    out = []
    for i in range(n):
        m, loc = int(modality[i]), int(location[i])
        out.append({
            "modality": m, "location": loc,
            "shape": (m - int(shape_coin[i])) % 5, "region": loc % 6, "side": loc // 6,
            "cue": None if cue_hidden[i] else (m - 2 * int(cue_coin[i])) % 5,
            "side_shown": not side_hidden[i],
        })
    return out


def bayes_accuracy(ambiguous: float = 0.1) -> dict[str, dict[str, float]]:
    """{head: {"chance", "image", "text", "both": accuracy}}: the best any classifier can do
    seeing only the image's information (shape, region), only the caption's (protocol word,
    side) or both, computed exactly by enumerating the generating process."""
    a = Fraction(ambiguous).limit_denominator(10**6)
    joint: dict[str, dict[str, dict]] = {h: {"image": {}, "text": {}, "both": {}} for h in HEADS}
    for m, loc, shape_coin, cue_coin, cue_hidden, side_hidden in product(
            range(5), range(12), (0, 1), (0, 1), (False, True), (False, True)):
        p = Fraction(1, 5 * 12 * 4) * (a if cue_hidden else 1 - a) * (a if side_hidden else 1 - a)
        image = ((m - shape_coin) % 5, loc % 6)
        text = (None if cue_hidden else (m - 2 * cue_coin) % 5, None if side_hidden else loc // 6)
        for head, label in (("modality", m), ("location", loc)):
            for view, seen in (("image", image), ("text", text), ("both", image + text)):
                by_label = joint[head][view].setdefault(seen, {})
                by_label[label] = by_label.get(label, 0) + p
    result = {}
    for head, views in joint.items():
        result[head] = {"chance": 1 / len(HEADS[head])}
        for view, table in views.items():  # the Bayes rule picks the likeliest label
            result[head][view] = float(sum(max(by_label.values()) for by_label in table.values()))
    return result


# ----------------------------------------------------------------------------- rendering

def shape_mask(shape: str, dy: np.ndarray, dx: np.ndarray, radius: float) -> np.ndarray:
    """Pixels of `shape` of `radius` at offsets (dy, dx) from its centre (bool, their shape)."""
    ay, ax = np.abs(dy), np.abs(dx)
    if shape == "circle":
        return dy**2 + dx**2 <= radius**2
    if shape == "square":
        return np.maximum(ay, ax) <= 0.8 * radius
    if shape == "triangle":  # apex up
        return (dy >= -radius) & (dy <= 0.8 * radius) & (ax <= 0.6 * (dy + radius))
    if shape == "cross":
        arm = 0.34 * radius
        return ((ax <= arm) & (ay <= radius)) | ((ay <= arm) & (ax <= radius))
    if shape == "diamond":
        return ay + ax <= 1.15 * radius
    raise ValueError(f"unknown shape {shape!r}: expected one of {SHAPES}")


def cell_box(region: int, size: int) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) pixel bounds of a region's grid cell, bottom/right exclusive."""
    row, col = divmod(region, GRID_COLS)
    return (row * size // GRID_ROWS, (row + 1) * size // GRID_ROWS,
            col * size // GRID_COLS, (col + 1) * size // GRID_COLS)


def render_image(latent: dict, size: int, rng: np.random.Generator) -> np.ndarray:
    """(size, size, 3) uint8 RGB: the latent's shape in its region's cell over a noisy,
    textured background. Nothing in it depends on the side."""
    top, bottom, left, right = cell_box(latent["region"], size)
    cell_h = bottom - top
    radius = rng.uniform(0.28, 0.36) * cell_h
    margin = radius + 1
    cy = rng.uniform(top + margin, bottom - margin)
    cx = rng.uniform(left + margin, right - margin)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    # Smooth background: a few random low-frequency waves, like soft tissue.
    background = rng.uniform(45, 75) + np.zeros((size, size))
    for _ in range(3):
        fy, fx = rng.uniform(0.5, 2.5, 2) * 2 * np.pi / size
        background += rng.uniform(4, 10) * np.sin(fy * yy + fx * xx + rng.uniform(0, 2 * np.pi))
    mask = shape_mask(SHAPES[latent["shape"]], yy - cy, xx - cx, radius)
    gray = background + mask * rng.uniform(80, 120) + rng.normal(0, 8, (size, size))
    tint = rng.uniform(0.85, 1.15, 3)  # uninformative colour cast
    rgb = gray[:, :, None] * tint[None, None, :]  # (size, size, 3)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def render_caption(latent: dict, rng: np.random.Generator) -> str:
    """A short report-style caption: the side (unless hidden) and the protocol word."""
    template = TEMPLATES[int(rng.integers(len(TEMPLATES)))]
    finding = FINDINGS[int(rng.integers(len(FINDINGS)))]
    cue = NO_CUE if latent["cue"] is None else CUES[latent["cue"]]
    side = SIDES[latent["side"]] if latent["side_shown"] else ""
    text = template.format(finding=finding, side=side, cue=cue)
    text = text.replace(", side.", ".")  # template 4 without a side
    text = re.sub(r"\s+", " ", text).strip()
    return text[0].upper() + text[1:]


# ----------------------------------------------------------------------------- writing

def split_sizes(samples: int) -> dict[str, int]:
    """Samples per split: val and test 10 % each (rounded down), train the rest."""
    held_out = {name: int(samples * fraction) for name, fraction in SPLITS[1:]}
    return {"train": samples - sum(held_out.values()), **held_out}


def _check_settings(out_dir: Path, samples: int, image_size: int, ambiguous: float) -> None:
    problems = []
    if samples < 10:
        problems.append(f"samples must be at least 10 (one per split at 10 %), got {samples}")
    if not MIN_IMAGE_SIZE <= image_size <= MAX_IMAGE_SIZE:
        problems.append(f"image_size must be in [{MIN_IMAGE_SIZE}, {MAX_IMAGE_SIZE}] pixels, "
                        f"got {image_size}")
    if not 0 <= ambiguous < 1:
        problems.append(f"ambiguous must be a probability in [0, 1), got {ambiguous}")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        problems.append(f"{out_dir} exists and is not an empty directory; the generator "
                        "writes a fresh one: pick a new --out or remove it")
    if problems:
        raise SyntheticDataError("cannot generate the synthetic classification set: "
                                 + "; ".join(problems))


def _save_png(rgb: np.ndarray, path: Path) -> None:
    from PIL import Image

    # No metadata chunks and a fixed compression level: the bytes depend on the pixels only.
    Image.fromarray(rgb).save(path, format="PNG", compress_level=6, optimize=False)


def _write_split(out_dir: Path, name: str, index: int, n: int, seed: int, image_size: int,
                 ambiguous: float) -> None:
    latents = _latents(np.random.default_rng([seed, index]), n, ambiguous)
    lines = []
    for i, latent in enumerate(latents):
        sample_rng = np.random.default_rng([seed, index, i])  # one stream per sample
        sample_id = f"{name}-{i:06d}"
        image_rel = f"images/{sample_id}.png"
        _save_png(render_image(latent, image_size, sample_rng), out_dir / image_rel)
        record = {"id": sample_id, "image": image_rel, "text": render_caption(latent, sample_rng),
                  "labels": {"modality": latent["modality"], "location": latent["location"]}}
        lines.append(json.dumps(record) + "\n")
    (out_dir / f"{name}.jsonl").write_text("".join(lines), encoding="utf-8")


def generate(out_dir: str | os.PathLike, samples: int = 3000, seed: int = 0,
             image_size: int = 48, ambiguous: float = 0.1) -> dict:
    """Write the set (module docstring) under `out_dir`; returns what dataset.json holds."""
    out_dir = Path(out_dir)
    _check_settings(out_dir, samples, image_size, ambiguous)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    sizes = split_sizes(samples)
    for index, (name, _) in enumerate(SPLITS):
        _write_split(out_dir, name, index, sizes[name], seed, image_size, ambiguous)
    (out_dir / "classes.json").write_text(json.dumps({"heads": HEADS}, indent=1) + "\n",
                                          encoding="utf-8")
    info = {"generator": "logitstore.toolkit.synthetic_classify", "samples": samples, "seed": seed, "image_size": image_size,
            "ambiguous": ambiguous, "splits": sizes, "bayes_accuracy": bayes_accuracy(ambiguous)}
    (out_dir / "dataset.json").write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
    return info


def main(argv: list[str] | None = None) -> None:
    import click

    from logitstore.exit_codes import Command, errors_reported

    @click.command(cls=Command, name="synthetic-classify",
                   help="Write the synthetic image+text classification set (two heads: "
                        "modality and location) whose labels need both image and caption.")
    @click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
                  help="Output directory (must not exist or be empty).")
    @click.option("--samples", default=3000, show_default=True, type=int)
    @click.option("--seed", default=0, show_default=True, type=int)
    @click.option("--image-size", default=48, show_default=True, type=int)
    @click.option("--ambiguous", default=0.1, show_default=True, type=float,
                  help="Probability that a caption omits the side, and (separately) the "
                       "protocol word.")
    def command(out_dir, samples, seed, image_size, ambiguous):
        with errors_reported("synthetic-classify"):
            info = generate(out_dir, samples, seed, image_size, ambiguous)
        click.echo(f"wrote {samples} samples ({info['splits']}) to {out_dir}")
        for head, figures in info["bayes_accuracy"].items():
            click.echo(f"  bayes accuracy {head}: " + ", ".join(
                f"{view} {value:.3f}" for view, value in figures.items()))

    command.main(args=argv, prog_name="python -m logitstore.toolkit.synthetic_classify")


if __name__ == "__main__":
    main()
