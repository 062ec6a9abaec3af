"""bench/cross_tokenizer_bench.py: the bits-per-byte evaluator against a hand computation, and
the whole harness (corpus, tokenizers, teachers, stores, students, report) at its tiniest size.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

from xtok_eval import BitsPerByteError, bits_per_byte, text_token_ids, windows  # noqa: E402

TEXTS = ["The patient reports chest pain.", "Café naïve résumé: 12 € — fièvre", "a"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    from xtok_corpus import SPECIALS, train_byte_level

    out = tmp_path_factory.mktemp("tok") / "C"
    corpus = ["The patient reports chest pain radiating to the left arm.",
              "Café naïve résumé fièvre", "twelve euros 12 €"] * 20
    train_byte_level(corpus, 300, SPECIALS["C"], out)
    return AutoTokenizer.from_pretrained(out)


class MarkovLM:
    """A causal LM whose logits at a position depend on that position's token only:
    logits[b, t] = table[input_ids[b, t]] (a fixed random table)."""

    def __init__(self, vocab: int, seed: int = 0):
        import torch

        self.table = torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(seed))
        self.training = False

    def eval(self):
        return self

    def train(self, mode=True):
        self.training = mode
        return self

    def __call__(self, input_ids, attention_mask, position_ids, use_cache):
        from types import SimpleNamespace

        return SimpleNamespace(logits=self.table[input_ids])


def hand_bits_per_byte(model: MarkovLM, tokenizer, texts, context: int) -> float:
    """The definition, written out: every text token t_k predicted from the token before it
    in its window ([BOS, t_0 .. t_{w-1}] windows of context - 1 text tokens)."""
    total, n_bytes = 0.0, 0
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        n_bytes += len(text.encode("utf-8"))
        for k, token in enumerate(ids):
            before = tokenizer.bos_token_id if k % (context - 1) == 0 else ids[k - 1]
            row = [float(x) for x in model.table[before]]
            log_z = math.log(sum(math.exp(x) for x in row))
            total += log_z - row[token]
    return total / math.log(2) / n_bytes


@pytest.mark.parametrize("context", [512, 4, 2])
def test_bits_per_byte_matches_the_hand_computation(tokenizer, context):
    model = MarkovLM(len(tokenizer))
    got = bits_per_byte(model, tokenizer, TEXTS, context=context, batch_tokens=16)
    assert got["bits_per_byte"] == pytest.approx(hand_bits_per_byte(model, tokenizer, TEXTS,
                                                                     context), rel=1e-6)  # float32 log-softmax
    assert got["bytes"] == sum(len(t.encode("utf-8")) for t in TEXTS)  # UTF-8, not characters
    assert got["tokens"] == sum(len(tokenizer(t, add_special_tokens=False)["input_ids"])
                                for t in TEXTS)


def test_a_uniform_model_costs_log2_vocabulary_bits_per_token(tokenizer):
    model = MarkovLM(len(tokenizer))
    model.table.zero_()
    got = bits_per_byte(model, tokenizer, TEXTS, context=5)
    assert got["bits_per_byte"] == pytest.approx(
        got["tokens"] * math.log2(len(tokenizer)) / got["bytes"], rel=1e-6)


def test_windows_cover_every_text_token_once():
    import numpy as np

    ids = np.arange(10, 17)
    pieces = windows(ids, bos_id=1, context=4)
    assert [p.tolist() for p in pieces] == [[1, 10, 11, 12], [1, 13, 14, 15], [1, 16]]
    assert windows(ids[:0], bos_id=1, context=4) == []
    with pytest.raises(BitsPerByteError, match="context of at least 2"):
        windows(ids, bos_id=1, context=1)


def test_text_tokens_leave_out_bos(tokenizer):
    ids = text_token_ids(tokenizer, TEXTS[0])
    assert tokenizer.bos_token_id not in ids.tolist()
    assert tokenizer.decode(ids.tolist()) == TEXTS[0]


def test_refuses_a_tokenizer_without_bos_and_an_inexact_one(tokenizer, tmp_path):
    from tokenizers import normalizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    no_bos = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    no_bos.bos_token = None
    with pytest.raises(BitsPerByteError, match="BOS"):
        bits_per_byte(MarkovLM(len(tokenizer)), no_bos, TEXTS, context=8)
    backend = tokenizer.backend_tokenizer
    backend.normalizer = normalizers.Lowercase()  # rewrites the text: spans are not exact
    lower = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=tokenizer.bos_token)
    with pytest.raises(BitsPerByteError, match="spell its .* UTF-8 bytes exactly"):
        bits_per_byte(MarkovLM(len(tokenizer)), lower, TEXTS, context=8)


SINGLE_A, SINGLE_B, TWO = "xkd-pkl", "xkd-B-pkl", "xkd-AB-pkl"


def fake_runs(bpb: dict[str, list[float]], counts: dict | None = None) -> list[dict]:
    """Runs as train_students + run_seeds leave them, with the given held-out bits per byte
    per student and seed (every other figure a constant)."""
    names = list(bpb)
    return [{"seed": seed, "steps": 10,
             "heldout": {n: {"bits_per_byte": bpb[n][seed], "nll_per_token": 1.0,
                             "tokens_per_byte": 0.3} for n in names},
             "batch_kind": {n: n for n in names}, "step_s": {n: 0.1 for n in names},
             "collate_s": {n: 0.01 for n in names}, "tokens": {n: 1000 for n in names},
             "cross_counts": counts or {}, "cross_provenance": {}}
            for seed in range(len(next(iter(bpb.values()))))]


BASE = {"ce-A": [1.30, 1.28, 1.26], "kd-A": [1.10, 1.09, 1.11], "ce-C": [1.70, 1.65, 1.68],
        SINGLE_A: [1.60, 1.62, 1.61], SINGLE_B: [1.66, 1.67, 1.68]}


@pytest.mark.parametrize("two, met, verdict", [
    ([1.55, 1.58, 1.56], True, "met"),              # below xkd-pkl in every seed
    ([1.65, 1.66, 1.67], False, "not met"),         # above it in every seed
    ([1.58, 1.66, 1.60], None, "not resolved")])    # one seed above, two below: CI holds 0
def test_two_teachers_are_judged_against_the_better_single_one_paired(two, met, verdict):
    from xtok_report import render, summarise

    runs = fake_runs({**BASE, TWO: two})
    summary = summarise(runs, {})
    t = summary["two_teachers"]
    assert t["runnable"] and t["better_single"] == SINGLE_A  # lower mean than xkd-B-pkl
    assert t["met"] is met and t["verdict"] == verdict
    diffs = [a - b for a, b in zip(two, BASE[SINGLE_A])]
    assert t["vs_single"][SINGLE_A]["values"] == pytest.approx(diffs)
    assert t["vs_single"][SINGLE_B]["mean"] == pytest.approx(
        sum(two) / 3 - sum(BASE[SINGLE_B]) / 3)
    assert TWO in summary["goals"]  # its gap-closed share and step cost, as any cross row
    result = {"summary": summary, "settings": {"steps": 10, "top_k": 32,
                                               "train": {"batch_tokens": 1024}},
              "teachers": {}, "corpus": {k: {"records": 1, "bytes": 1}
                                         for k in ("teacher", "transfer", "heldout")}}
    assert f"(goal: below 0: **{verdict}**)" in render(result)


def test_the_confidence_mixture_student_is_judged_on_its_own_and_against_equal_weights():
    from xtok_report import CONF, render, summarise

    conf = [1.55, 1.58, 1.56]
    summary = summarise(fake_runs({**BASE, TWO: [1.65, 1.66, 1.67], CONF: conf}), {})
    assert summary["two_teachers"]["verdict"] == "not met"
    t = summary["two_teachers_conf"]
    assert t["name"] == CONF and t["verdict"] == "met" and t["better_single"] == SINGLE_A
    assert t["vs_single"][TWO]["values"] == pytest.approx([-0.10, -0.08, -0.11])
    result = {"summary": summary, "settings": {"steps": 10, "top_k": 32,
                                               "train": {"batch_tokens": 1024}},
              "teachers": {}, "corpus": {k: {"records": 1, "bytes": 1}
                                         for k in ("teacher", "transfer", "heldout")}}
    text = render(result)
    assert f"({CONF}, signals A:0.5, B:0.5, each times its probability" in text
    assert "(goal: below 0: **met**)" in text and "(goal: below 0: **not met**)" in text


def test_the_blend_two_teacher_student_is_judged_against_the_better_of_a_with_either_weight():
    from xtok_report import TWO_BLEND, render, summarise

    a_blend = [1.57, 1.59, 1.58]  # teacher A with CE at 1 - alpha: better than xkd-pkl
    summary = summarise(fake_runs({**BASE, "xkd-pkl-blend": a_blend,
                                   TWO_BLEND: [1.58, 1.60, 1.59]}), {})
    t = summary["two_teachers_blend"]
    assert t["better_single"] == "xkd-pkl-blend" and t["verdict"] == "not met"
    assert t["vs_single"][SINGLE_A]["values"] == pytest.approx([-0.02, -0.02, -0.02])
    assert not summarise(fake_runs({**BASE, TWO_BLEND: a_blend}), {})[
        "two_teachers_blend"]["runnable"]  # xkd-pkl-blend not run: no verdict
    result = {"summary": summary, "settings": {"steps": 10, "top_k": 32,
                                               "train": {"batch_tokens": 1024}},
              "teachers": {}, "corpus": {k: {"records": 1, "bytes": 1}
                                         for k in ("teacher", "transfer", "heldout")}}
    assert f"({TWO_BLEND}, signals A:0.5, B:0.5, CE at 1 - alpha where no target)" \
        in render(result)


def test_a_run_without_the_two_teacher_student_says_why():
    """A JSON of a run before store AB existed (or --no-b) re-renders with the reason."""
    from xtok_report import NO_TWO_TEACHERS, summarise

    t = summarise(fake_runs(BASE), {})["two_teachers"]
    assert t["runnable"] is False and t["reason"] == NO_TWO_TEACHERS and t["met"] is None


def test_without_ce_a_the_share_of_student_as_kd_gain_is_a_dash_with_the_reason():
    from xtok_report import goal_lines, summarise

    with_a = summarise(fake_runs(BASE), {})["goals"][SINGLE_A]["own_ce_gain"]
    gains = [c - x for c, x in zip(BASE["ce-C"], BASE[SINGLE_A])]
    a_gains = [c - k for c, k in zip(BASE["ce-A"], BASE["kd-A"])]
    assert with_a["share"] == pytest.approx(sum(gains) / sum(a_gains))
    without = summarise(fake_runs({k: v for k, v in BASE.items() if k != "ce-A"}), {})
    share = without["goals"][SINGLE_A]["own_ce_gain"]
    assert share["share"] is None and share["reason"] == "ce-A not run"
    assert without["goals"][SINGLE_A]["gap_closed"]["share"] is not None  # kd-A, ce-C ran
    line = goal_lines(without)[0]
    assert "is – (ce-A not run) of student A's KD gain over ce-A" in line
    assert "not resolved" not in line


def test_alignment_of_two_teachers_is_reported_per_signal():
    from xtok_report import alignment_lines, summarise

    counts = {TWO: {"cross/positions": 100.0, "cross/aligned": 50.0,
                    "cross/aligned/a": 50.0, "cross/kd_positions/a": 48.0,
                    "cross/topk_mass/a": 40.0, "cross/mapped_mass/a": 30.0,
                    "cross/aligned/b": 40.0, "cross/kd_positions/b": 40.0,
                    "cross/skipped_inside_teacher_token": 50.0}}
    summary = summarise(fake_runs({**BASE, TWO: [1.6, 1.6, 1.6]}, counts), {})
    row = summary["alignment"][TWO]
    assert row["aligned_share"] == pytest.approx(0.5)  # summed over the 3 seeds: shares same
    assert row["per_signal"]["a"] == pytest.approx({"aligned_share": 0.5, "kd_share": 0.48,
                                                    "map_coverage": 0.75})
    assert row["per_signal"]["b"] == pytest.approx({"aligned_share": 0.4, "kd_share": 0.4})
    assert "kd_share" not in row and "map_coverage" not in row  # no one signal speaks for it
    text = "\n".join(alignment_lines(summary))
    assert "signal a: 50.0 % aligned with its tokenization, 48.0 % given its target, map " \
           "coverage 75.0 %" in text
    assert "signal b: 40.0 % aligned with its tokenization, 40.0 % given its target" in text


@pytest.mark.slow
def test_the_harness_runs_end_to_end_at_its_tiniest_size(tmp_path):
    """Corpus, three tokenizers, two teachers and their stores (subprocesses of the real
    tools), store AB (teacher B added to a copy of store A by `teacher-dump --signal`), every
    student variant (the ablations included) over 2 seeds, bits per byte, summary, markdown
    and plot."""
    from xtok_train import ALL_VARIANTS
    from cross_tokenizer_bench import main

    out = tmp_path / "x.json"
    main(["--size", "tiny", "--seeds", "2", "--steps", "2", "--teacher-steps", "2",
          "--transfer-records", "12", "--heldout-records", "4", "--top-k", "8",
          "--cache", str(tmp_path / "cache"), "--work", str(tmp_path / "work"),
          "--out", str(out), "--markdown", str(tmp_path / "x.md"),
          "--variants", ",".join(ALL_VARIANTS)])
    result = json.loads(out.read_text())
    summary = result["summary"]
    assert set(summary["methods"]) == set(ALL_VARIANTS)  # every one (their count: fast test)
    for row in summary["methods"].values():
        assert 0 < row["bits_per_byte"]["mean"] < 20 and row["bits_per_byte"]["n"] == 2
    assert set(summary["alignment"]) == {n for n in ALL_VARIANTS if n.startswith("xkd-")}
    # the draws students: each against the same-tokenizer student of the same target
    assert summary["goals"]["xkd-pkl-draws"]["reference"] == "kd-A-draws"
    assert summary["goals"]["xkd-pkl"]["reference"] == "kd-A"
    assert all(run["loss_first_last"]["kd-A-draws"] != run["loss_first_last"]["kd-A"]
               for run in result["runs"])
    for run in result["runs"]:  # measured with its own tokenizer
        assert run["heldout"]["kd-A-draws"]["tokens_per_byte"] == \
            run["heldout"]["kd-A"]["tokens_per_byte"] != run["heldout"]["ce-C"]["tokens_per_byte"]
    for row in summary["alignment"].values():
        assert 0 < row["aligned_share"] <= 1
    # keeping unreadable chains' plain targets: the aligned positions plus the inside ones
    inside = summary["alignment"]["xkd-pkl-keep-unchained"]
    aligned_only = summary["alignment"]["xkd-pkl-aligned"]
    assert inside["kd_share"] == pytest.approx(aligned_only["kd_share"]
                                               + inside.get("inside_share", 0.0))
    assert "inside_share" not in aligned_only
    for name in ("xkd-B-pkl-aligned", "xkd-AB-pkl-aligned"):  # no inside targets, no chains
        assert not {"inside_share", "chained_share"} & set(summary["alignment"][name])
    for name in ("xkd-pkl-noinside", "xkd-B-pkl-noinside", "xkd-AB-pkl-noinside"):
        assert "inside_share" not in summary["alignment"][name]  # chains kept
    both = summary["two_teachers_priority_blend"]  # against A with either CE weight, and B
    assert set(both["single_bpb"]) == {"xkd-pkl", "xkd-pkl-blend", "xkd-B-pkl"}
    noinside = summary["two_teachers_noinside"]  # against each single teacher, either way
    assert set(noinside["single_bpb"]) == {"xkd-pkl", "xkd-pkl-noinside", "xkd-B-pkl-noinside"}
    assert 0 < summary["alignment"]["xkd-pkl"]["map_coverage"] <= 1
    assert "map_coverage" not in summary["alignment"]["xkd-uld"]  # ULD maps nothing
    assert "chained_share" not in summary["alignment"]["xkd-pkl-unchained"]
    for run in result["runs"]:  # the same batches: keep trains where xkd-pkl skips
        provenance = run["cross_provenance"]
        assert provenance["pkl"]["cross_tokenizer"]["skip_unchained_pairs"] is True
        assert provenance["pkl-keep-unchained"]["cross_tokenizer"]["skip_unchained_pairs"] \
            is False
        skip, keep = run["cross_counts"]["xkd-pkl"], run["cross_counts"]["xkd-pkl-keep-unchained"]
        assert keep["cross/kd_positions/topk8"] - skip["cross/kd_positions/topk8"] == \
            skip["cross/chain_skipped_unended/topk8"] + skip["cross/chain_skipped_unranked/topk8"]
    assert two_signal_counts(result, "xkd-AB-pkl") == \
        two_signal_counts(result, "xkd-AB-pkl-means") == \
        two_signal_counts(result, "xkd-AB-pkl-conf") == \
        two_signal_counts(result, "xkd-AB-pkl-priority")  # the same batches, other weights
    assert summary["two_teachers_conf"]["name"] == "xkd-AB-pkl-conf"
    assert summary["two_teachers_priority"]["name"] == "xkd-AB-pkl-priority"
    assert all(run["loss_first_last"]["xkd-AB-pkl-priority"] != run["loss_first_last"][TWO]
               for run in result["runs"])  # A's target alone where both teachers give one
    draws = summary["two_teachers_draws"]  # judged against the single teachers' draws
    assert set(draws["single_bpb"]) == {"xkd-pkl-draws", "xkd-B-pkl-draws"}
    assert summary["goals"]["xkd-AB-pkl-draws"]["reference"] == "kd-A-draws"
    two = summary["two_teachers"]
    assert two["runnable"] is True and two["verdict"] in ("met", "not met", "not resolved")
    assert set(summary["alignment"][TWO]["per_signal"]) == {"topk8", "topk8-B"}
    store_ab = result["two_teacher_store"]
    assert store_ab["signals"] == ["topk8", "topk8-B"]
    assert "teacher_dump" in store_ab["command"] and "--data" not in store_ab["command"]
    assert_store_ab_holds_both_teachers(Path(store_ab["url"]), Path(result["stores"]["B"]["url"]))
    assert (tmp_path / "x.png").stat().st_size > 0
    assert set(summary["exact_coverage"]) == {"A", "B"}
    for shares in summary["exact_coverage"].values():
        assert sum(shares.values()) == pytest.approx(1.0)
    text = (tmp_path / "x.md").read_text()
    assert "two teachers A + B into C** (xkd-AB-pkl, signals A:0.5, B:0.5)" in text
    again = main(["--from-json", str(out), "--out", str(tmp_path / "again.json")])
    assert again["table"] == result["table"]  # re-rendered from the runs alone


def two_signal_counts(result: dict, name: str) -> list[dict]:
    """A variant's alignment counts per seed (the mixture changes the loss, not the data)."""
    return [run["cross_counts"][name] for run in result["runs"]]


