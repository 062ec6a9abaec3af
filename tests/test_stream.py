"""StoreStream: partition, order, token budget, batch contents, packing mask, resume, curriculum."""

import itertools

import fsspec
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from logitstore.reader import StoreReader
from logitstore.writer import StoreWriter
from student_train.collate import attention_bias
from student_train.losses import build_sampled_target, build_topk_target
from student_train.stream import StoreStream, holdout_rows
from test_store_roundtrip import make, settings_for

N = 64


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """64 samples (1..39 tokens) in ~20 segments, every capture kind; every 5th is validation."""
    path = str(tmp_path_factory.mktemp("stream") / "store")
    s = settings_for(segment_tokens=50)
    samples = make(np.random.default_rng(7), N, s)
    for i, x in enumerate(samples):
        x.split = "validation" if i % 5 == 4 else "train"
    with StoreWriter(path, s) as w:
        w.add_many(samples)
    reader = StoreReader(path)
    assert len(reader.segments) >= 16  # enough for "segments" partition over 2 x 2 shards
    return path, reader


def ids_of(batches):
    return [sid for b in batches for sid in b["sample_ids"]]


def train_ids(reader):
    return {sid for sid, sp in zip(reader.sample_ids, reader.index.column("split").to_pylist())
            if sp == "train"}


# -- partition and order -------------------------------------------------------------------

@pytest.mark.parametrize("partition", ["segments", "rows"])
def test_ranks_times_workers_see_each_sample_once(store, partition):
    path, reader = store
    orders = {}
    for epoch in (0, 1) if partition == "segments" else (0,):
        seen, per_rank = [], []
        for rank in (0, 1):
            stream = StoreStream(path, signals=[], split="train", rank=rank, world_size=2,
                                 batch_tokens=120, shuffle_buffer=8, partition=partition)
            stream.set_epoch(epoch)
            batches = list(DataLoader(stream, batch_size=None, num_workers=2))
            assert {b["stream_position"]["worker"] for b in batches} == {0, 1}
            assert len(batches) == stream.num_batches(num_workers=2)
            per_rank.append(ids_of(batches))
            seen += per_rank[-1]
        assert sorted(seen) == sorted(train_ids(reader))  # exactly once over 2 ranks x 2 workers
        assert abs(len(per_rank[0]) - len(per_rank[1])) <= 12  # roughly balanced
        orders[epoch] = seen
    if partition == "segments":
        assert orders[0] != orders[1]


def test_order_is_seeded_by_seed_and_epoch(store):
    path, _ = store

    def order(seed, epoch, **kw):
        stream = StoreStream(path, signals=[], seed=seed, batch_tokens=100, shuffle_buffer=16,
                             **kw)
        stream.set_epoch(epoch)
        return ids_of(stream)

    assert order(0, 0) == order(0, 0)
    assert order(0, 0) != order(0, 1)
    assert order(0, 0) != order(1, 0)
    assert sorted(order(0, 3)) == sorted(order(0, 0))
    seq = order(0, 0, shuffle=False)  # sequential: store order, whatever the epoch
    assert seq == order(0, 5, order="sequential") == StoreReader(path).sample_ids


def test_token_budget(store):
    path, reader = store
    length = dict(zip(reader.sample_ids, reader.index.column("length").to_pylist()))
    for batch in StoreStream(path, signals=[], batch_tokens=90, max_batch_size=5):
        B, S = batch["input_ids"].shape
        assert B <= 5 and (B * S <= 90 or B == 1)
        assert S == max(length[s] for s in batch["sample_ids"])
    for kw in (dict(), dict(pack_length=45)):
        batches = list(StoreStream(path, signals=[], batch_tokens=90, packing=True, **kw))
        assert sorted(ids_of(batches)) == sorted(reader.sample_ids)
        for batch in batches:
            B, S = batch["input_ids"].shape
            assert sum(length[s] for s in batch["sample_ids"]) == batch["lengths"].sum() <= 90
            assert B * S <= 90 and S <= kw.get("pack_length", 90)
        assert max(len(b["sample_ids"]) for b in batches) > 2  # packing does pack


# -- contents ---------------------------------------------------------------------------------

