"""The memory plan of a student whose tokenizer is not the store's (issue 15's cross path).

The cross collate (student_train/cross_batch.py) adds per position a kd_mask, inside-token
ids and chain ids to the batch, cuts the text into the student's own tokens and, with chains,
appends an entry to the head's sparse target: the plan's facts are checked against a real
cross batch built by cross_setup on the tiny world of tests/test_cross_tokenizer_train.py.
"""

from __future__ import annotations

import math

import pytest
import torch

from student_train.config import resolve_config
from student_train.memory_plan import estimate
from student_train.memory_plan_facts import load_model_config, store_facts
from student_train.memory_plan_render import render_plan
from student_train.memory_plan_terms import BATCH_BYTES_PER_TARGET_ENTRY, BATCH_BYTES_PER_TOKEN
from test_cross_tokenizer_train import make_world


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("plan_cross"), kinds="topk,sampled")


def cfg_of(world, student: str = "student", **overrides):
    return resolve_config(None, {"store": str(world["store"]), "student": str(world[student]),
                                 "out": "x", "signals": {"teacher": 1.0}, **overrides})


def cross_batch(cfg):
    """A real batch of six stored samples through the run's CrossCollate (unpacked)."""
    from transformers import AutoModelForCausalLM

    from logitstore.reader import StoreReader
    from logitstore.toolkit.hf import load_tokenizer
    from student_train.cross_tokenizer import cross_setup
    from student_train.sources import plan_signals

    reader = StoreReader(cfg.store)
    problems: list[str] = []
    plans, _ = plan_signals(cfg, reader.settings,
                            AutoModelForCausalLM.from_pretrained(cfg.student), problems)
    cross = cross_setup(cfg, reader, None, load_tokenizer(cfg.student), plans, problems)
    assert not problems and cross is not None
    samples = reader.read_segment(0)[:6]
    return cross.collate([[s] for s in samples], [[1.0]] * 6, ["teacher"], packing=False)


def per_position_bytes(batch) -> float:
    """Bytes of the batch's [B, S, ...] tensors per position (per-sample tensors, such as
    pooled hidden states, are not per token)."""
    B, S = batch["input_ids"].shape

    def walk(x) -> int:
        if isinstance(x, torch.Tensor):
            return x.numel() * x.element_size() if tuple(x.shape[:2]) == (B, S) else 0
        return sum(walk(v) for v in x.values()) if isinstance(x, dict) else 0

    return walk({k: v for k, v in batch.items() if k != "cross_stats"}) / (B * S)


@pytest.mark.parametrize("overrides", [
    {}, {"chained_token_targets": False},
    {"inside_token_targets": False, "chained_token_targets": False},
    {"target": "sampled"}, {"cross_loss": "uld"}])
def test_the_plans_batch_bytes_equal_a_real_cross_batch(world, overrides):
    cfg = cfg_of(world, **overrides)
    facts = store_facts(cfg, load_model_config(cfg))
    planned = (BATCH_BYTES_PER_TOKEN + BATCH_BYTES_PER_TARGET_ENTRY * sum(facts.target_widths)
               + facts.cross_batch_bytes_per_token)
    assert per_position_bytes(cross_batch(cfg)) == planned
    chained = cfg.cross_loss == "pkl" and cfg.chained_token_targets
    assert facts.head_extra_entries == (1 if chained else 0)  # the chain's entry k + 1


def test_a_foreign_student_is_planned_in_its_own_tokens(world):
    from logitstore.reader import StoreReader
    from logitstore.toolkit.hf import load_tokenizer
    from student_train.cross_tokenizer import probe_first_segment

    cfg = cfg_of(world)
    facts = store_facts(cfg, load_model_config(cfg))
    reader = StoreReader(cfg.store)
    from student_train.cross_tokenizer import first_segment_length_ratios

    student_tokenizer = load_tokenizer(cfg.student)
    ratio, _ = probe_first_segment(reader, student_tokenizer)
    assert ratio != 1.0 and facts.cross_length_ratio == pytest.approx(ratio)
    _, largest = first_segment_length_ratios(reader, student_tokenizer)
    cuts = [len(student_tokenizer(s.text_spans.text)["input_ids"]) / len(s)
            for s in reader.read_segment(0)]
    assert largest == pytest.approx(max(cuts)) and largest > ratio
    stored = reader.index.column("length").to_numpy()
    assert facts.longest_sample == math.ceil(int(stored.max()) * largest)
    assert facts.shortest_sample is None  # re-cut samples differ in length: rows are padded
    assert "trained across tokenizers" in render_plan(estimate(cfg))


def test_a_student_of_the_stores_tokenizer_plans_no_cross_bytes(world):
    cfg = cfg_of(world, student="teacher")
    facts = store_facts(cfg, load_model_config(cfg))
    assert facts.cross_length_ratio is None
    assert facts.cross_batch_bytes_per_token == 0 and facts.head_extra_entries == 0
    assert "across tokenizers" not in render_plan(estimate(cfg))


def test_uld_is_planned_with_its_own_chunk_and_no_fused_head_entries(world):
    from student_train.memory_plan_terms import head_chunk_bytes

    pkl, uld = cfg_of(world), cfg_of(world, cross_loss="uld")
    facts_pkl = store_facts(pkl, load_model_config(pkl))
    facts_uld = store_facts(uld, load_model_config(uld))
    assert facts_uld.uld_signals == 1 and facts_uld.head_target_widths == []
    assert facts_pkl.uld_signals == 0 and facts_pkl.head_target_widths == facts_pkl.target_widths
    m = estimate(uld)
    assert m.kd_buffers > estimate(pkl).kd_buffers  # [chunk, V] x (logits + 3 fp32 copies)
