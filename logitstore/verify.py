"""Verify a committed store: every checksum and every structural invariant.

Every file of the committed store is checked: the store manifest against its seal, the
sample index (and, format 2.0, the catalog) against the sha256 the manifest records, every
data file (zarr metadata, shards, segment indexes) against the sha256 its segment's record
or the catalog records, the records, heads and counts (logitstore/verify_records.py), and
for formats 1.0/1.1 each part manifest against its seal and the committed state. Returns a
list of problems, each naming the file it is about; an empty list means clean. A path that
holds no committed store raises StoreNotFoundError or ManifestMissingError, and a failure
of the storage itself raises StoreIOError: neither is damage.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterator, TypeVar

import numpy as np
import zarr

from logitstore.classifier_sample import classifier_segment_problems, expected_classifier_arrays
from logitstore.commit import (dataset_fingerprint, parse_manifest, part_manifest_path,
                               require_committed)
from logitstore.consolidate import copy_problems
from logitstore.errors import (ChecksumError, FormatVersionError, SchemaMismatchError,
                               StoreIOError)
from logitstore.snapshot import read_snapshot
from logitstore.verify_records import check_records
from logitstore.format import (CLASSIFIER, MANIFEST, PARTS_DIR, StoreSettings, int_dtype_for,
                               signal_array, tokenization_array)
from logitstore.fs import StoreFS, sha256_hex, storage_error
from logitstore.text_spans import (SPAN_GAP, SPAN_LENGTH, TEXT_ARRAYS, TEXT_SAMPLE_BYTES, TEXT_UTF8,
                                   TOKEN_KIND, segment_text_problems)
from logitstore.tokenized import (ARRAYS as TOKENIZED_ARRAYS, SAMPLE_ARRAYS, SAMPLE_TOKENS,
                                  segment_tokenized_problems)

T = TypeVar("T")
# Files read (and segments checked) at once: on an object store each read is a request
# whose latency dominates, so verify keeps this many in flight; memory holds as many files.
READERS = 16
IN_FLIGHT = 256  # work items handed to the pool at a time (keeps the futures bounded)


def expected_arrays(settings: StoreSettings, tokens: int, samples: int, entries: dict[str, int],
                    multi: dict[str, int], tokenization_tokens: dict[str, int] | None = None
                    ) -> dict[str, tuple[tuple[int, ...], str]]:
    """Array path inside a segment -> (shape, dtype) that the format prescribes.
    `tokenization_tokens`: the segment's tokens on each extra tokenization's axis (2.2).
    A classifier store's segment (2.3) holds its per-sample arrays only."""
    if settings.kind == CLASSIFIER:
        return expected_classifier_arrays(settings, samples)
    axis = dict(tokenization_tokens or {})
    out = {"input_ids": ((tokens,), settings.token_dtype), "loss_mask": ((tokens,), "bool")}
    for name, spec in settings.tokenizations.items():
        dtypes = {"input_ids": spec.token_dtype, "loss_mask": "bool", "spans/gap": "int32",
                  "spans/length": "uint32", "spans/kind": "uint8"}
        for array in TOKENIZED_ARRAYS:
            rows = samples if array in SAMPLE_ARRAYS else axis.get(name, -1)
            out[tokenization_array(name, array)] = ((rows,), dtypes.get(array, "uint32"))
    if settings.text:  # text/utf8 holds sum(text/sample_bytes) bytes: checked with them
        out.update({TEXT_UTF8: (None, "uint8"), TEXT_SAMPLE_BYTES: ((samples,), "uint32"),
                    SPAN_GAP: ((tokens,), "int32"), SPAN_LENGTH: ((tokens,), "uint32"),
                    TOKEN_KIND: ((tokens,), "uint8")})
    for name, spec in settings.signals.items():
        id_dtype = int_dtype_for(settings.signal_vocab_size(name) - 1)
        # a signal on an extra tokenization has that tokenization's positions (2.2)
        positions = tokens if spec.tokenization is None else axis.get(spec.tokenization, -1)
        if spec.topk:
            k = spec.topk.k
            out[signal_array(name, "topk_ids")] = ((positions, k), id_dtype)
            out[signal_array(name, "topk_logprobs")] = ((positions, k), _lp_dtype(spec.topk))
            out[signal_array(name, "topk_tail")] = ((positions,), _lp_dtype(spec.topk))
        if spec.sampled:
            n = entries.get(name, -1)
            count_dtype = int_dtype_for(spec.sampled.n_draws)
            out[signal_array(name, "sampled_nuniq")] = ((positions,), count_dtype)
            out[signal_array(name, "sampled_nmulti")] = ((positions,), count_dtype)
            out[signal_array(name, "sampled_ids")] = ((n,), id_dtype)
            out[signal_array(name, "sampled_counts")] = ((multi.get(name, -1),), count_dtype)
            if spec.sampled.logprobs:
                out[signal_array(name, "sampled_logprobs")] = ((n,), _lp_dtype(spec.sampled))
        if spec.hidden:
            h = spec.hidden
            out[signal_array(name, "hidden")] = ((samples, len(h.layers), h.dim), h.dtype)
        if spec.attention:
            a = spec.attention
            out[signal_array(name, "attention")] = (
                (samples, len(a.layers), a.num_heads, a.grid, a.grid), a.dtype)
    return out