def check_batch(batch, reader):
    """Every sample of the batch against the store's own arrays, at its row and span."""
    sig = batch["signals"]["teacher"]
    B, S = batch["input_ids"].shape
    covered = torch.zeros(B, S, dtype=torch.bool)
    for j, sid in enumerate(batch["sample_ids"]):
        x = reader.sample(sid)
        t = x.signals["teacher"]
        b, a, L = (int(sig[k][j]) for k in ("sample_row", "sample_start", "sample_length"))
        assert L == len(x)
        span = slice(a, a + L)
        covered[b, span] = True
        np.testing.assert_array_equal(batch["input_ids"][b, span], x.input_ids)
        want = np.where(x.loss_mask, x.input_ids, -100)
        want[0] = -100  # the first token of a sample is never a target
        np.testing.assert_array_equal(batch["labels"][b, span], want)
        np.testing.assert_array_equal(batch["position_ids"][b, span], np.arange(L))
        np.testing.assert_array_equal(sig["topk_ids"][b, span], t.topk.ids)
        np.testing.assert_array_equal(sig["topk_logprobs"][b, span], t.topk.logprobs)
        np.testing.assert_array_equal(sig["topk_tail"][b, span], t.topk.tail())
        for p in range(L):
            ids, counts, lps = t.sampled.position(p)
            n = len(ids)
            np.testing.assert_array_equal(sig["sampled_ids"][b, a + p, :n], ids)
            np.testing.assert_array_equal(sig["sampled_counts"][b, a + p, :n], counts)
            np.testing.assert_array_equal(sig["sampled_logprobs"][b, a + p, :n], lps)
            assert not sig["sampled_counts"][b, a + p, n:].any()  # count 0 = padding
        np.testing.assert_array_equal(sig["hidden"][j], t.hidden)
        np.testing.assert_array_equal(sig["attention"][j], t.attention)
    assert torch.equal(batch["attention_mask"].bool(), covered)
    assert torch.equal(batch["lengths"], covered.sum(1))
    assert (batch["labels"][~covered] == -100).all() and not batch["token_weights"][~covered].any()
    assert batch["num_target_tokens"] == int((batch["labels"] != -100).sum())
    pad = ~covered
    assert not sig["sampled_counts"][pad].any() and not sig["topk_logprobs"][pad].any()
    k = sig["topk_ids"].shape[-1]
    assert (sig["topk_ids"][pad] == torch.arange(k)).all()  # distinct ids: see collate.py
    assert sig["sampled_ids"].shape[-1] == int((sig["sampled_counts"] > 0).sum(-1).max())


def test_padding_batches_equal_store_arrays(store):
    path, reader = store
    weight = {"cardio": 2.0, "neuro": 0.5}
    stream = StoreStream(path, signals=["teacher"], batch_tokens=150, shuffle_buffer=8,
                         sample_weight=lambda row: weight.get(row["specialty"], 1.0))
    spec = dict(zip(reader.sample_ids, reader.index.column("specialty").to_pylist()))
    batches = list(itertools.islice(stream, 4))  # the whole epoch: see the partition test
    for batch in batches:
        check_batch(batch, reader)
        assert "attention_mask_4d" not in batch
        w = torch.tensor([weight.get(spec[s], 1.0) for s in batch["sample_ids"]])
        assert torch.equal(batch["sample_weights"], w)
        assert torch.equal(batch["token_weights"], w[:, None] * batch["attention_mask"])
    b = batches[0]  # the loss library takes the padded batch as is (no repeated pad ids, no NaN)
    sig = b["signals"]["teacher"]
    assert torch.isfinite(build_topk_target(sig["topk_ids"], sig["topk_logprobs"]).logprobs).all()
    build_sampled_target(sig["sampled_ids"], sig["sampled_counts"], sig["sampled_logprobs"],
                         n_draws=reader.settings.signals["teacher"].sampled.n_draws)


def test_packing_batches_equal_store_arrays_and_mask_blocks_samples(store):
    path, reader = store
    batches = itertools.islice(StoreStream(path, signals=None, batch_tokens=120,
                                           pack_length=60, packing=True, shuffle_buffer=8), 4)
    for batch in batches:
        check_batch(batch, reader)
        sig = batch["signals"]["teacher"]
        mask = batch["attention_mask_4d"][:, 0]  # [B, S, S]
        B, S = batch["input_ids"].shape
        owner = torch.full((B, S), -1)
        for j in range(len(batch["sample_ids"])):
            a = int(sig["sample_start"][j])
            owner[sig["sample_row"][j], a:a + int(sig["sample_length"][j])] = j
        q, k = torch.arange(S)[:, None], torch.arange(S)[None, :]
        real = owner >= 0
        want = (owner[:, :, None] == owner[:, None, :]) & (k <= q) & real[:, :, None]
        assert torch.equal(mask & real[:, :, None], want)  # causal, never across samples
        assert mask[~real].sum() == (~real).sum()  # padding attends only to itself
        assert "sample_weights" not in batch
        assert torch.equal(batch["token_weights"], batch["attention_mask"].float())