def assert_store_ab_holds_both_teachers(store_ab: Path, store_b: Path) -> None:
    """Store AB: A's ids and signal, and B's signal on B's own tokenization equal to what
    teacher B's own store holds for the same sample where both stores keep the same text
    (store A keeps the text its teacher saw: a record over A's max length is cut, and B
    re-cuts that shorter text in store AB)."""
    import numpy as np

    from logitstore.reader import StoreReader

    ab, b = StoreReader(str(store_ab)), StoreReader(str(store_b))
    assert ab.settings.signals["topk8-B"].tokenization is not None
    assert ab.settings.tokenizer_fingerprint != b.settings.tokenizer_fingerprint
    mine = {s.sample_id: s for s in ab.read_segment(0, ["topk8", "topk8-B"])}
    theirs = {s.sample_id: s for s in b.read_segment(0, ["topk8"])}
    shared = sorted(i for i in set(mine) & set(theirs)
                    if mine[i].text_spans.text == theirs[i].text_spans.text)
    assert shared
    for sid in shared:
        cut = mine[sid].tokenizations[ab.settings.signals["topk8-B"].tokenization]
        np.testing.assert_array_equal(cut.input_ids, theirs[sid].input_ids)
        # values, not ids: other batch neighbours may swap two near-equal logits' ranks
        np.testing.assert_allclose(mine[sid].signals["topk8-B"].topk.logprobs,
                                   theirs[sid].signals["topk8"].topk.logprobs, atol=1e-4)


