"""Read image+text classification records, with every bad record reported, none fatal.

Interface (for the integrator)::

    from logitstore.toolkit.classify_records import read_classify_records, load_rgb
    data = read_classify_records("data/train.jsonl", heads={"modality": 5, "location": 12})
    records, problems = data            # also data.heads, data.class_names, data.summary()
    for record in records:              # ClassifyRecord
        image = load_rgb(record.image_path)   # PIL RGB image, or None for a text-only record
        record.text, record.labels["modality"], record.sample_id

Two layouts:

* **JSONL** (a ``.jsonl`` / ``.ndjson`` file): one object per line,
  ``{"id"?: str, "image": path | null, "text": str, "labels": {head: int | class name}}``.
  ``image`` is a local path, relative to the JSONL file's directory (or absolute); null makes
  a text-only record. URLs (``http://``, ``https://``, any ``scheme://``) are refused: nothing
  is downloaded here. ``text`` may be "" (image-only data) but must be present. Blank lines are
  skipped. Labels of heads that are not read are ignored.
* **imagefolder** (a directory, as Hugging Face's ``imagefolder``): ``DIR/<class>/...image``
  labels ONE head (named by ``heads``, or by a one-head ``classes.json``, else ``"label"``);
  class indices follow the class names of ``classes.json`` when it names that head, else the
  sorted subfolder names. Images are the files with an image extension under each class
  folder, at any depth, in sorted order; other files are ignored. Captions are optional: a
  ``DIR/metadata.jsonl`` with lines ``{"file_name": "<class>/<file>", "text": str}``; without
  it every text is "", with it every image needs a caption. Split folders
  (``DIR/train/<class>``) are not recognised: point at ``DIR/train``.

Heads and class names: ``heads`` ({head: number of classes}) picks the heads read. Class names
(for labels given as names) come from ``class_names`` or from a ``classes.json`` beside the
JSONL file / in the imagefolder, ``{"heads": {head: [name, ...]}}`` (what
`logitstore.toolkit.synthetic_classify` writes); where both ``heads`` and names give a head's
size they must agree. Without ``heads``: the heads of classes.json, else (JSONL) the label keys
of the first record, each head sized 1 + its largest integer label in the file.

**sample id**: `logitstore.classifier_sample.classifier_sample_id(image bytes, text)`, the id a
classifier store keeps (sha256 over the image's byte count, its bytes and the text's UTF-8; a
text-only record has 0 image bytes), so the same input gets the same id in any file, order or
layout, and in the store. A record with the id of an earlier one is reported and skipped.

Bad records (bad JSON, not an object, a missing field, a URL, a missing, unreadable or corrupt
image, an unknown label name, a label out of range or of the wrong type, a duplicate) are
skipped and listed in ``problems``, one line each, ``FILE:LINE: reason`` (imagefolder images:
``DIR/<class>/<file>: reason``); every other record is kept. Every image is decoded once here
(PIL, converted to RGB) so a corrupt one is found before any model runs. Only when no usable
record remains, or the layout itself is wrong (missing path, unreadable classes.json, heads
that contradict it), does reading raise `ClassifyDataError`, one paragraph. No augmentation
is applied anywhere: `load_rgb` returns the canonical view.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from logitstore.classifier_sample import classifier_sample_id
from logitstore.errors import LogitStoreError

CLASSES_FILE = "classes.json"
CAPTIONS_FILE = "metadata.jsonl"
JSONL_SUFFIXES = (".jsonl", ".ndjson")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
DEFAULT_HEAD = "label"  # an imagefolder's head when nothing names it
URL_PATTERN = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
REPORTED_IN_ERROR = 5  # problems quoted in the one-paragraph error


class ClassifyDataError(LogitStoreError):
    """Data that cannot be read at all (not one usable record, or a broken layout)."""


class _BadRecord(Exception):
    """One record is unusable; its message is the reason shown after its FILE:LINE."""


@dataclass(frozen=True)
class ClassifyRecord:
    sample_id: str  # classifier_sample_id(image bytes, text): the store's id, hex
    image_path: Path | None  # absolute; None for a text-only record
    text: str
    labels: dict[str, int]  # head -> class index, one per head read
    location: str  # where it came from: "FILE:LINE" or "DIR/<class>/<file>"
    record_id: str | None = None  # the record's own "id" field, when it has one


@dataclass
class ClassifyData:
    """What one read found. Unpacks as ``records, problems = data``."""

    records: list[ClassifyRecord]
    problems: list[str]  # one line per skipped record: "FILE:LINE: reason"
    heads: dict[str, int]  # head -> number of classes
    class_names: dict[str, list[str]] = field(default_factory=dict)  # heads that have names

    def __iter__(self) -> Iterator:
        return iter((self.records, self.problems))

    def summary(self, limit: int = 5) -> str:
        lines = [f"{len(self.records)} usable record(s), {len(self.problems)} skipped; heads "
                 + ", ".join(f"{h} ({n} classes)" for h, n in self.heads.items())]
        lines += [f"  {problem}" for problem in self.problems[:limit]]
        if len(self.problems) > limit:
            lines.append(f"  ... and {len(self.problems) - limit} more")
        return "\n".join(lines)


def sample_id_of(image_bytes: bytes | None, text: str) -> str:
    return classifier_sample_id(image_bytes, text)


def load_rgb(image_path: str | os.PathLike | None):
    """The image as a PIL RGB image (None for a text-only record), fully decoded."""
    if image_path is None:
        return None
    from PIL import Image

    with Image.open(image_path) as image:
        return image.convert("RGB")


def _decoded_bytes(path: Path) -> bytes:
    """The file's bytes after checking that PIL decodes them; raises _BadRecord otherwise."""
    import io

    from PIL import Image

    if not path.is_file():
        raise _BadRecord(f"image {path} not found" if not path.exists()
                         else f"image {path} is not a file")
    try:
        data = path.read_bytes()
        with Image.open(io.BytesIO(data)) as image:
            image.convert("RGB")
    # Any failure to decode user data (PIL raises OSError, ValueError, SyntaxError,
    # DecompressionBombError...) makes this one record unusable, never the read.
    except Exception as exc:
        raise _BadRecord(f"image {path} is unreadable or corrupt ({type(exc).__name__}: "
                         f"{' '.join(str(exc).split())[:200]})") from None
    return data