def _lp_dtype(spec) -> str:
    return {"q8": "uint8", "f16": "float16", "f32": "float32"}[spec.logprob_encoding]


def verify_store(url: str, *, storage_options: dict | None = None,
                 progress: Callable[[str], None] | None = None) -> list[str]:
    fs = StoreFS(url, storage_options)
    require_committed(fs)
    try:
        # Beside a running writer, one whole committed state: a consolidation deletes the
        # index and catalog an older manifest names (read_snapshot then reads the newer
        # one); segment files and records are never deleted once committed.
        snap = read_snapshot(fs)
        manifest = snap.view
        settings = StoreSettings.from_json(manifest["settings"])
    except ChecksumError as err:  # names the file (a missing one included)
        return [str(err)]
    except (StoreIOError, FormatVersionError):
        raise  # not damage: the storage failed, or another major version of the format
    except (SchemaMismatchError, KeyError, TypeError, ValueError) as err:
        return [f"{fs.path(MANIFEST)}: {type(err).__name__}: {err}"]
    problems = _check_part_manifests(fs, manifest) if snap.legacy else \
        check_records(fs, snap) + copy_problems(fs)
    damaged: set[str] = set()
    files = sorted(manifest.get("files", {}).items())
    with ThreadPoolExecutor(READERS) as pool:
        def check_file(item: tuple[str, dict]) -> str | None:
            rel, meta = item
            return _check_bytes(fs, rel, meta, fs.read_bytes_if_present(rel, meta["size"]))

        for (rel, _), problem in zip(files, _in_order(pool, check_file, files)):
            if progress:
                progress(rel)
            if problem:
                problems.append(problem)
                damaged.add(rel)
        problems += _check_structure(fs, manifest, settings, snap.index, damaged, pool)
    return problems


def _in_order(pool: ThreadPoolExecutor, fn: Callable[[Any], T], items: list) -> Iterator[T]:
    """fn(item) for every item, computed by the pool and yielded in order, at most
    `IN_FLIGHT` at a time (memory: that many files, not the whole store)."""
    for start in range(0, len(items), IN_FLIGHT):
        yield from pool.map(fn, items[start:start + IN_FLIGHT])


def _check_part_manifests(fs: StoreFS, manifest: dict) -> list[str]:
    """Each part manifest the store manifest lists: present, sealed, and holding the
    committed state of its part.

    A running (or crashed) writer may have replaced it since the commit, with more
    segments or a new signal: then it differs from the sha256 the store manifest records
    but must still be intact, list every committed segment with the same files, and every
    file it lists beyond the commit must exist."""
    recorded = manifest.get("part_manifests")
    if recorded is None:  # format 1.0 listed none (and copies made by `cp` had none)
        recorded = {part_manifest_path(p["name"]): None for p in manifest["parts"]}
    parts = {part_manifest_path(p["name"]): p for p in manifest["parts"]}
    problems = []
    for rel, meta in sorted(recorded.items()):
        raw = fs.read_bytes_if_present(rel)
        if raw is None:
            if meta is not None:
                problems.append(f"{fs.path(rel)}: missing (a committed part's manifest; "
                                f"resuming or committing the store needs it)")
            continue
        if meta is not None and len(raw) == meta["size"] and sha256_hex(raw) == meta["sha256"]:
            continue  # the very file the commit was made from
        try:
            doc = parse_manifest(fs, rel, raw)
        except ChecksumError as err:
            problems.append(str(err))
            continue
        disagreement = part_disagreement(doc, parts[rel], manifest["files"]) \
            if rel in parts else "is listed but its part is not in the store manifest"
        if disagreement:
            problems.append(f"{fs.path(rel)}: {disagreement} (damaged or replaced)")
            continue
        problems += _files_past_the_commit_missing(fs, rel, doc, manifest["files"])
    return problems


