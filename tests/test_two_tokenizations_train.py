"""student-train on a store holding two teachers of different tokenizers (format 2.2): each
signal aligned by its own tokenization's spans and mapped with its own vocabulary map,
weighted with --signals, into a student of a third tokenizer; per-signal metrics."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

pytest.importorskip("torch")

from logitstore.reader import StoreReader  # noqa: E402
from teacher_dump.dump import run_dump  # noqa: E402
from teacher_dump.ranks import RankContext  # noqa: E402
from test_cross_tokenizer_train import make_student_tokenizer  # noqa: E402
from test_two_tokenizations_dump import config, other_tokenizer, teachers  # noqa: E402,F401
from tiny_hf import make_tiny_llama  # noqa: E402
from train_helpers import read_metrics  # noqa: E402


@pytest.fixture(scope="module")
def world(teachers):  # noqa: F811
    from transformers import AutoTokenizer

    root = teachers["root"]
    store = root / "two_teachers"
    shutil.copytree(teachers["store"], store)
    run_dump(config(teachers, store), ranks=RankContext(), progress=False)
    third = AutoTokenizer.from_pretrained(make_student_tokenizer(root / "third_tok"))
    return {"store": store, "root": root,
            "student": make_tiny_llama(root / "student", third, seed=0),
            "student_b": make_tiny_llama(root / "student_b", other_tokenizer(), seed=0)}


def train_run(world, out, student=None, **overrides):
    from student_train.config import resolve_config
    from student_train.train import train

    settings = {"store": str(world["store"]), "student": str(student or world["student"]),
                "out": str(out), "batch_tokens": 256, "lr": 3e-3, "warmup_ratio": 0.0,
                "save_every": 0, "verify_store": "none", "log_every": 1, "alpha": 0.9}
    settings.update(overrides)
    return train(resolve_config(None, settings))


def test_two_teachers_of_different_tokenizers_train_a_third_tokenizer_student(world,
                                                                              tmp_path):
    run = tmp_path / "two"
    train_run(world, run, max_steps=6, signals={"llama": 0.6, "other": 0.4},
              eval_store=str(world["store"]), eval_on_start=True, eval_every=0)
    evals = [m for m in read_metrics(run) if "eval/kd" in m]
    assert [m["step"] for m in evals] == [0, 6]
    assert evals[-1]["eval/kd"] < evals[0]["eval/kd"], evals  # both teachers, whole store
    rows = [m for m in read_metrics(run) if "train/cross/positions" in m]
    assert len(rows) == 6
    for m in rows:
        assert m["train/kd"] == pytest.approx(0.6 * m["train/kd/llama"]
                                              + 0.4 * m["train/kd/other"], rel=1e-4)
        for name in ("llama", "other"):  # aligned only inside the bytes a teacher covers
            assert 0 <= m[f"train/cross/aligned_share/{name}"] <= \
                m[f"train/cross/coverage/{name}"] <= 1.0
        assert m["train/cross/coverage/llama"] == 1.0
        assert m["train/cross/aligned_share/llama"] > 0.3
        assert 0.5 < m["train/cross/map_coverage/llama"] <= 1.0 + 1e-6
    aligned_other = [m for m in rows if m["train/cross/aligned_share/other"] > 0]
    assert aligned_other  # (a batch of the chat alone: its cut covers no answer byte)
    assert all(0.5 < m["train/cross/map_coverage/other"] <= 1.0 + 1e-6 for m in aligned_other)
    # the second teacher cut its long samples at 24 of its tokens: less of the text is covered
    assert min(m["train/cross/coverage/other"] for m in rows) < 1.0
    assert all(np.isfinite(m["train/kd/other"]) for m in rows)
    maps = json.loads((run / "training_metadata.json").read_text())["source"][
        "cross_tokenizer"]["vocab_maps"]
    assert maps["llama"]["key"] != maps["other"]["key"]  # one map per teacher tokenizer


def test_a_student_of_the_second_teachers_tokenizer_aligns_with_it_wherever_covered(
        world, tmp_path):
    run = tmp_path / "same_as_other"
    train_run(world, run, student=world["student_b"], max_steps=2, signals={"other": 1.0})
    for m in (m for m in read_metrics(run) if "train/cross/positions" in m):
        assert m["train/cross/map_coverage/other"] == pytest.approx(1.0)
        # the same tokenizer (a chat rendered by the same template): every covered position
        assert m["train/cross/aligned_share/other"] == \
            pytest.approx(m["train/cross/coverage/other"])


def test_sampled_targets_of_a_foreign_tokenization_train_through_its_map(world, tmp_path):
    """The second teacher's draws (on its own tokenization) are a KD target too: read as the
    distribution they estimate, aligned by that tokenization's spans, mapped by its map."""
    reader = StoreReader(str(world["store"]))
    assert reader.settings.signals["other"].sampled is not None
    run = tmp_path / "sampled"
    train_run(world, run, max_steps=2, signals={"other": 1.0}, target="sampled")
    rows = [m for m in read_metrics(run) if "train/cross/positions" in m]
    assert rows and all(m["train/cross/kd_positions/other"] > 0 for m in rows)
    assert all(np.isfinite(m["train/kd/other"]) for m in rows)


