"""student-train with a student whose tokenizer is not the store's (issue 15, sections 3 and 4).

The world: a tiny byte-level BPE teacher tokenizer (tiny_hf), a SentencePiece-style student
tokenizer (metaspace BPE with byte fallback, tiny_tokenizers) trained on the same corpus, a
tiny Llama teacher whose real top-k (and pooled hidden states) are written with the samples'
text and byte spans (store format 2.1) through the core API, and a tiny Llama student over
the student tokenizer. Same-tokenizer runs are covered by tests/test_train.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from logitstore.errors import ConfigError, SchemaMismatchError
from logitstore.format import HiddenSpec, SampledSpec, SignalSpec, StoreSettings, TopKSpec
from logitstore.sample import Sample, Sampled, SignalData, TopK
from logitstore.text_spans import SampleText
from logitstore.toolkit.pooling import pool_hidden
from logitstore.toolkit.token_alignment import align_positions
from logitstore.toolkit.token_spans import tokenize_with_spans
from logitstore.toolkit.tokenizer_identity import tokenizer_fingerprint
from logitstore.toolkit.vocab_map import default_cache_dir
from logitstore.writer import StoreWriter, tokenizer_file_entries
from student_train.cross_inside import INSIDE_REASONS
from tiny_hf import corpus, make_tiny_llama, make_tokenizer
from train_helpers import backward_on_forward_grads, read_metrics

K = 8
N_SAMPLES = 32


def make_student_tokenizer(directory: Path, byte_fallback: bool = True) -> Path:
    """A metaspace BPE with a BOS (half the corpus, 160 tokens; + 256 byte-fallback tokens,
    else an <unk> for what it cannot spell), saved as a PreTrainedTokenizerFast."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    from tiny_tokenizers import metaspace_bpe

    # cuts some words finer than the teacher's tokenizer, some coarser
    backend = metaspace_bpe(corpus()[::2], 160, byte_fallback=byte_fallback)
    bos = backend.token_to_id("<bos>")
    backend.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", bos)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>",
                                        eos_token="<eos>", unk_token="<unk>", pad_token="<unk>")
    tokenizer.save_pretrained(directory)
    return directory