def _files_past_the_commit_missing(fs: StoreFS, rel: str, doc: dict, files: dict) -> list[str]:
    """A part manifest moved on since the commit lists files the commit does not: a writer
    writes them before it lists them, so each must exist (a copy that lacks them cannot be
    resumed or committed). Their bytes are checked when a commit lists them."""
    for seg in doc["segments"]:
        for listed in sorted(seg.get("files") or {}):
            if listed not in files and not fs.exists(listed):
                return [f"{fs.path(rel)}: lists {listed}, which is missing (resuming or "
                        f"committing this part would fail)"]
    return []


def part_disagreement(doc: dict, part: dict, files: dict) -> str | None:
    """How a part manifest contradicts the committed state of its part, or None."""
    if doc.get("part") != part["name"]:
        return f"names part {doc.get('part')!r}, expected {part['name']!r}"
    if part["complete"] and not doc.get("complete"):
        return "says the part is not complete; the store manifest says it is"
    segments = doc.get("segments")
    if not isinstance(segments, list) or len(segments) < len(part["segments"]):
        return f"lists fewer segments than the {len(part['segments'])} committed"
    for committed, found in zip(part["segments"], segments):
        for key in ("name", "samples", "tokens", "target_tokens"):
            if found.get(key) != committed.get(key):
                return (f"segment {committed['name']}: {key} {found.get(key)!r}, committed "
                        f"{committed.get(key)!r}")
        prefix = f"{PARTS_DIR}/{part['name']}/{committed['name']}/"
        for rel, meta in files.items():
            if rel.startswith(prefix) and (found.get("files") or {}).get(rel) != meta:
                return f"segment {committed['name']}: lists {rel} differently"
    return None


def _check_bytes(fs: StoreFS, rel: str, meta: dict, data: bytes | None) -> str | None:
    """The problem with a file's bytes (None: missing), or None when they are sound."""
    if data is None:
        return f"{fs.path(rel)}: missing"
    if len(data) != meta["size"]:
        return f"{fs.path(rel)}: size {len(data)} bytes, expected {meta['size']} (truncated?)"
    found = sha256_hex(data)
    if found != meta["sha256"]:
        return f"{fs.path(rel)}: sha256 {found}, expected {meta['sha256']} (damaged)"
    return None


def _check_structure(fs: StoreFS, manifest: dict, settings: StoreSettings, index,
                     damaged: set[str], pool: ThreadPoolExecutor) -> list[str]:
    problems = []
    counts = manifest["counts"]
    index_path = manifest["index"]["path"]
    where = fs.path(index_path) if index_path else f"the sample index of {fs.url}"
    ids = index.column("sample_id").to_pylist()
    lengths = index.column("length").to_numpy()
    offsets = index.column("offset").to_numpy()
    if len(ids) != counts["samples"]:
        problems.append(f"{where}: {len(ids)} rows, manifest counts {counts['samples']} samples")
    if len(set(ids)) != len(ids):
        problems.append(f"{where}: duplicate sample ids")
    if int(lengths.sum()) != counts["tokens"]:
        problems.append(f"{where}: lengths sum to {int(lengths.sum())}, manifest counts "
                        f"{counts['tokens']} tokens")
    if len(offsets) and (offsets[0] != 0 or np.any(offsets[1:] != offsets[:-1] + lengths[:-1])):
        problems.append(f"{where}: token offsets are not contiguous")
    if dataset_fingerprint(ids, index.column("digest").to_pylist()) != \
            manifest["dataset_fingerprint"]:
        problems.append(f"{fs.path(MANIFEST)}: dataset fingerprint does not match the index")
    row, segments = 0, []
    for part in manifest["parts"]:
        for seg in part["segments"]:
            seg_dir = f"{PARTS_DIR}/{part['name']}/{seg['name']}"
            rows = index.slice(row, seg["samples"])
            row += seg["samples"]
            if set(rows.column("segment").to_pylist()) != {seg["name"]} or \
                    set(rows.column("part").to_pylist()) != {part["name"]}:
                problems.append(f"{where}: rows of {seg_dir} are out of place")
            if int(rows.column("length").to_numpy().sum()) != seg["tokens"]:
                problems.append(f"{where}: lengths of {seg_dir} do not sum to {seg['tokens']}")
            segments.append((seg_dir, seg, rows.column("length").to_numpy(), rows))
    listed = set(manifest["files"])
    # every folder above a damaged file: an array is skipped when any file under it is
    damaged_dirs = {rel.rsplit("/", depth)[0] for rel in damaged
                    for depth in range(1, rel.count("/") + 1)}

    def check_segment(item: tuple[str, dict, np.ndarray, Any]) -> list[str]:
        seg_dir, seg, lengths, rows = item
        problems = _check_segment_arrays(fs, settings, seg_dir, seg, listed, damaged_dirs)
        if settings.kind == CLASSIFIER and not problems:
            problems += _check_classifier(fs, settings, seg_dir, rows, damaged_dirs)
        if settings.text and not problems:
            problems += _check_text(fs, seg_dir, lengths, damaged_dirs)
        if settings.tokenizations and not problems:
            problems += _check_tokenizations(fs, settings, seg_dir, damaged_dirs)
        return problems

    for found in _in_order(pool, check_segment, segments):
        problems += found
    return problems