def _chat_sample(world):
    chats = [s for s in StoreReader(str(world["store"])).iter_samples()
             if s.text_spans.roles.any()]
    assert len(chats) == 1
    return chats[0]


def _student_batch(tokenizer, sample):
    from student_train.cross_batch import CrossCollate

    collate = CrossCollate(tokenizer, ["other"], {}, 0.5, tokenizations={"other": "other"})
    batch = collate([[sample]], [[1.0]], ["llama", "other"], packing=False)
    return batch["input_ids"][0].tolist(), batch["cross_stats"]


def test_a_chat_sample_is_rendered_by_the_students_own_chat_template(world):
    from logitstore.text_spans import stored_messages

    sample = _chat_sample(world)
    messages = stored_messages(sample.text_spans, sample.sample_id)
    assert [m["role"] for m in messages] == ["system", "user", "assistant"]
    assert "".join(m["content"] for m in messages) == sample.text_spans.text
    tokenizer = other_tokenizer()  # Gemma-like turn markers, not the store's template
    ids, stats = _student_batch(tokenizer, sample)
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    assert ids == tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert "<start_of_turn>" in tokenizer.decode(ids)
    # the second teacher has this tokenizer and template: the same tokens where it is not cut
    stored = sample.tokenizations["other"].input_ids.tolist()
    assert ids[:len(stored)] == stored
    assert stats["cross/chat_samples"] == stats["cross/chat_templated"] == 1.0


@pytest.mark.parametrize("template", [None, "{{ raise_exception('no system turns') }}"])
def test_a_chat_the_students_template_cannot_render_is_trained_as_plain_text(world,
                                                                              template):
    from logitstore.toolkit.token_spans import tokenize_with_spans

    sample = _chat_sample(world)
    tokenizer = other_tokenizer()
    tokenizer.chat_template = template
    ids, stats = _student_batch(tokenizer, sample)
    assert ids == tokenize_with_spans(tokenizer, sample.text_spans.text).ids.tolist()
    assert stats["cross/chat_samples"] == 1.0 and stats["cross/chat_templated"] == 0.0


@pytest.mark.parametrize("template", [None, "{{ raise_exception('no system turns') }}"])
def test_a_chat_the_second_teachers_template_cannot_render_stops_its_dump(world, template):
    """The same rendering as the student's (token_spans.stored_text_tokens), another cost:
    a teacher is fed its own template's turns or nothing, so the dump stops on the sample."""
    from logitstore.errors import TokenSpansError
    from teacher_dump.foreign_tokens import ForeignTokenizer, cut_sample

    sample = _chat_sample(world)
    tokenizer = other_tokenizer()
    cut, _ = cut_sample(ForeignTokenizer(tokenizer, "other", None), sample)
    stored = sample.tokenizations["other"].input_ids.tolist()  # the dump's, at its max length
    assert cut.input_ids.tolist()[:len(stored)] == stored
    tokenizer.chat_template = template
    with pytest.raises(TokenSpansError, match=f"sample {sample.sample_id!r} is a chat, and "
                                              f"the tokenizer of signal 'other' cannot"):
        cut_sample(ForeignTokenizer(tokenizer, "other", None), sample)