def test_each_variant_name_says_what_its_student_is():
    from xtok_train import (ABLATIONS, ALL_VARIANTS, DEFAULT_VARIANTS, TARGETS,
                            TWO_TEACHER_VARIANTS, _signal_mixture, _switches)

    assert len(set(ALL_VARIANTS)) == len(ALL_VARIANTS) == 33
    assert set(DEFAULT_VARIANTS) == set(ALL_VARIANTS) - set(ABLATIONS)
    assert set(TARGETS) == {"kd-A-draws", "xkd-pkl-draws", "xkd-B-pkl-draws", "xkd-AB-pkl-draws"}
    assert len(TWO_TEACHER_VARIANTS) == 11 and "xkd-AB-pkl-priority" in TWO_TEACHER_VARIANTS
    on = {"inside_token_targets": True, "chained_token_targets": True, "inside_other_bin": True,
          "skip_unchained_pairs": True, "ce_without_target": "full"}
    for student in ("xkd-pkl", "xkd-B-pkl", "xkd-AB-pkl"):
        assert _switches(student) == _switches(f"{student}-draws") == on
        assert _switches(f"{student}-aligned") == {**on, "inside_token_targets": False,
                                                   "chained_token_targets": False}
        assert _switches(f"{student}-noinside") == {**on, "inside_token_targets": False}
        assert _switches(f"{student}-renorm") == {**on, "inside_other_bin": False}
        assert _switches(f"{student}-keep-unchained") == {**on, "skip_unchained_pairs": False}
        assert _switches(f"{student}-blend") == {**on, "ce_without_target": "blend"}
    assert _switches("xkd-pkl-unchained") == {**on, "chained_token_targets": False}
    assert _switches("xkd-AB-pkl-priority-blend") == {**on, "ce_without_target": "blend"}
    assert [_signal_mixture(n) for n in ("xkd-AB-pkl", "xkd-AB-pkl-conf", "xkd-AB-pkl-priority",
                                         "xkd-AB-pkl-priority-blend", "xkd-AB-pkl-blend")] == \
        ["weights", "confidence", "priority", "priority", "weights"]


