"""Segment commit records and part heads (format 2.0): the committed state of each part.

A part's writer commits a segment by writing, after the segment's files:

1. its record `parts/<part>/records/<segment>.json`: the segment's files with size and
   sha256, its counts, and `previous`, the sha256 of the bytes of the part's previous record
   (null for the first), so the records of a part form a hash chain;
2. the part's head `parts/<part>/head.json`, replaced atomically: the number of committed
   segments, the sha256 of the last record's bytes, running totals, the part's settings and
   whether it is complete. Writing the head is the commit.

Both are sealed JSON (FORMAT.md section 5) of a size independent of the store's, and only
the part's own writer writes them, so writers of different parts never write the same
file. A signal added later (`SignalAppender`) writes, per segment, an addition record
`parts/<part>/records/<segment>+<signal>.json` listing the signal's new files.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

from logitstore import __version__
from logitstore.commit import now_iso, parse_manifest, sealed_json
from logitstore.errors import ChecksumError, MissingFileError
from logitstore.format import (FORMAT_VERSION, PART_HEAD, PARTS_DIR, RECORDS_DIR, TMP_MARK,
                               segment_name, written_version)
from logitstore.fs import StoreFS, sha256_hex

HEAD_FORMAT = "logitstore-part-head"
RECORD_FORMAT = "logitstore-segment"
ADDITION_FORMAT = "logitstore-signal-addition"
# Keys a record shares with the segment entries of catalogs and of the committed view.
SEGMENT_KEYS = ("samples", "tokens", "target_tokens", "sampled_entries", "sampled_multi",
                "signals")


def head_path(part: str) -> str:
    return f"{PARTS_DIR}/{part}/{PART_HEAD}"


def record_path(part: str, segment: str) -> str:
    return f"{PARTS_DIR}/{part}/{RECORDS_DIR}/{segment}.json"


def addition_path(part: str, segment: str, signal: str) -> str:
    return f"{PARTS_DIR}/{part}/{RECORDS_DIR}/{segment}+{signal}.json"


@dataclass
class Sealed:
    """A sealed JSON document (head or record) as read: its path, bytes and content."""

    rel: str
    raw: bytes
    doc: dict[str, Any]

    @property
    def sha(self) -> str:
        return sha256_hex(self.raw)


def missing(fs: StoreFS, rel: str, what: str) -> MissingFileError:
    """The error for a file the committed state lists that is absent (one paragraph)."""
    return MissingFileError(
        f"{fs.url_of(rel)} is missing: it is {what}, listed by the committed state of the "
        f"store, so the store is damaged. Restore the file from a good copy of the store "
        f"(`logitstore cp`), or run `logitstore verify {fs.url}` to list every damaged file",
        path=rel)


def read_sealed(fs: StoreFS, rel: str, what: str) -> Sealed:
    """The sealed document at `rel` (seal and version checked); MissingFileError when absent."""
    try:
        raw = fs.read_bytes(rel)
    except FileNotFoundError:
        raise missing(fs, rel, what) from None
    return Sealed(rel, raw, parse_manifest(fs, rel, raw))


def read_head(fs: StoreFS, part: str) -> Sealed | None:
    """The head of `part`, or None when the part has not committed anything yet."""
    if not fs.exists(head_path(part)):
        return None
    return read_sealed(fs, head_path(part), f"the head of part {part!r}")


def read_heads(fs: StoreFS) -> dict[str, Sealed]:
    """{part: head} of every part that has a head, in part-name order."""
    heads = {}
    for name in fs.listdir(PARTS_DIR):
        if TMP_MARK not in name:
            head = read_head(fs, name)
            if head is not None:
                heads[name] = head
    return heads


def new_head(part: str, settings: dict[str, Any]) -> dict[str, Any]:
    """The head of a part that has committed nothing yet (unsealed)."""
    now = now_iso()
    return {"format": HEAD_FORMAT, "format_version": written_version(settings.get("kind")),
            "tool_version": __version__, "part": part, "created": now, "updated": now,
            "complete": False, "settings": settings, "segments": 0, "samples": 0, "tokens": 0,
            "last_record": None}


def head_after(head: dict[str, Any], record: dict[str, Any], record_sha: str) -> dict[str, Any]:
    """`head` once the segment of `record` (whose bytes hash to `record_sha`) is committed."""
    return {**head, "updated": now_iso(), "segments": head["segments"] + 1,
            "samples": head["samples"] + record["samples"],
            "tokens": head["tokens"] + record["tokens"], "last_record": record_sha}


def new_record(part: str, number: int, counts: dict[str, Any], files: dict[str, dict],
               previous: str | None, format_version: str = FORMAT_VERSION) -> dict[str, Any]:
    """The record of segment `number` of `part` (unsealed): `counts` holds SEGMENT_KEYS;
    `format_version`: the store's (format.written_version of its kind)."""
    return {"format": RECORD_FORMAT, "format_version": format_version,
            "tool_version": __version__, "part": part, "segment": segment_name(number),
            "number": number, **{k: counts[k] for k in SEGMENT_KEYS}, "files": files,
            "previous": previous, "committed": now_iso()}