def test_tiny_llama_packed_equals_alone(store):
    transformers = pytest.importorskip("transformers")
    path, reader = store
    batch = next(b for b in StoreStream(path, signals=[], batch_tokens=100, packing=True)
                 if len(b["sample_ids"]) >= 3)
    torch.manual_seed(0)
    for impl in ("eager", "sdpa"):
        cfg = transformers.LlamaConfig(vocab_size=reader.settings.vocab_size, hidden_size=32,
                                       intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2,
                                       max_position_embeddings=128, attn_implementation=impl)
        model = transformers.LlamaForCausalLM(cfg).eval()
        mask = batch["attention_mask_4d"]
        if impl == "eager":  # eager adds the mask to the scores: give it the additive form
            mask = attention_bias(mask)
        with torch.no_grad():
            packed = model(batch["input_ids"], attention_mask=mask,
                           position_ids=batch["position_ids"]).logits[0]
            start = 0
            for sid in batch["sample_ids"]:
                ids = torch.from_numpy(reader.sample(sid).input_ids)[None]
                alone = model(ids).logits[0]
                torch.testing.assert_close(packed[start:start + len(alone)], alone,
                                           atol=1e-5, rtol=0)
                start += len(alone)


# -- resume ------------------------------------------------------------------------------------

@pytest.mark.parametrize("packing", [False, True])
def test_resume_mid_epoch_continues_exactly(store, packing):
    path, _ = store
    kw = dict(signals=[], batch_tokens=80, shuffle_buffer=6, packing=packing, seed=3)
    full = StoreStream(path, **kw)
    full.set_epoch(1)
    want = [(b["sample_ids"], b["input_ids"]) for b in full]
    first = StoreStream(path, **kw)
    first.set_epoch(1)
    it = iter(first)
    for _ in range(7):
        next(it)
    state = first.state_dict()
    assert state["epoch"] == 1 and state["batches"] == 7

    resumed = StoreStream(path, **kw)
    resumed.load_state_dict(state)
    resumed.set_epoch(1)  # what a trainer loop does at the top of the epoch: keeps the state
    reads = []
    real_read = resumed.reader.read_segment
    resumed.reader.read_segment = lambda i, s: reads.append(i) or real_read(i, s)
    got = [(b["sample_ids"], b["input_ids"]) for b in resumed]
    assert [g[0] for g in got] == [w[0] for w in want[7:]]
    assert all(torch.equal(g[1], w[1]) for g, w in zip(got, want[7:]))
    assert len(reads) < len(StoreReader(path).segments)  # skipped batches are not read
    again = [b["sample_ids"] for b in resumed]  # a second pass of the epoch starts at 0
    assert again == [w[0] for w in want]


def test_resume_with_dataloader_workers(store):
    path, _ = store
    kw = dict(signals=[], batch_tokens=60, shuffle_buffer=6, rank=1, world_size=2)
    want = [b["sample_ids"] for b in StoreStream(path, **kw).loader(num_workers=2)]
    stream = StoreStream(path, **kw)
    got = []
    for batch in stream.loader(num_workers=2):
        got.append(batch["sample_ids"])
        if len(got) == 5:  # odd: the next batch comes from worker 1
            state = stream.state_dict()
            break
    assert state["worker_batches"] == [3, 2]
    resumed = StoreStream(path, **kw)
    resumed.load_state_dict(state)
    got += [b["sample_ids"] for b in resumed.loader(num_workers=2)]
    assert got == want
    assert resumed.state_dict()["batches"] == len(want)
    # DDP ranks step in lockstep: rank 0 may resume from rank 1's state (batch counts agree)
    kw0 = {**kw, "rank": 0}
    want0 = [b["sample_ids"] for b in StoreStream(path, **kw0).loader(num_workers=2)]
    rank0 = StoreStream(path, **kw0)
    rank0.load_state_dict(state)
    assert [b["sample_ids"] for b in rank0.loader(num_workers=2)] == want0[5:]
    with pytest.raises(ValueError, match="workers"):
        other = StoreStream(path, **kw)
        other.load_state_dict(state)
        list(other)  # main process = 1 worker, the state had 2
    with pytest.raises(ValueError, match="batch_tokens"):
        StoreStream(path, **{**kw, "batch_tokens": 61}).load_state_dict(state)