def test_kd_a_drop_masks_the_same_random_share_of_positions_on_every_run():
    import torch
    from xtok_train import KD_DROP_SHARE, _dropping_collate

    def collate(raw):  # a collate of the raw rows, as _raw_collate makes
        return {"input_ids": torch.zeros(4, 1000, dtype=torch.long),
                "signals": {"t": {"topk_ids": None}}}

    raw = {"rows": [], "weights": [], "signals": ["t"], "packing": True}
    first, again = _dropping_collate(collate, "t", 3), _dropping_collate(collate, "t", 3)
    masks = [first(raw)["signals"]["t"]["kd_mask"] for _ in range(2)]
    assert masks[0].shape == (4, 1000) and masks[0].dtype == torch.bool
    assert abs((~masks[0]).float().mean().item() - KD_DROP_SHARE) < 0.015
    assert not torch.equal(masks[0], masks[1])  # a new draw per batch ...
    assert torch.equal(again(raw)["signals"]["t"]["kd_mask"], masks[0])  # ... the same per seed
    assert not torch.equal(_dropping_collate(collate, "t", 4)(raw)["signals"]["t"]["kd_mask"],
                           masks[0])


def test_variants_are_chosen_by_name_and_the_references_are_required():
    from cross_tokenizer_bench import parse_args
    from xtok_train import DEFAULT_VARIANTS

    assert parse_args([]).variants == DEFAULT_VARIANTS
    assert "xkd-pkl-aligned" not in DEFAULT_VARIANTS
    picked = parse_args(["--variants", "ce-C, kd-A,xkd-pkl-aligned"]).variants
    assert picked == ("ce-C", "kd-A", "xkd-pkl-aligned")
    for bad in ("ce-C,kd-A,xkd-nope", "xkd-pkl,kd-A"):
        with pytest.raises(SystemExit):
            parse_args(["--variants", bad])