# ----------------------------------------------------------------------------- heads

def _read_class_names(directory: Path) -> dict[str, list[str]]:
    path = directory / CLASSES_FILE
    if not path.is_file():
        return {}
    try:
        heads = json.loads(path.read_text(encoding="utf-8"))["heads"]
        if not isinstance(heads, dict):
            raise TypeError("'heads' is not an object")
        if not all(isinstance(v, list) and all(isinstance(n, str) for n in v)
                   for v in heads.values()):
            raise TypeError("each head needs a list of class names (strings)")
        names = {str(h): list(v) for h, v in heads.items()}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ClassifyDataError(
            f"cannot read the class names in {path} ({type(exc).__name__}: {exc}): expected "
            '{"heads": {"<head>": ["<class name>", ...]}}. Fix the file, or remove it and '
            "give labels as integers") from None
    return names


def _check_names(names: Mapping[str, Sequence[str]], origin: str) -> dict[str, list[str]]:
    checked = {}
    for head, values in names.items():
        values = list(values)
        if not values or len(set(values)) != len(values):
            raise ClassifyDataError(
                f"head {head!r} in {origin} needs at least one class name and no name twice, "
                f"found {values}: list each class of the head once, in index order")
        checked[head] = values
    return checked


def _resolve_heads(heads: Mapping[str, int] | None, names: dict[str, list[str]],
                   origin: str) -> dict[str, int]:
    """{head: size} from `heads`, checked against the class names; else from the names."""
    if heads is None:
        return {head: len(values) for head, values in names.items()}
    if not heads or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1
                            for n in heads.values()):
        raise ClassifyDataError(
            f"heads must map each head's name to its number of classes (an integer >= 1), got "
            f"{dict(heads)!r}: e.g. heads={{'modality': 5, 'location': 12}}")
    for head, size in heads.items():
        if head in names and len(names[head]) != size:
            raise ClassifyDataError(
                f"head {head!r} has {size} classes in `heads` but {len(names[head])} class "
                f"names in {origin}: make them agree (fix the head's size or the names)")
    return dict(heads)


def _infer_heads(lines: list[str]) -> dict[str, int]:
    """Heads of JSONL data with no names anywhere: the label keys of the first record that
    has labels, each sized 1 + its largest integer label."""
    heads: dict[str, int] = {}
    for line in lines:
        try:
            labels = json.loads(line).get("labels")
        except (ValueError, AttributeError):
            continue
        if not isinstance(labels, dict) or not labels:
            continue
        if not heads:
            heads = {str(head): 0 for head in labels}
        for head, value in labels.items():
            if head in heads and isinstance(value, int) and not isinstance(value, bool):
                heads[head] = max(heads[head], value + 1)
    return {head: size for head, size in heads.items() if size >= 1}