def _check_classifier(fs: StoreFS, settings: StoreSettings, seg_dir: str, rows,
                      damaged_dirs: set[str]) -> list[str]:
    """A classifier segment's values (2.3): labels in range, finite logits and features,
    index digests matching the labels (arrays with a damaged file: reported already)."""
    if seg_dir in damaged_dirs:  # a file under it is damaged
        return []
    try:
        return classifier_segment_problems(
            lambda name: _open(fs, f"{seg_dir}/{name}")[...], settings, fs.path(seg_dir),
            rows.column("sample_id").to_pylist(), rows.column("digest").to_pylist())
    except Exception as err:
        _raise_storage_failure(err, fs.url_of(seg_dir))
        return [f"{fs.path(seg_dir)}: cannot read the classifier arrays ({err})"]


def _check_segment_arrays(fs: StoreFS, settings: StoreSettings, seg_dir: str, seg: dict,
                          listed: set[str], damaged_dirs: set[str]) -> list[str]:
    """Shapes and dtypes of a segment's arrays, and its sampled draws (arrays with a
    damaged file are skipped: their checksum is already reported)."""
    problems, axis = _tokenization_tokens(fs, settings, seg_dir, listed, damaged_dirs)
    expected = expected_arrays(settings, seg["tokens"], seg["samples"],
                               seg.get("sampled_entries", {}), seg.get("sampled_multi", {}),
                               axis)
    for name, (shape, dtype) in expected.items():
        rel = f"{seg_dir}/{name}"
        if f"{rel}/zarr.json" not in listed:
            problems.append(f"{fs.path(rel)}: array not listed in the manifest")
            continue
        if rel in damaged_dirs:
            continue  # already reported by checksum
        problems += _check_array(fs, rel, shape, dtype)
    return problems + _check_sampled(fs, settings, seg_dir, damaged_dirs)


def _tokenization_tokens(fs: StoreFS, settings: StoreSettings, seg_dir: str, listed: set[str],
                         damaged_dirs: set[str]) -> tuple[list[str], dict[str, int]]:
    """(problems, {tokenization: the segment's tokens on its axis}) from each extra
    tokenization's `sample_tokens` (2.2); one that cannot be read is left out (its arrays'
    shapes are then reported against -1, or their checksum already was)."""
    problems, axis = [], {}
    for name in settings.tokenizations:
        rel = f"{seg_dir}/{tokenization_array(name, SAMPLE_TOKENS)}"
        if f"{rel}/zarr.json" not in listed or rel in damaged_dirs:
            continue  # reported as not listed, or by checksum
        try:
            axis[name] = int(_open(fs, rel)[...].astype(np.int64).sum())
        except Exception as err:
            _raise_storage_failure(err, fs.url_of(rel))
            problems.append(f"{fs.path(rel)}: cannot read ({type(err).__name__}: {err})")
    return problems, axis


def _check_tokenizations(fs: StoreFS, settings: StoreSettings, seg_dir: str,
                         damaged_dirs: set[str]) -> list[str]:
    """Each extra tokenization's tokens against the samples' text (2.2, tokenized.py):
    ids in its vocabulary, spans inside the covered bytes, covered bytes inside the text."""
    problems = []
    for name, spec in settings.tokenizations.items():
        rels = {a: f"{seg_dir}/{tokenization_array(name, a)}" for a in TOKENIZED_ARRAYS}
        sizes = f"{seg_dir}/{TEXT_SAMPLE_BYTES}"
        if any(r in damaged_dirs for r in [*rels.values(), sizes]):
            continue  # already reported by checksum
        try:
            arrays = {a: _open(fs, r)[...] for a, r in rels.items()}
            sample_bytes = _open(fs, sizes)[...]
        except Exception as err:
            _raise_storage_failure(err, fs.url_of(seg_dir))
            problems.append(f"{fs.path(seg_dir)}: cannot read tokenization {name!r} ({err})")
            continue
        problems += [f"{fs.path(seg_dir)}/tokenizations/{name}: {problem}" for problem in
                     segment_tokenized_problems(arrays, sample_bytes, spec.vocab_size)]
    return problems