def _fake_result(seeds: list[int], students: list[str], teacher_steps: int = 400,
                 shift: float = 0.0) -> dict:
    """A cross_tokenizer_bench result's skeleton: what bench/xtok_merge.py reads (held-out
    bits per byte: the seed + shift + the student's place in `students` / 10)."""
    def run(seed):
        per = {s: float(seed) for s in students}
        heldout = {s: {"bits_per_byte": seed + shift + i / 10} for i, s in enumerate(students)}
        return {"seed": seed, "step_s": per, "batch_kind": {s: f"K-{s}" for s in students},
                "tokens": per, "loss_first_last": per, "heldout": heldout,
                "cross_provenance": {s[len("xkd-"):]: {"loss": "pkl"} for s in students
                                     if s.startswith("x")},  # keyed by cross setup
                "cross_counts": {s: {} for s in students if s.startswith("x")},
                "collate_s": {f"K-{s}": 0.1 for s in students}}
    return {"corpus": {"dir": "/a", "key": "k"}, "teachers": {"A": {"steps": teacher_steps,
                                                                   "path": "/p"}},
            "settings": {"top_k": 32, "seeds": len(seeds)}, "command": f"run {seeds}",
            "wall_s": 1.0, "runs": [run(s) for s in seeds]}


def test_merge_keeps_every_seed_of_the_students_all_runs_trained():
    from xtok_merge import merge

    merged = merge([_fake_result([0, 1], ["ce-C", "kd-A", "xkd-pkl", "xkd-uld"]),
                    _fake_result([5], ["ce-C", "kd-A", "xkd-pkl"])])
    assert [r["seed"] for r in merged["runs"]] == [0, 1, 5]
    assert merged["settings"]["seeds"] == 3
    for run in merged["runs"]:
        assert set(run["heldout"]) == {"ce-C", "kd-A", "xkd-pkl"} == set(run["step_s"])
        assert set(run["collate_s"]) == {"K-ce-C", "K-kd-A", "K-xkd-pkl"}
        assert set(run["cross_counts"]) == {"xkd-pkl"}
    with pytest.raises(ValueError, match="repeat seeds"):
        merge([_fake_result([0, 1], ["ce-C"]), _fake_result([1], ["ce-C"])])
    with pytest.raises(ValueError, match="another setup"):
        merge([_fake_result([0], ["ce-C"]), _fake_result([1], ["ce-C"], teacher_steps=2)])