def _texts() -> list[str]:
    texts = corpus()
    step = max(1, len(texts) // N_SAMPLES)
    return [texts[(i * step) % len(texts)] for i in range(N_SAMPLES)]


def _signal(logp: torch.Tensor, hidden: torch.Tensor, kinds: str) -> SignalData:
    top = logp.topk(K, -1)
    sampled = None
    if "sampled" in kinds:
        draws = logp.exp().multinomial(4, replacement=True, generator=torch.Generator()
                                       .manual_seed(0))
        ids = [torch.unique(d).tolist() for d in draws]
        counts = [[int((d == i).sum()) for i in u] for d, u in zip(draws, ids)]
        sampled = Sampled.from_lists(ids, counts, [logp[t, u].tolist()
                                                   for t, u in enumerate(ids)])
    return SignalData(topk=TopK(top.indices.numpy(), top.values.numpy()) if "topk" in kinds
                      else None, sampled=sampled, hidden=hidden.numpy())


def write_store(url: Path, teacher_dir: Path, tokenizer_dir: Path, *, text: bool = True,
                kinds: str = "topk", sampled: SampledSpec | None = None) -> Path:
    """Signals "teacher" (its logits) and "sharp" (logits x 2) of every text, with text and
    byte spans when `text`; `kinds`: "topk" and/or "sampled"."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    spec = SignalSpec(topk=TopKSpec(K) if "topk" in kinds else None,
                      sampled=(sampled or SampledSpec(4)) if "sampled" in kinds else None,
                      hidden=HiddenSpec((-1,), teacher.config.hidden_size, "mean", "float32"))
    files = {p.name: p.read_bytes() for p in Path(tokenizer_dir).iterdir()
             if p.name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")}
    settings = StoreSettings(
        vocab_size=len(tokenizer), tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
        tokenizer_name="tiny-teacher", chunk_tokens=128, segment_tokens=256, chunk_samples=8,
        signals={"teacher": spec, "sharp": spec}, text=text,
        tokenizer_files=tokenizer_file_entries(files) if text else {})
    with StoreWriter(str(url), settings, overwrite=True,
                     tokenizer_files={f"tokenizer/{k}": v for k, v in files.items()}
                     if text else None) as writer:
        for i, line in enumerate(_texts()):
            cut = tokenize_with_spans(tokenizer, line)
            with torch.no_grad():
                out = teacher(torch.from_numpy(cut.ids)[None], output_hidden_states=True)
            logits = out.logits[0].float()
            mask = np.ones(len(cut.ids), bool)
            mask[0] = False
            pooled = pool_hidden(out.hidden_states[-1], torch.from_numpy(mask)[None],
                                 torch.ones(1, len(cut.ids)), "mean")  # [1, d]
            sample = Sample(sample_id=f"s{i:03d}", input_ids=cut.ids, loss_mask=mask,
                            text_spans=SampleText(line, cut.spans, cut.special, cut.role)
                            if text else None)
            sample.signals["teacher"] = _signal(logits.log_softmax(-1), pooled, kinds)
            sample.signals["sharp"] = _signal((2 * logits).log_softmax(-1), pooled, kinds)
            writer.add(sample)
    return url


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("cross"))


def make_world(root: Path, kinds: str = "topk") -> dict:
    """Teacher and student tokenizers and tiny Llamas, and the teacher's store (`kinds`)."""
    from transformers import AutoTokenizer

    teacher_tok = make_tokenizer(root / "teacher_tok")
    teacher = make_tiny_llama(root / "teacher", AutoTokenizer.from_pretrained(teacher_tok),
                              seed=1, initializer_range=0.3)
    student_tok = AutoTokenizer.from_pretrained(make_student_tokenizer(root / "student_tok"))
    student = make_tiny_llama(root / "student", student_tok, seed=0)
    store = write_store(root / "store", teacher, teacher_tok, kinds=kinds)
    return {"root": root, "store": store, "student": student, "teacher": teacher,
            "teacher_tok": teacher_tok, "student_tok": student_tok}


def train_run(world, out: Path, store: Path | None = None, **overrides):
    from student_train.config import resolve_config
    from student_train.train import train

    settings = {"store": str(store or world["store"]), "student": str(world["student"]),
                "out": str(out), "batch_tokens": 256, "lr": 3e-3, "warmup_ratio": 0.0,
                "save_every": 0, "verify_store": "none", "log_every": 1}
    settings.update(overrides)
    return train(resolve_config(None, settings))


def cross_metrics(run: Path) -> list[dict]:
    return [m for m in read_metrics(run) if "train/cross/positions" in m]


# ----------------------------------------------------------------------------- the data path

def test_batches_hold_the_student_cut_and_the_teacher_topk_at_aligned_positions(world):
    from student_train.cross_batch import REASONS, CrossCollate
    from logitstore.reader import StoreReader

    reader = StoreReader(str(world["store"]))
    samples = reader.read_segment(0)[:3]
    collate = CrossCollate(world["student_tok"], ["teacher"], {}, 0.5)
    batch = collate([[s] for s in samples], [[1.0]] * 3, ["teacher", "sharp"], packing=False)
    signal = batch["signals"]["teacher"]
    for b, teacher in enumerate(samples):
        t = teacher.text_spans
        cut = tokenize_with_spans(world["student_tok"], t.text)
        assert batch["input_ids"][b, :len(cut.ids)].tolist() == cut.ids.tolist()
        align = align_positions(t.spans, t.special, cut.spans, cut.special)
        assert 0 < align.aligned < len(cut.ids) - 1  # the tokenizers really differ
        stored = teacher.signals["teacher"].topk
        np.testing.assert_array_equal(signal["topk_ids"][b, align.student_pos].numpy(),
                                      stored.ids[align.teacher_pos])
        np.testing.assert_allclose(signal["topk_logprobs"][b, align.student_pos].numpy(),
                                   stored.logprobs[align.teacher_pos])
        expected = np.zeros(batch["input_ids"].shape[1], bool)
        expected[align.student_pos] = True
        np.testing.assert_array_equal(signal["kd_mask"][b].numpy(), expected)
    assert "kd_mask" not in batch["signals"]["sharp"]  # not a KD signal of this collate
    stats = batch["cross_stats"]
    skipped = sum(stats[f"cross/skipped_{r}"] for r in REASONS)
    assert stats["cross/aligned"] + skipped == stats["cross/positions"] > 0
    assert stats["cross/skipped_inside_teacher_token"] > 0


def test_min_mapped_share_drops_positions_and_counts_them(world):
    from student_train.cross_batch import CrossCollate
    from logitstore.reader import StoreReader

    samples = StoreReader(str(world["store"])).read_segment(0)[:4]
    vocab = 400
    nothing_maps = np.full(vocab, -1, np.int32)
    everything_maps = np.zeros(vocab, np.int32)

    def run(first, share):
        collate = CrossCollate(world["student_tok"], ["teacher"], {"teacher": first}, share)
        return collate([samples], [[1.0] * 4], ["teacher"], packing=True)

    dropped, kept = run(nothing_maps, 0.5), run(everything_maps, 0.5)
    assert not dropped["signals"]["teacher"]["kd_mask"].any()
    stats = dropped["cross_stats"]
    assert stats["cross/skipped_low_mapped_share/teacher"] == stats["cross/aligned"] > 0
    assert stats["cross/mapped_mass/teacher"] == 0.0
    assert kept["signals"]["teacher"]["kd_mask"].sum() > 0
    assert kept["cross_stats"]["cross/skipped_low_mapped_share/teacher"] == 0
    assert kept["cross_stats"]["cross/mapped_mass/teacher"] == pytest.approx(
        kept["cross_stats"]["cross/topk_mass/teacher"])


@pytest.mark.parametrize("loss,full_ce", [("pkl", True), ("uld", True), ("pkl", False)])
def test_objective_matches_a_dense_reference_on_a_cross_batch(world, loss, full_ce,
                                                              monkeypatch):
    """The objective's loss and lm_head/body gradients on a foreign-tokenizer batch (fused
    lm_head with its precomputed gradient for pkl, checkpointed chunks for uld; skipped
    positions masked; CE at weight 1 where no KD target, or 1 - alpha with `full_ce` off)
    equal the textbook computation on full logits, and the fused lm_head uses the gradient
    its forward built (the masked expected gradient was the right one)."""
    from transformers import AutoModelForCausalLM

    from logitstore.reader import StoreReader
    from logitstore.toolkit.vocab_map import vocab_map_for
    from student_train.cross_batch import CrossCollate
    from student_train.cross_token_losses import mapped_kd_sum, project_topk_target, uld_sum
    from student_train.cross_tokenizer import stored_teacher_tokenizer
    from student_train.losses import cross_entropy_per_position
    from student_train.loss_combine import Weights, combine, token_sum_gradients
    from student_train.objective import (DistillationObjective, LossSettings, SignalPlan,
                                         denominators, shifted, target_positions)

    reader = StoreReader(str(world["store"]))
    teacher_tok = stored_teacher_tokenizer(reader, str(world["store"]))
    vmap = vocab_map_for(teacher_tok, world["student_tok"], cache_dir=world["root"] / "maps")
    first = vmap.teacher_to_student_first
    # pkl: with conditioned targets inside teacher tokens (share 0: this flat teacher has some)
    pieces = {"teacher": (vmap.piece_offsets, vmap.piece_ids)} if loss == "pkl" else None
    collate = CrossCollate(world["student_tok"], ["teacher"], {"teacher": first},
                           0.0 if pieces else 0.5, piece_maps=pieces)
    batch = collate([[s] for s in reader.read_segment(0)[:4]], [[1.0]] * 4, ["teacher"],
                    packing=False)
    plans = [SignalPlan("teacher", kd_weight=1.0, target="topk", cross_loss=loss)]
    weights, temperature = Weights(alpha=0.6, full_ce_without_target=full_ce), 2.0

    def grads(model):
        return [p.grad.clone() for p in (model.lm_head.weight, model.model.embed_tokens.weight)]

    torch.manual_seed(0)
    student = AutoModelForCausalLM.from_pretrained(world["student"]).float()
    objective = DistillationObjective(student, plans, LossSettings(chunk_size=7),
                                      vocab_maps={"teacher": (first, vmap.exact)})
    dens = denominators(batch)
    sums = objective(batch, temperature=temperature,
                     sum_grads=token_sum_gradients(dens, plans, weights))
    loss_value, _ = combine(sums, dens, plans, weights)
    backward_on_forward_grads(loss_value, monkeypatch)
    got = grads(student)

    reference = AutoModelForCausalLM.from_pretrained(world["student"]).float()
    logits = reference(input_ids=batch["input_ids"],
                       attention_mask=batch["attention_mask"]).logits
    trained = target_positions(batch)
    kd = trained & batch["signals"]["teacher"]["kd_mask"]
    ids = batch["signals"]["teacher"]["topk_ids"][kd]
    lps = batch["signals"]["teacher"]["topk_logprobs"][kd]
    if loss == "pkl":
        signal = batch["signals"]["teacher"]
        assert signal["inside_mask"][kd].any()
        mapped = project_topk_target(ids, lps, torch.from_numpy(first).long(),
                                     torch.from_numpy(vmap.exact), temperature=temperature,
                                     conditioned_ids=signal["inside_ids"][kd],
                                     conditioned=signal["inside_mask"][kd],
                                     ends_in_other=True)  # LossSettings' default
        kd_sum = mapped_kd_sum(logits[kd], mapped)
    else:
        kd_sum = uld_sum(logits[kd], ids, lps, temperature=temperature)
    labels = shifted(batch["labels"], -100)
    ce = cross_entropy_per_position(logits[trained], labels[trained])
    free = ~kd[trained]  # trained positions without a KD target: the CE has the whole weight
    expected = 0.6 * kd_sum / kd.sum() + (0.4 * ce.sum() + 0.6 * full_ce * ce[free].sum()) \
        / trained.sum()
    expected.backward()
    assert 0 < int(kd.sum()) < int(trained.sum())
    assert float(loss_value) == pytest.approx(float(expected), rel=1e-5)
    for a, b in zip(got, grads(reference)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_a_teacher_cut_short_cuts_the_student_at_the_same_text(world):
    """A teacher sample that stops before the end of its text (cut at its max length): the
    student is cut where the teacher's text stops, so it never trains on unseen text."""
    from dataclasses import replace

    from logitstore.reader import StoreReader
    from student_train.cross_batch import CrossCollate

    full = StoreReader(str(world["store"])).read_segment(0)[0]
    n = 9
    t = full.text_spans
    cut = replace(full, input_ids=full.input_ids[:n], loss_mask=full.loss_mask[:n],
                  text_spans=SampleText(t.text, t.spans[:n], t.special[:n], t.roles[:n]),
                  signals={"teacher": SignalData(topk=TopK(
                      full.signals["teacher"].topk.ids[:n],
                      full.signals["teacher"].topk.logprobs[:n]))})
    collate = CrossCollate(world["student_tok"], ["teacher"], {}, 0.5)
    seen = int(t.spans[n - 1, 1])
    whole = tokenize_with_spans(world["student_tok"], t.text)
    student = collate.student_sample(cut).sample
    kept = len(student.input_ids)
    assert 1 < kept < len(whole.ids)
    assert student.input_ids.tolist() == whole.ids[:kept].tolist()
    assert whole.spans[kept - 1, 0] < seen <= whole.spans[kept, 0]
    assert len(collate.student_sample(full).sample.input_ids) == len(whole.ids)


# ----------------------------------------------------------------------------- end to end

@pytest.mark.parametrize("loss", ["pkl", "uld"])
def test_foreign_student_trains_end_to_end(world, tmp_path, loss):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = tmp_path / loss
    # min_mapped_share 0: this random teacher's flat top-8 leaves every inside position
    # under a conditioned share of 0.5, and the run should train on some of them
    final = train_run(world, run, cross_loss=loss, max_steps=16, alpha=0.9,
                      eval_fraction=0.25, eval_on_start=True, eval_every=0,
                      signals={"teacher": 1.0}, min_mapped_share=0.0)
    evals = [m for m in read_metrics(run) if "eval/kd" in m]
    assert [m["step"] for m in evals] == [0, 16]
    assert evals[-1]["eval/kd"] < evals[0]["eval/kd"] - 0.05, evals
    assert final["eval/kd"] == evals[-1]["eval/kd"]
    rows = cross_metrics(run)
    assert len(rows) == 16
    for m in rows:
        assert 0 < m["train/cross/aligned"] < m["train/cross/positions"]
        assert 0.5 < m["train/cross/aligned_share"] <= 1.0
        assert m["train/cross/skipped_inside_teacher_token"] > 0
    first, last = rows[0]["train/kd/teacher"], rows[-1]["train/kd/teacher"]
    assert np.isfinite(first) and last < first
    if loss == "pkl":
        coverage = [m["train/cross/map_coverage/teacher"] for m in rows]
        assert all(0.5 < c <= 1.0 + 1e-6 for c in coverage)
        # built once per tokenizer pair, cached where every run finds it (tests/conftest.py
        # points the user cache at the session's temporary directory)
        key = json.loads((run / "training_metadata.json").read_text())["source"][
            "cross_tokenizer"]["vocab_map"]["key"]
        assert (default_cache_dir() / f"{key}.npz").is_file()
        assert not (run / "vocab_maps").exists()
        for m in rows:  # inside-token targets (default on): every inside position accounted
            inside = m["train/cross/inside/teacher"] + sum(
                m[f"train/cross/skipped_{why}/teacher"] for why in INSIDE_REASONS)
            assert inside == m["train/cross/skipped_inside_teacher_token"] \
                + m["train/cross/inside_conditioned"]
            # a world without dummy prefixes (the student's metaspace prepends none): the
            # reason is reported, and skips nothing
            assert m["train/cross/skipped_dummy_prefix/teacher"] == 0
            assert m["train/cross/kd_positions/teacher"] == m["train/cross/aligned"] \
                - m["train/cross/skipped_low_mapped_share/teacher"] \
                + m["train/cross/inside/teacher"] \
                - m["train/cross/chain_skipped_unended/teacher"] \
                - m["train/cross/chain_skipped_unranked/teacher"]  # skip_unchained_pairs
        assert sum(m["train/cross/inside/teacher"] for m in rows) > 0  # share 0: some
    else:
        assert "train/cross/map_coverage/teacher" not in rows[0]
        assert "train/cross/inside/teacher" not in rows[0]  # ULD maps nothing: skipped
        assert "train/cross/skipped_dummy_prefix/teacher" not in rows[0]  # ULD keeps them
    meta = json.loads((run / "training_metadata.json").read_text())
    assert meta["source"]["cross_tokenizer"]["loss"] == loss
    assert meta["source"]["cross_tokenizer"]["inside_token_targets"] is (loss == "pkl")
    assert meta["source"]["cross_tokenizer"]["inside_other_bin"] is (loss == "pkl")
    assert meta["source"]["cross_tokenizer"]["chained_token_targets"] is (loss == "pkl")
    assert meta["source"]["cross_tokenizer"]["skip_unchained_pairs"] is (loss == "pkl")
    model = AutoModelForCausalLM.from_pretrained(run / "final")
    saved = AutoTokenizer.from_pretrained(run / "final")
    assert tokenizer_fingerprint(saved) == tokenizer_fingerprint(world["student_tok"])
    assert model.config.vocab_size == len(world["student_tok"])


# cross-tokenizer behaviours added after runs were saved: a saved config lacking one had it off
SWITCHES = ("inside_token_targets", "chained_token_targets", "skip_dummy_prefix_pairs",
            "mix_signals_per_position", "inside_other_bin", "skip_unchained_pairs")


def test_a_resumed_cross_run_continues_the_same_loss_curve(world, tmp_path):
    import shutil

    import yaml

    # a run saved before the SWITCHES existed (its config lacks their keys) had them off:
    # resuming with the defaults (on) is refused, naming the flags that continue as saved,
    # and with those flags the curve continues bit for bit
    settings = dict(max_steps=4, save_every=2, signals={"teacher": 1.0},
                    min_mapped_share=0.0, **dict.fromkeys(SWITCHES, False))
    full = tmp_path / "full"
    train_run(world, full, **settings)
    assert sum(m["train/cross/skipped_inside_teacher_token"] for m in cross_metrics(full)) > 0
    part = tmp_path / "part"
    (part / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "step-00000002",
                    part / "checkpoints" / "step-00000002")
    saved = yaml.safe_load((full / "config.yaml").read_text(encoding="utf-8"))
    for key in SWITCHES:
        assert saved["train"].pop(key) is False
    (part / "config.yaml").write_text(yaml.safe_dump(saved), encoding="utf-8")
    with pytest.raises(ConfigError) as err:
        train_run(world, part, resume="latest", **{**settings, **dict.fromkeys(SWITCHES)})
    for key in SWITCHES:  # each reported, with the flag that continues as saved
        assert f"resume: {key}: run has False, now True (run saved before the setting " \
            f"existed; --no-{key.replace('_', '-')} continues as saved)" in str(err.value)
    assert not (part / "metrics.jsonl").exists()  # refused before any step
    train_run(world, part, resume="latest", **settings)
    curve = [(m["step"], m["train/loss"], m["train/cross/aligned"]) for m in cross_metrics(full)]
    resumed = [(m["step"], m["train/loss"], m["train/cross/aligned"])
               for m in cross_metrics(part)]
    assert resumed == curve[2:] and [s for s, *_ in resumed] == [3, 4]


def test_weighted_signals_and_hidden_alignment_work_across_tokenizers(world, tmp_path):
    run = tmp_path / "two"
    train_run(world, run, max_steps=3, signals={"teacher": 0.7, "sharp": 0.3},
              hidden_weight=0.5, packing=True)
    last = read_metrics(run)[-1]
    for key in ("train/kd/teacher", "train/kd/sharp", "train/hidden",
                "train/cross/map_coverage/teacher", "train/cross/map_coverage/sharp"):
        assert np.isfinite(last[key]), key
    assert last["train/kd"] == pytest.approx(0.7 * last["train/kd/teacher"]
                                             + 0.3 * last["train/kd/sharp"], rel=1e-4)


def test_positions_whose_topk_mass_maps_too_little_are_skipped_and_counted(world, tmp_path):
    """A student that cannot spell the teacher's non-ASCII byte tokens (no byte fallback):
    the map covers part of the top-k mass, positions under min_mapped_share lose their KD
    (counted), the rest train."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(make_student_tokenizer(tmp_path / "tok", False))
    student = make_tiny_llama(tmp_path / "student", tok, seed=0)
    run = tmp_path / "strict"
    train_run({**world, "student": student}, run, max_steps=2, min_mapped_share=0.9,
              signals={"teacher": 1.0})
    rows = cross_metrics(run)
    for m in rows:
        low = m["train/cross/skipped_low_mapped_share/teacher"]
        assert 0 < low < m["train/cross/aligned"]
        unchained = m["train/cross/chain_skipped_unended/teacher"] \
            + m["train/cross/chain_skipped_unranked/teacher"]  # skip_unchained_pairs
        assert m["train/cross/kd_positions/teacher"] == m["train/cross/aligned"] - low \
            + m["train/cross/inside/teacher"] - unchained
        assert 0.3 < m["train/cross/map_coverage/teacher"] < 1.0
        assert np.isfinite(m["train/kd/teacher"])


# ----------------------------------------------------------------------------- refusals

def test_a_store_without_text_is_refused_in_one_paragraph(world, tmp_path):
    store = write_store(tmp_path / "plain", world["teacher"], world["teacher_tok"], text=False)
    with pytest.raises(SchemaMismatchError) as err:
        train_run(world, tmp_path / "run", store=store, max_steps=1)
    message = str(err.value)
    assert "\n" not in message
    assert "holds no sample text nor token byte spans" in message
    assert "dump the store again" in message and "logitstore add-text" in message
    assert tokenizer_fingerprint(world["student_tok"]) in message
    assert not (tmp_path / "run" / "final").exists()


def test_a_store_without_text_exits_1_on_the_command_line(world, tmp_path):
    from click.testing import CliRunner

    from student_train.cli import main

    store = tmp_path / "plain"
    if not store.exists():
        write_store(store, world["teacher"], world["teacher_tok"], text=False)
    result = CliRunner().invoke(main, ["--store", str(store), "--student", str(world["student"]),
                                       "--out", str(tmp_path / "run"), "--max-steps", "1",
                                       "--verify-store", "none"])
    assert result.exit_code == 1, result.output
    assert "logitstore add-text" in result.output


def test_a_foreign_student_learns_from_sampled_draws(world, tmp_path):
    """teacher-dump's default capture (draws, no top-k): each position's draws, read as the
    teacher distribution they estimate, are gathered and mapped like a top-k; KD falls."""
    from logitstore.reader import StoreReader
    from student_train.cross_batch import CrossCollate
    from student_train.cross_sampled import draws_as_topk

    store = write_store(tmp_path / "sampled", world["teacher"], world["teacher_tok"],
                        kinds="sampled")
    sample = StoreReader(str(store)).read_segment(0)[0]
    collate = CrossCollate(world["student_tok"], ["teacher"], {}, 0.5,
                           draw_signals={"teacher": (4, 1.0)})
    student = collate.student_sample(sample)
    gathered = student.sample.signals["teacher"].topk
    want = draws_as_topk(sample.signals["teacher"].sampled, 4, 1.0)
    cut = tokenize_with_spans(world["student_tok"], sample.text_spans.text)
    align = align_positions(sample.text_spans.spans, sample.text_spans.special, cut.spans,
                            cut.special)
    assert 0 < align.aligned < len(cut.ids) - 1
    np.testing.assert_array_equal(gathered.ids[align.student_pos], want.ids[align.teacher_pos])
    np.testing.assert_array_equal(gathered.logprobs[align.student_pos],
                                  want.logprobs[align.teacher_pos])
    run = tmp_path / "run"
    train_run(world, run, store=store, max_steps=12, alpha=0.9, signals={"teacher": 1.0},
              min_mapped_share=0.0)
    rows = cross_metrics(run)
    assert len(rows) == 12 and all(m["train/cross/kd_positions/teacher"] > 0 for m in rows)
    assert all(0.5 < m["train/cross/map_coverage/teacher"] <= 1.0 + 1e-6 for m in rows)
    kd = [m["train/kd/teacher"] for m in rows]
    assert np.isfinite(kd).all() and np.mean(kd[-3:]) < np.mean(kd[:3])


DRAW_CASES = {  # stored draws -> the run's overrides
    "tau 1 without log-probs, trained at T = 2": (SampledSpec(4, logprobs=False),
                                                  {"temperature": 2.0}),
    "tau 2 with log-probs": (SampledSpec(4, temperature=2.0), {}),
    "ULD": (SampledSpec(4), {"cross_loss": "uld"}),
}


@pytest.mark.parametrize("case", list(DRAW_CASES))
def test_draws_train_a_foreign_student_wherever_they_estimate_the_teacher(world, tmp_path,
                                                                          case):
    """Draws at tau = 1 need no log-probs at any training temperature (the estimate is
    tempered like a top-k), unlike a same-tokenizer student's; draws at another tau use
    theirs; ULD sorts the estimate."""
    spec, overrides = DRAW_CASES[case]
    store = write_store(tmp_path / "draws", world["teacher"], world["teacher_tok"],
                        kinds="sampled", sampled=spec)
    run = tmp_path / "run"
    train_run(world, run, store=store, max_steps=2, signals={"teacher": 1.0},
              min_mapped_share=0.0, **overrides)
    rows = cross_metrics(run)
    assert len(rows) == 2 and all(m["train/cross/kd_positions/teacher"] > 0 for m in rows)
    assert all(np.isfinite(m["train/kd/teacher"]) for m in rows)


def test_an_eval_store_of_other_draws_is_refused(world, tmp_path):
    store = write_store(tmp_path / "draws", world["teacher"], world["teacher_tok"],
                        kinds="sampled")
    other = write_store(tmp_path / "hot", world["teacher"], world["teacher_tok"],
                        kinds="sampled", sampled=SampledSpec(4, temperature=2.0))
    with pytest.raises(ConfigError, match="4 draws at temperature 2, store .* 4 at "
                                          "temperature 1; evaluate on a store whose draws"):
        train_run(world, tmp_path / "run", store=store, eval_store=str(other), max_steps=1)


def test_draws_at_another_temperature_without_logprobs_are_refused(world, tmp_path):
    store = write_store(tmp_path / "hot", world["teacher"], world["teacher_tok"],
                        kinds="sampled", sampled=SampledSpec(4, temperature=2.0, logprobs=False))
    with pytest.raises(ConfigError) as err:
        train_run(world, tmp_path / "run", store=store, max_steps=1, temperature=2.0)
    message = str(err.value)
    assert "sample temperature 2" in message and "without log-probs" in message
    assert "T=1 distribution" in message  # the cross path's rule, not the same-tokenizer one
    assert "'teacher'" in message and "'sharp'" in message
    assert not (tmp_path / "run" / "final").exists()


def test_the_early_checks_read_the_students_tokenizer_once(world, tmp_path, monkeypatch):
    """Draws without log-probs at T = 2 (a problem for the same-tokenizer rule, none across
    tokenizers) in a store without text: both early checks need the student's tokenizer."""
    import logitstore.toolkit.hf as hf
    from student_train.config import resolve_config
    from student_train.sources import check_inputs

    store = write_store(tmp_path / "plain_draws", world["teacher"], world["teacher_tok"],
                        text=False, kinds="sampled", sampled=SampledSpec(4, logprobs=False))
    loads = []
    real = hf.load_tokenizer
    monkeypatch.setattr(hf, "load_tokenizer", lambda *a, **k: loads.append(a) or real(*a, **k))
    cfg = resolve_config(None, {"store": str(store), "student": str(world["student"]),
                                "out": str(tmp_path / "run"), "temperature": 2.0})
    with pytest.raises(SchemaMismatchError, match="holds no sample text"):
        check_inputs(cfg)
    assert len(loads) == 1


def test_training_with_a_memory_plan_reads_the_students_tokenizer_once(world, tmp_path,
                                                                       monkeypatch):
    """The early checks, the memory plan (gpu_memory asks for it, across tokenizers it cuts
    the first segment with the student's tokenizer) and the student's load share one read."""
    import logitstore.toolkit.hf as hf
    import student_train.student as student_module

    loads = []
    real = hf.load_tokenizer

    def counted(*a, **k):
        loads.append(a)
        return real(*a, **k)

    monkeypatch.setattr(hf, "load_tokenizer", counted)
    monkeypatch.setattr(student_module, "load_tokenizer", counted)
    train_run(world, tmp_path / "run", max_steps=1, gpu_memory="80GB")
    assert len(loads) == 1
    assert (tmp_path / "run" / "final").exists()