def _label_index(head: str, value, size: int, names: list[str] | None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise _BadRecord(f"label of head {head!r} must be an integer or a class name, "
                         f"got {value!r}")
    if isinstance(value, str):
        if names is None:
            raise _BadRecord(f"label {value!r} of head {head!r} is a name, but the head has no "
                             f"class names ({CLASSES_FILE} or class_names): use its index")
        if value not in names:
            raise _BadRecord(f"unknown label {value!r} for head {head!r} (classes: "
                             f"{', '.join(names[:12])}{', ...' if len(names) > 12 else ''})")
        value = names.index(value)
    if not 0 <= value < size:
        raise _BadRecord(f"label {value} of head {head!r} is out of range [0, {size})")
    return value


# ----------------------------------------------------------------------------- reading

class _Collector:
    """Records and problems of one read; the heads and names every record is checked against."""

    def __init__(self, heads: dict[str, int], names: dict[str, list[str]]):
        self.heads, self.names = heads, names
        self.records: list[ClassifyRecord] = []
        self.problems: list[str] = []
        self.seen: dict[str, str] = {}  # sample id -> location of its first record

    def labels(self, raw) -> dict[str, int]:
        if not isinstance(raw, dict):
            raise _BadRecord(f"'labels' must be an object {{head: label}}, got {raw!r}")
        missing = [head for head in self.heads if head not in raw]
        if missing:
            raise _BadRecord(f"no label for head(s) {', '.join(missing)}")
        return {head: _label_index(head, raw[head], size, self.names.get(head))
                for head, size in self.heads.items()}

    def add(self, location: str, image_path: Path | None, text: str, labels: dict[str, int],
            record_id: str | None) -> None:
        """Decode the image and keep the record, or raise _BadRecord."""
        image_bytes = b"" if image_path is None else _decoded_bytes(image_path)
        sample_id = sample_id_of(image_bytes, text)
        if sample_id in self.seen:
            raise _BadRecord(f"same image and text as {self.seen[sample_id]} (sample id "
                             f"{sample_id[:12]}...)")
        self.seen[sample_id] = location
        self.records.append(ClassifyRecord(sample_id, image_path, text, labels, location,
                                           record_id))

    def result(self, source: str) -> ClassifyData:
        if not self.records:
            found = len(self.problems)
            quoted = "; ".join(self.problems[:REPORTED_IN_ERROR])
            if found > REPORTED_IN_ERROR:
                quoted += f"; and {found - REPORTED_IN_ERROR} more"
            what = f"all {found} record(s) are bad ({quoted})" if found else "it holds no records"
            raise ClassifyDataError(
                f"no usable image+text records in {source}: {what}. Expected JSONL lines "
                '{"image": "<path relative to the file>", "text": "...", "labels": {"<head>": '
                "<index or class name>}} or an imagefolder directory (<class>/<image>); fix the "
                "records listed or point at other data")
        return ClassifyData(self.records, self.problems, self.heads,
                            {h: v for h, v in self.names.items() if h in self.heads})


def _image_path(reference, base_dir: Path) -> Path | None:
    if reference is None:
        return None
    if not isinstance(reference, str) or not reference:
        raise _BadRecord(f"'image' must be a file path (or null), got {reference!r}")
    if URL_PATTERN.match(reference):
        raise _BadRecord(f"image {reference!r} is a URL: records reference local files only "
                         "(nothing is downloaded); download it and give its path relative to "
                         "the JSONL file")
    return (base_dir / reference).resolve()


def _jsonl_record(line: str, base_dir: Path, collector: _Collector, location: str) -> None:
    try:
        obj = json.loads(line)
    except ValueError as exc:
        raise _BadRecord(f"not valid JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise _BadRecord(f"expected a JSON object, got {type(obj).__name__}")
    missing = [key for key in ("image", "text", "labels") if key not in obj]
    if missing:
        raise _BadRecord(f"missing field(s) {', '.join(missing)} (have: {', '.join(sorted(obj))})")
    if not isinstance(obj["text"], str):
        raise _BadRecord(f"'text' must be a string, got {type(obj['text']).__name__}")
    labels = collector.labels(obj["labels"])
    record_id = obj.get("id")
    collector.add(location, _image_path(obj["image"], base_dir), obj["text"], labels,
                  None if record_id is None else str(record_id))


def _read_jsonl(path: Path, heads: Mapping[str, int] | None,
                class_names: dict[str, list[str]]) -> ClassifyData:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise ClassifyDataError(f"{path} is not UTF-8 text ({exc}): a JSONL file holds one "
                                "JSON object per line, encoded as UTF-8") from None
    origin = "class_names" if class_names else str(path.parent / CLASSES_FILE)
    resolved = _resolve_heads(heads, class_names, origin)
    if not resolved:
        resolved = _infer_heads(lines)
    if not resolved:
        raise ClassifyDataError(
            f"no classification heads for {path}: no `heads` given, no {CLASSES_FILE} beside "
            "it, and no record with integer labels to infer them from. Give heads={'<head>': "
            "<number of classes>} or a classes.json")
    collector = _Collector(resolved, class_names)
    base_dir = path.parent.resolve()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        location = f"{path}:{number}"
        try:
            _jsonl_record(line, base_dir, collector, location)
        except _BadRecord as exc:
            collector.problems.append(f"{location}: {exc}")
    return collector.result(str(path))


def _read_captions(path: Path, problems: list[str]) -> dict[str, tuple[str, str]]:
    """{file_name: (text, location)} from an imagefolder's metadata.jsonl; bad lines go to
    `problems`."""
    captions: dict[str, tuple[str, str]] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        location = f"{path}:{number}"
        try:
            obj = json.loads(line)
        except ValueError as exc:
            problems.append(f"{location}: not valid JSON ({exc})")
            continue
        if (not isinstance(obj, dict) or not isinstance(obj.get("file_name"), str)
                or not isinstance(obj.get("text"), str)):
            problems.append(f"{location}: expected {{\"file_name\": \"<class>/<file>\", "
                            f"\"text\": \"...\"}}, got {line.strip()[:120]}")
            continue
        name = Path(obj["file_name"]).as_posix()
        if name in captions:
            problems.append(f"{location}: a second caption for {name} (first at "
                            f"{captions[name][1]})")
            continue
        captions[name] = (obj["text"], location)
    return captions


def _folder_head(heads: Mapping[str, int] | None, names: dict[str, list[str]],
                 root: Path) -> str:
    """The one head an imagefolder labels."""
    candidates = list(heads) if heads is not None else list(names)
    if len(candidates) > 1:
        raise ClassifyDataError(
            f"{root} is an imagefolder directory, whose class subfolders label one head, but "
            f"{'heads' if heads is not None else root / CLASSES_FILE} names "
            f"{len(candidates)} ({', '.join(candidates)}): give one head, or use JSONL "
            "records (labels per head) for several")
    return candidates[0] if candidates else DEFAULT_HEAD


def _read_imagefolder(root: Path, heads: Mapping[str, int] | None,
                      class_names: dict[str, list[str]]) -> ClassifyData:
    head = _folder_head(heads, class_names, root)
    class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not class_dirs:
        raise ClassifyDataError(
            f"{root} has no class subfolders: an imagefolder directory holds one folder per "
            "class (<dir>/<class>/<image>); for JSONL records give the .jsonl file instead")
    given = class_names.get(head)
    names = {head: given or [d.name for d in class_dirs]}
    # Indices from the subfolders of this directory alone: `heads` may be larger (a split
    # without some class), and classes.json keeps indices stable across splits.
    resolved = (_resolve_heads(heads, {head: given} if given else {}, "the class names")
                if heads is not None else {head: len(names[head])})
    collector = _Collector(resolved, names)
    captions_path = root / CAPTIONS_FILE
    captions = (_read_captions(captions_path, collector.problems) if captions_path.is_file()
                else None)
    for class_dir in class_dirs:
        images = sorted(p for p in class_dir.rglob("*")
                        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        for image in images:
            relative = image.relative_to(root).as_posix()
            location = str(root / relative)
            try:
                # The caption is taken first, so a bad image does not leave it reported twice.
                if captions is None:
                    text = ""
                elif relative in captions:
                    text = captions.pop(relative)[0]
                else:
                    raise _BadRecord(f"no caption for it in {captions_path}")
                label = _label_index(head, class_dir.name, collector.heads[head], names[head])
                collector.add(location, image.resolve(), text, {head: label}, relative)
            except _BadRecord as exc:
                collector.problems.append(f"{location}: {exc}")
    for name, (_, location) in (captions or {}).items():
        collector.problems.append(f"{location}: caption for {name}, which is not an image "
                                  "in a class folder")
    return collector.result(str(root))


def read_classify_records(path: str | os.PathLike, heads: Mapping[str, int] | None = None, *,
                          class_names: Mapping[str, Sequence[str]] | None = None) -> ClassifyData:
    """Read a JSONL file or an imagefolder directory (module docstring); bad records are
    skipped and listed in `.problems`, the rest kept in `.records` in file order."""
    if URL_PATTERN.match(os.fspath(path)):
        raise ClassifyDataError(f"{os.fspath(path)} is a URL: classification data is read from "
                                "local files only; download it and give its local path")
    path = Path(path)
    if not path.exists():
        raise ClassifyDataError(f"no classification data at {path}: expected a .jsonl file or "
                                "an imagefolder directory")
    directory = path if path.is_dir() else path.parent
    names = (_check_names(class_names, "class_names") if class_names is not None
             else _check_names(_read_class_names(directory), str(directory / CLASSES_FILE)))
    if path.is_dir():
        return _read_imagefolder(path, heads, names)
    if path.suffix.lower() not in JSONL_SUFFIXES:
        raise ClassifyDataError(
            f"{path} is neither a JSONL file ({', '.join(JSONL_SUFFIXES)}) nor a directory: "
            "give the records' .jsonl file or an imagefolder directory")
    return _read_jsonl(path, heads, names)