def _open(fs: StoreFS, rel: str):
    return zarr.open_array(fs.zarr_store(), path=rel, mode="r", zarr_format=3)


def _check_array(fs: StoreFS, rel: str, shape, dtype) -> list[str]:
    try:
        arr = _open(fs, rel)
    except Exception as err:
        _raise_storage_failure(err, fs.url_of(rel))
        return [f"{fs.path(rel)}: cannot open ({type(err).__name__}: {err})"]
    out = []
    if shape is not None and tuple(arr.shape) != tuple(shape):
        out.append(f"{fs.path(rel)}: shape {tuple(arr.shape)}, expected {tuple(shape)}")
    if str(arr.dtype) != dtype:
        out.append(f"{fs.path(rel)}: dtype {arr.dtype}, expected {dtype}")
    return out


def _check_sampled(fs: StoreFS, settings: StoreSettings, seg_dir: str,
                   damaged_dirs: set[str]) -> list[str]:
    """Draws of every position sum to n_draws; run lengths add up to the entry arrays."""
    out = []
    for name, spec in settings.signals.items():
        if not spec.sampled:
            continue
        rels = {a: f"{seg_dir}/{signal_array(name, a)}"
                for a in ("sampled_nuniq", "sampled_nmulti", "sampled_ids", "sampled_counts")}
        if any(r in damaged_dirs for r in rels.values()):
            continue
        try:
            nuniq, nmulti, ids, counts = (_open(fs, rels[a])[...].astype(np.int64) for a in rels)
        except Exception as err:
            _raise_storage_failure(err, fs.url_of(seg_dir))
            out.append(f"{fs.path(seg_dir)}: cannot read sampled arrays of {name!r} ({err})")
            continue
        if nuniq.sum() != len(ids) or np.any(nuniq < 1) or np.any(nmulti > nuniq) or \
                nmulti.sum() != len(counts) or np.any(counts < 2):
            out.append(f"{fs.path(rels['sampled_nuniq'])}: per-position entry counts do not add "
                       f"up to the {len(ids)} ids and {len(counts)} stored counts")
            continue
        # Each position: its stored counts (ids drawn more than once) + one per single id.
        multi_sums = np.zeros(len(nuniq), dtype=np.int64)
        np.add.at(multi_sums, np.repeat(np.arange(len(nuniq)), nmulti), counts)
        if np.any(multi_sums + (nuniq - nmulti) != spec.sampled.n_draws):
            out.append(f"{fs.path(rels['sampled_counts'])}: draws per position must sum to "
                       f"{spec.sampled.n_draws}")
    return out


def _check_text(fs: StoreFS, seg_dir: str, lengths: np.ndarray,
                damaged_dirs: set[str]) -> list[str]:
    """Texts and spans of a segment's samples (`lengths`: their tokens, from the index):
    the texts add up to text/utf8 and are UTF-8, every span lies in its text, spans never
    go back, special tokens' spans are empty and the others' are not (text_spans.py)."""
    rels = [f"{seg_dir}/{name}" for name in TEXT_ARRAYS]
    if any(r in damaged_dirs for r in rels):
        return []  # already reported by checksum
    try:
        utf8, sample_bytes, gap, length, kind = (_open(fs, r)[...] for r in rels)
    except Exception as err:
        _raise_storage_failure(err, fs.url_of(seg_dir))
        return [f"{fs.path(seg_dir)}: cannot read the text arrays ({err})"]
    return [f"{fs.path(seg_dir)}/spans: {problem}" for problem in
            segment_text_problems(utf8, sample_bytes, lengths, gap, length, kind)]


def _raise_storage_failure(err: Exception, url: str) -> None:
    """Raise StoreIOError when `err` is a failure of the storage rather than of the bytes
    (zarr raises many types for damaged metadata or chunks: those are returned as problems)."""
    failure = storage_error(err, url)
    if failure is not None:
        raise failure from err