# -- selection, curriculum, hold-out, remote ------------------------------------------------

def test_curriculum_easy_to_hard_and_shuffled_within_levels(store):
    path, reader = store
    level = dict(zip(reader.sample_ids, reader.index.column("difficulty").to_pylist()))

    def run(epoch):
        stream = StoreStream(path, signals=[], order="curriculum", batch_tokens=100)
        stream.set_epoch(epoch)
        return ids_of(stream)

    a, b = run(0), run(1)
    keys = [level[s] if level[s] is not None else 99 for s in a]  # nulls come last
    assert keys == sorted(keys) and sorted(a) == sorted(reader.sample_ids)
    assert a != b and [level[s] for s in a] == [level[s] for s in b]


def test_split_filter_and_holdout(store):
    path, reader = store
    val = list(StoreStream(path, signals=[], split="validation"))
    assert sorted(ids_of(val)) == sorted(set(reader.sample_ids) - train_ids(reader))
    cardio = ids_of(StoreStream(path, signals=[], sample_filter=lambda r: r["specialty"] ==
                                "cardio"))
    assert cardio and all(reader.sample(s).tags.get("specialty") == "cardio" for s in cardio)

    train, held = holdout_rows(reader, 0.25, seed=1)
    t2, h2 = holdout_rows(StoreReader(path), 0.25, seed=1)
    assert np.array_equal(train, t2) and np.array_equal(held, h2)  # stable
    assert not set(train) & set(held) and len(train) + len(held) == N  # disjoint, complete
    assert 0 < len(held) < N / 2
    assert not np.array_equal(holdout_rows(reader, 0.25, seed=2)[1], held)
    seen = []
    for rank in (0, 1):  # the hold-out over 2 ranks: each eval sample once
        seen += ids_of(StoreStream(path, signals=[], rows=held, rank=rank, world_size=2,
                                   shuffle=False))
    assert sorted(seen) == sorted(reader.sample_ids[i] for i in held)
    with pytest.raises(ValueError, match="no sample"):
        StoreStream(path, signals=[], split="test")


def test_remote_memory_store_through_cache(store, tmp_path):
    path, reader = store
    mem = fsspec.filesystem("memory")
    mem.put(path, "/stream-remote", recursive=True)
    cache = tmp_path / "cache"
    # rows of the first two segments only: a small read, still several shards per signal
    seg = reader.segments[1]
    kw = dict(signals=["teacher"], batch_tokens=60, rows=np.arange(seg.first_sample + seg.samples))
    local = [(b["sample_ids"], b["signals"]["teacher"]["topk_logprobs"])
             for b in StoreStream(path, **kw)]
    remote = [(b["sample_ids"], b["signals"]["teacher"]["topk_logprobs"])
              for b in StoreStream("memory://stream-remote", cache_dir=str(cache), **kw)]
    assert [r[0] for r in remote] == [x[0] for x in local]
    assert all(torch.equal(r[1], x[1]) for r, x in zip(remote, local))
    assert any(cache.iterdir())  # shards came through the local cache
    mem.rm("/stream-remote", recursive=True)


def test_workers_refuse_a_store_committed_to_after_planning(store):
    path, _ = store
    stream = StoreStream(path, signals=[])
    stream._index_sha, stream._reader = "0" * 64, None  # as if a dump committed meanwhile
    with pytest.raises(RuntimeError, match="committed to after"):
        next(iter(stream))


def test_data_mode_and_store_hold_out_the_same_ids():
    """A --data baseline and a --store student must be evaluated on the same samples."""
    from types import SimpleNamespace

    from student_train.stream import is_held_out
    from student_train.text_data import holdout

    samples = [SimpleNamespace(sample_id=f"notes.jsonl:{i}:abc{i}") for i in range(400)]
    train, held = holdout(samples, 0.2, seed=3)
    assert {s.sample_id for s in held} == {s.sample_id for s in samples
                                           if is_held_out(s.sample_id, 0.2, 3)}
    assert 40 < len(held) < 120 and len(train) + len(held) == 400