def test_hidden_pools_of_the_second_tokenization_align_a_third_tokenizer_student(
        world, teachers, tmp_path):  # noqa: F811
    store = tmp_path / "hidden_other"
    shutil.copytree(teachers["store"], store)
    run_dump(config(teachers, store, hidden_layers=[-1]), ranks=RankContext(), progress=False)
    assert StoreReader(str(store)).settings.signals["other"].hidden is not None
    assert StoreReader(str(store)).settings.signals["llama"].hidden is None
    run = tmp_path / "hidden_run"
    # the hidden term comes from the second teacher alone: per-sequence pools need no
    # token alignment, so they train a student of a third tokenizer as they are
    train_run({**world, "store": store}, run, max_steps=8, signals={"other": 1.0},
              hidden_weight=1.0, eval_store=str(store), eval_on_start=True, eval_every=0)
    rows = [m for m in read_metrics(run) if "train/hidden" in m]
    assert len(rows) == 8 and all(np.isfinite(m["train/hidden"]) for m in rows)
    evals = [m for m in read_metrics(run) if "eval/hidden" in m]  # the whole store, twice
    assert [m["step"] for m in evals] == [0, 8]
    assert evals[-1]["eval/hidden"] < 0.5 * evals[0]["eval/hidden"], evals


def test_plain_and_chat_batches_report_the_same_stat_keys_in_the_same_order(world):
    # ranks reduce the summed stats key by key: a key only chat batches had would hang them
    chat = _chat_sample(world)
    plain = next(s for s in StoreReader(str(world["store"])).iter_samples()
                 if not s.text_spans.roles.any())
    keys = [list(_student_batch(other_tokenizer(), s)[1]) for s in (plain, chat)]
    assert keys[0] == keys[1] and "cross/chat_samples" in keys[0]


def test_the_students_template_markup_is_a_target_only_after_text_of_its_turn(
        teachers):  # noqa: F811
    """A two-round chat cut by the store's template and by another one: the other's markup
    after an answer (end of turn) is a target, the next user turn's header is not."""
    from transformers import AutoTokenizer

    from logitstore.text_spans import SampleText
    from logitstore.tokenized import loss_mask_by_bytes
    from logitstore.toolkit.token_spans import chat_with_spans

    messages = [{"role": "user", "content": "Fever?"}, {"role": "assistant", "content": "Rest."},
                {"role": "user", "content": "And pain?"},
                {"role": "assistant", "content": "Ibuprofen."}]
    own = chat_with_spans(AutoTokenizer.from_pretrained(teachers["llama"]), messages)
    stored = SampleText(own.text, own.spans, own.special, own.role)
    own_mask = (own.role == 3) & ~own.special  # the answers' text (roles: 2 user, 3 assistant)
    other = chat_with_spans(other_tokenizer(), messages)
    mask = loss_mask_by_bytes(stored, own_mask, other.spans, other.role)
    assistant, user = other.role == 3, other.role == 2
    assert mask[~other.special & assistant].all() and not mask[~other.special & user].any()
    # markup sits zero-width at a text byte: after the first answer come its end of turn
    # (assistant's) and the next user header (user's)
    after_answer = other.special & (other.spans[:, 0] == len(b"Fever?Rest."))
    end_of_turn, next_header = after_answer & assistant, after_answer & user
    assert end_of_turn.any() and mask[end_of_turn].all()
    assert next_header.any() and not mask[next_header].any()
    answer_header = other.special & assistant & (
        other.spans[:, 0] == len(b"Fever?Rest.And pain?"))  # after a user text: not a target
    assert answer_header.any() and not mask[answer_header].any()
    # without the roles (the rule before): the header after the answer was a target
    assert loss_mask_by_bytes(stored, own_mask, other.spans)[next_header].all()


def test_chats_the_students_template_cannot_render_are_warned_before_training(world, caplog):
    from types import SimpleNamespace

    from student_train.cross_tokenizer import probe_first_segment

    chat = _chat_sample(world)
    first_segment = SimpleNamespace(segments=[0], read_segment=lambda i, signals: [chat, chat])
    templated = probe_first_segment(first_segment, other_tokenizer())[1]
    assert templated == {"chat_samples": 2, "chat_templated": 2} and not caplog.records
    bare = other_tokenizer()
    bare.chat_template = None
    with caplog.at_level("WARNING", logger="student_train.cross_tokenizer"):
        ratio, chats = probe_first_segment(first_segment, bare)
    assert chats == {"chat_samples": 2, "chat_templated": 0} and ratio > 0
    said = " ".join(r.getMessage() for r in caplog.records)
    assert "2 of the 2 chat samples" in said and "has no chat template" in said
