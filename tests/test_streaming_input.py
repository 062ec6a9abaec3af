"""Input of any size in bounded memory (issue 13 section 2): teacher-dump and
`student-train --data` read, tokenise and plan their data a window at a time.

The planner is checked on a stream of 200k records that fails if it is read further ahead
than one window; the dump on tiny local models: 1 vs 2 vs 3 ranks give the same store,
two runs give byte-identical segment files, an interrupted dump resumes to the same store.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from logitstore.toolkit.batching import windowed_padded_batches, windows
from logitstore.toolkit.data import DataOptions, DataSourceError, iter_samples
from logitstore.toolkit.data_sources import repeated_sources

WINDOW = 4096  # tokens


class ReadAhead:
    """A stream of `n` tiny samples (lengths 1..8) that raises when more than `limit`
    tokens are read beyond what its consumer has taken back (`emitted`)."""

    def __init__(self, n: int, limit: int):
        self.n, self.limit = n, limit
        self.read_tokens = self.emitted_tokens = self.read_count = 0

    def __iter__(self):
        for i in range(self.n):
            length = 1 + (i * 7919) % 8
            self.read_tokens += length
            self.read_count += 1
            if self.read_tokens - self.emitted_tokens > self.limit:
                raise AssertionError(f"read {self.read_tokens - self.emitted_tokens} tokens "
                                     f"ahead of the batches handed out (limit {self.limit})")
            yield SimpleNamespace(sample_id=f"s{i}", input_ids=range(length))


def test_the_planner_reads_200k_records_lazily_one_window_ahead():
    stream = ReadAhead(200_000, limit=WINDOW + 8)
    batches = windowed_padded_batches(stream, 64, WINDOW, lambda s: len(s.input_ids))
    first = next(batches)
    assert stream.read_tokens <= WINDOW + 8 and stream.read_count < 200_000  # one window
    seen = len(first)
    stream.emitted_tokens += sum(len(s.input_ids) for s in first)
    for batch in batches:
        lengths = [len(s.input_ids) for s in batch]
        assert len(batch) * max(lengths) <= 64
        seen += len(batch)
        stream.emitted_tokens += sum(lengths)
    assert seen == 200_000
    # A stream that runs too far ahead is caught (the check above can fail).
    with pytest.raises(AssertionError, match="ahead of the batches"):
        for _ in windowed_padded_batches(ReadAhead(50_000, limit=WINDOW + 8), 64, WINDOW * 2,
                                         lambda s: len(s.input_ids)):
            pass


def test_windows_close_at_the_token_budget_and_sort_inside_only():
    items = [5, 1, 4, 1, 5, 9, 2, 6]
    assert list(windows(items, 10, lambda n: n)) == [[5, 1, 4], [1, 5, 9], [2, 6]]
    batches = list(windowed_padded_batches(items, 100, 10, lambda n: n))
    assert batches == [[1, 4, 5], [1, 5, 9], [2, 6]]  # never across a window
    with pytest.raises(ValueError, match="window"):
        list(windows(items, 0, lambda n: n))


def test_rank_split_gives_each_sample_once_in_the_same_batches():
    from teacher_dump.ranks import is_batch_of_rank, stream_batches

    def stream():
        return (SimpleNamespace(sample_id=f"s{i}", input_ids=range(1 + (i * 31) % 50))
                for i in range(3000))

    plan = [tuple(s.sample_id for s in b) for b in stream_batches(stream(), 256, 2000)]
    for world in (1, 2, 3, 4):
        shares = [[tuple(s.sample_id for s in b)
                   for j, b in enumerate(stream_batches(stream(), 256, 2000))
                   if is_batch_of_rank(j, rank, world)] for rank in range(world)]
        merged = sorted(b for share in shares for b in share)
        assert merged == sorted(plan)  # the same batches, each computed by one rank
        ids = [i for share in shares for b in share for i in b]
        assert len(ids) == len(set(ids)) == 3000


def _tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def test_sources_read_twice_are_refused_without_dedup(tmp_path):
    from tiny_hf import make_tokenizer

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for d in ("a", "b"):
        (tmp_path / d / "notes.jsonl").write_text('{"text": "a note"}\n')
    one = str(tmp_path / "a" / "notes.jsonl")
    (tmp_path / "b" / "other.jsonl").write_text('{"text": "another note"}\n')
    assert repeated_sources([one, str(tmp_path / "b" / "other.jsonl")]) == []
    assert repeated_sources([one, str(tmp_path / "a")]) == ["notes.jsonl"]  # file + its dir
    assert repeated_sources([one, one]) == ["notes.jsonl"]
    assert repeated_sources([one, str(tmp_path / "b" / "notes.jsonl")]) == ["notes.jsonl"]
    tok = _tokenizer(make_tokenizer(tmp_path / "tok"))
    with pytest.raises(DataSourceError, match="occur more than once.*notes.jsonl"):
        list(iter_samples([one, one], tok, DataOptions(dedup=False)))
    assert len(list(iter_samples([one, one], tok))) == 1  # dedup: the copy is a duplicate


def test_content_hash_is_order_free_and_tells_sets_apart():
    from teacher_dump.existing_store import content_hash

    pairs = [(f"s{i}", f"{i:064x}") for i in range(100)]
    assert content_hash(pairs) == content_hash(reversed(pairs))
    assert content_hash(pairs) != content_hash(pairs[:-1])
    assert content_hash(pairs) != content_hash(pairs[:-1] + [("s99", "0" * 64)])


# ----------------------------------------------------------------------------- teacher-dump


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    pytest.importorskip("torch")
    from tiny_hf import corpus, make_tiny_llama, make_tokenizer

    root = tmp_path_factory.mktemp("streaming")
    tok = make_tokenizer(root / "tok")
    data = root / "many.jsonl"
    data.write_text("".join(json.dumps({"text": f"{s} {s[::-1][:i % 40]}"}) + "\n"
                            for i, s in enumerate(corpus()[:60])), encoding="utf-8")
    return {"llama": make_tiny_llama(root / "llama", tok), "data": data}


def _config(tiny, out: Path, **overrides):
    from teacher_dump.config import resolve_config

    # ~60 samples of ~20-40 tokens: a 300-token window makes several windows.
    settings = dict(model=str(tiny["llama"]), data=[str(tiny["data"])], out=str(out), top_k=4,
                    samples=4, device="cpu", batch_tokens=128, segment_tokens=400,
                    read_window_tokens=300, progress=False)
    return resolve_config(None, {**settings, **overrides})


def _segment_files(out: Path) -> dict[str, bytes]:
    """{segment/file: bytes} of every data file of every segment of every part (commit
    records, which hold the time of the commit, are left out)."""
    return {f"{p.parent.name}/{p.name}": p.read_bytes()
            for part in sorted((out / "parts").iterdir())
            for p in sorted(part.glob("seg-*/*")) if p.is_file()}


def _samples(out: Path) -> dict[str, tuple]:
    from logitstore.reader import StoreReader

    rows = {}
    for s in StoreReader(str(out)).iter_samples():
        (sig,) = s.signals.values()
        rows[s.sample_id] = (s.input_ids.tolist(), sig.topk.ids.tolist(),
                             sig.topk.logprobs.tolist(), sig.sampled.ids.tolist())
    return rows


def test_one_two_and_three_ranks_give_the_same_store_and_reruns_the_same_bytes(tiny, tmp_path):
    from logitstore.verify import verify_store
    from teacher_dump.dump import run_dump
    from teacher_dump.ranks import RankContext

    report = run_dump(_config(tiny, tmp_path / "one"), ranks=RankContext())
    assert report.data["samples"] == report.samples_written == 60
    again = tmp_path / "again"
    run_dump(_config(tiny, again), ranks=RankContext())
    files = _segment_files(tmp_path / "one")
    assert len(files) > 4 and files == _segment_files(again)  # byte-identical
    reference = _samples(tmp_path / "one")
    for world in (2, 3):
        out = tmp_path / f"world{world}"
        for rank in reversed(range(world)):  # the main rank last: it commits every part
            run_dump(_config(tiny, out), ranks=RankContext(rank=rank, world=world))
        assert verify_store(str(out)) == []
        assert _samples(out) == reference


def test_an_interrupted_dump_resumes_to_the_same_store(tiny, tmp_path, monkeypatch):
    from teacher_dump import batch_loops
    from teacher_dump.dump import run_dump
    from teacher_dump.ranks import RankContext

    run_dump(_config(tiny, tmp_path / "whole"), ranks=RankContext())
    capture = batch_loops.DumpWork.capture
    calls = []

    def interrupted(self, chosen):
        calls.append(len(chosen))
        if len(calls) > 8:
            raise KeyboardInterrupt
        return capture(self, chosen)

    monkeypatch.setattr(batch_loops.DumpWork, "capture", interrupted)
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        run_dump(_config(tiny, out), ranks=RankContext())
    monkeypatch.setattr(batch_loops.DumpWork, "capture", capture)
    done = len(_samples(out))
    assert 0 < done < 60
    report = run_dump(_config(tiny, out, read_window_tokens=300), ranks=RankContext())
    assert (report.samples_resumed, report.samples_written) == (done, 60 - done)
    assert _samples(out) == _samples(tmp_path / "whole")


# ----------------------------------------------------------------------------- student-train


def _text_stream(n: int):
    from student_train.text_data import TextStream

    def read():
        for i in range(n):
            ids = np.arange(2 + (i * 13) % 30, dtype=np.int64)
            mask = np.ones(len(ids), bool)
            mask[0] = False
            yield SimpleNamespace(sample_id=f"t{i}", input_ids=ids, loss_mask=mask)

    return TextStream(read, n)


def test_text_batches_stream_by_window_split_ranks_and_resume():
    pytest.importorskip("torch")
    from student_train.text_data import TextBatches

    def ids(stream):
        return [tuple(b["sample_ids"]) for b in stream]

    data = _text_stream(400)
    as_list = list(data.read())
    whole = TextBatches(as_list, batch_tokens=128, seed=3)
    one_window = TextBatches(data, batch_tokens=128, seed=3, window_tokens=10**9)
    assert ids(whole) == ids(one_window)  # a list is one window: the same plan
    windowed = TextBatches(data, batch_tokens=128, seed=3, window_tokens=500)
    windowed.set_epoch(1)
    full = ids(windowed)
    assert windowed.num_batches() == len(full) and full != ids(whole)
    window_of = {s.sample_id: w for w, win in enumerate(
        windows(as_list, 500, lambda s: len(s.input_ids))) for s in win}
    assert max(window_of.values()) > 3
    assert all(len({window_of[i] for i in b}) == 1 for b in full)  # shuffled within a window
    every = TextBatches(data, batch_tokens=128, seed=3, window_tokens=500, drop_uneven=False)
    every.set_epoch(1)
    assert ids(every)[:len(full)] == full
    assert sorted(i for b in ids(every) for i in b) == sorted(s.sample_id for s in as_list)
    ranks = [TextBatches(data, batch_tokens=128, seed=3, window_tokens=500, rank=r,
                         world_size=3, drop_uneven=False) for r in range(3)]
    for r in ranks:
        r.set_epoch(1)
    shares = [ids(r) for r in ranks]
    assert sorted(b for s in shares for b in s) == sorted(ids(every))
    it = iter(windowed)
    next(it), next(it)
    resumed = TextBatches(data, batch_tokens=128, seed=3, window_tokens=500)
    resumed.load_state_dict(windowed.state_dict())
    resumed.set_epoch(1)
    assert ids(resumed) == full[2:]


def test_load_text_samples_keeps_small_data_and_streams_large(tmp_path):
    pytest.importorskip("torch")
    from tiny_hf import corpus, make_tokenizer

    from student_train.text_data import TextStream, holdout, load_text_samples

    tok = _tokenizer(make_tokenizer(tmp_path / "tok"))
    path = tmp_path / "notes.jsonl"
    path.write_text("".join(json.dumps({"text": s}) + "\n" for s in corpus()[:40]))
    small = load_text_samples([str(path)], tok, window_tokens=10**9)
    large = load_text_samples([str(path)], tok, window_tokens=100)
    assert isinstance(small, list) and isinstance(large, TextStream)
    assert len(large) == len(small) == 40
    assert [s.sample_id for s in large.read()] == [s.sample_id for s in small]
    train, held = holdout(large, 0.25, seed=0)
    list_train, list_held = holdout(small, 0.25, seed=0)
    assert [s.sample_id for s in held.read()] == [s.sample_id for s in list_held]
    assert (len(train), len(held)) == (len(list_train), len(list_held))