def test_join_gives_each_seed_the_students_of_every_run_of_those_seeds():
    from xtok_merge import join

    base = _fake_result([0, 1], ["ce-C", "kd-A", "xkd-pkl"])
    extra = _fake_result([0, 1], ["ce-C", "kd-A", "xkd-AB-pkl-conf"])
    extra["settings"]["two_teacher_weights"] = [0.5, 0.5]  # the default, written out
    joined = join([base, extra])
    assert [r["seed"] for r in joined["runs"]] == [0, 1]
    for seed, run in zip((0, 1), joined["runs"]):
        assert set(run["heldout"]) == {"ce-C", "kd-A", "xkd-pkl", "xkd-AB-pkl-conf"}
        assert run["heldout"]["xkd-AB-pkl-conf"]["bits_per_byte"] == seed + 0.2
        assert set(run["collate_s"]) == {"K-ce-C", "K-kd-A", "K-xkd-pkl", "K-xkd-AB-pkl-conf"}
        assert set(run["cross_provenance"]) == {"pkl", "AB-pkl-conf"}
    assert set(base["runs"][0]["heldout"]) == {"ce-C", "kd-A", "xkd-pkl"}  # inputs untouched
    with pytest.raises(ValueError, match="student ce-C has held-out bits per byte"):
        join([base, _fake_result([0, 1], ["ce-C", "xkd-uld"], shift=0.5)])
    other = _fake_result([0, 1], ["ce-C", "kd-A", "xkd-pkl"])
    other["runs"][1]["cross_provenance"]["pkl"] = {"loss": "uld"}
    with pytest.raises(ValueError, match="seed 1: cross setup 'pkl' differs"):
        join([base, other])
    with pytest.raises(ValueError, match="needs the same seeds"):
        join([base, _fake_result([0, 2], ["ce-C", "xkd-uld"])])
    with pytest.raises(ValueError, match="another setup"):
        join([base, _fake_result([0, 1], ["ce-C"], teacher_steps=2)])