def seal(doc: dict[str, Any]) -> tuple[bytes, str]:
    """(sealed bytes of `doc`, their sha256)."""
    raw = sealed_json(doc)
    return raw, sha256_hex(raw)


def walk_records(fs: StoreFS, part: str, start: int, tip: str | None, stop: int,
                 end: str | None) -> list[Sealed]:
    """Records `start` .. `stop - 1` of `part`, checked as one hash chain: the first names
    `tip` (the sha256 of record `start - 1`, None when start is 0) as its previous record,
    each next one the one before, and the last one's bytes hash to `end` (the head's
    `last_record`). ChecksumError naming the record (or the head) where the chain breaks."""
    out, previous = [], tip
    for number in range(start, stop):
        name = segment_name(number)
        record = read_sealed(fs, record_path(part, name),
                             f"the record of committed segment {name} of part {part!r}")
        doc = record.doc
        if (doc.get("part"), doc.get("segment")) != (part, name):
            raise ChecksumError(f"{fs.path(record.rel)} names segment {doc.get('segment')!r} of "
                                f"part {doc.get('part')!r}, expected {name!r} of {part!r}; the "
                                f"store is damaged", path=record.rel)
        if doc.get("previous") != previous:
            raise ChecksumError(f"{fs.path(record.rel)} names {doc.get('previous')} as the "
                                f"previous record, but that record hashes to {previous}: the "
                                f"hash chain of part {part!r} is broken, the store is damaged",
                                path=record.rel)
        previous = record.sha
        out.append(record)
    if previous != end:
        rel = head_path(part)
        raise ChecksumError(f"{fs.path(rel)} names {end} as the last record of its {stop} "
                            f"segments, but record {stop - 1} hashes to {previous}; the store "
                            f"is damaged", path=rel)
    return out


def segment_entry(fs: StoreFS, part: str, record: Sealed,
                  signals: Iterable[str]) -> dict[str, Any]:
    """The committed state of one segment, from its record: name, SEGMENT_KEYS, `files`,
    `record` (the record's sha256) and `additions` ({signal: sha256 of its addition
    record}), with the files and counts of every signal of `signals` that was added to the
    segment after its record was written (read from the addition records)."""
    doc = record.doc
    entry = {"name": doc["segment"], **{k: doc[k] for k in SEGMENT_KEYS},
             "files": dict(doc["files"]), "record": record.sha, "additions": {}}
    return add_signals(fs, part, entry, signals)


def add_signals(fs: StoreFS, part: str, entry: dict[str, Any],
                signals: Iterable[str]) -> dict[str, Any]:
    """`entry` (a segment entry) with the addition record of every signal of `signals` it
    does not hold yet merged in (new dicts; `entry` is not modified)."""
    lacking = [s for s in signals if s not in entry["signals"]]
    if not lacking:
        return entry
    entry = {**entry, "files": dict(entry["files"]), "additions": dict(entry["additions"]),
             "sampled_entries": dict(entry["sampled_entries"]),
             "sampled_multi": dict(entry["sampled_multi"])}
    for signal in lacking:
        rel = addition_path(part, entry["name"], signal)
        added = read_sealed(fs, rel, f"the record of signal {signal!r} added to segment "
                                     f"{entry['name']} of part {part!r}")
        if added.doc.get("record") != entry["record"] or added.doc.get("signal") != signal:
            raise ChecksumError(f"{fs.path(rel)} does not belong to segment {entry['name']} "
                                f"(record {entry['record']}) and signal {signal!r}; the store "
                                f"is damaged", path=rel)
        entry["files"].update(added.doc["files"])
        entry["additions"][signal] = added.sha
        for key in ("sampled_entries", "sampled_multi"):
            if signal in added.doc.get(key, {}):
                entry[key][signal] = added.doc[key][signal]
        entry["signals"] = sorted(set(entry["signals"]) | {signal})
    return entry