def test_weight_choice_takes_the_lowest_mean_validation_ce_and_says_when_it_is_noise(
        tmp_path, monkeypatch):
    import xtok_weights

    ce = {(0.5, 0): 4.30, (0.5, 1): 4.40, (0.8, 0): 4.20, (0.8, 1): 4.35}
    monkeypatch.setattr(xtok_weights, "initial_student", lambda cfg, seed, out: out)
    monkeypatch.setattr(xtok_weights, "train", lambda args, w, seed, student: {
        "weight_a": w, "seed": seed, "eval_ce": ce[(w, seed)]})
    out = tmp_path / "w.json"
    result = xtok_weights.main(["--store", "s", "--student-config", "c", "--preset", "p",
                                "--weights", "0.5,0.8", "--work", str(tmp_path / "work"),
                                "--out", str(out)])
    assert result["best_weight_a"] == 0.8
    assert result["mean_eval_ce"] == pytest.approx({"0.5": 4.35, "0.8": 4.275})
    assert result["within_noise"] is True  # 0.075 apart, seeds 0.125 apart: not resolved
    assert json.loads(out.read_text())["best_weight_a"] == 0.8
    with pytest.raises(SystemExit):
        xtok_weights.main(["--store", "s", "--student-config", "c", "--preset", "p",
                           "--weights", "0.5,1", "--out", str(out)])

