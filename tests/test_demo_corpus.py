"""Fast checks for the bundled demo data: knowledge base, corpus generator and mini eval sets."""
from __future__ import annotations

import collections
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "demo"
TASKS = ROOT / "logitstore" / "toolkit" / "tasks"
OUTPUTS = ("train", "heldout", "instructions", "chat", "mcq", "medmcq_kb")
TAGS = ("specialty", "difficulty", "kind", "entity", "template")


def _load_generator():
    # demo/ is not a package; load the script as a module so tests use its own schema constants.
    spec = importlib.util.spec_from_file_location("make_corpus", DEMO / "make_corpus.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


mc = _load_generator()


def _read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


def _run_cli(out: Path, *extra: str) -> str:
    proc = subprocess.run([sys.executable, str(DEMO / "make_corpus.py"), "--out", str(out), *extra],
                          capture_output=True, text=True, timeout=60, check=True)
    return proc.stdout


@pytest.fixture(scope="module")
def kb() -> list[dict]:
    return mc.load_kb()


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("corpus")
    _run_cli(out, "--seed", "0", "--scale", "0.25")
    return out


@pytest.fixture(scope="module")
def corpus(corpus_dir) -> dict[str, list[dict]]:
    return {name: _read_jsonl(corpus_dir / f"{name}.jsonl") for name in OUTPUTS}


# ------------------------------------------------------------------ knowledge base
def test_yaml_loads_and_validates():
    data = yaml.safe_load((DEMO / "knowledge_base.yaml").read_text(encoding="utf-8"))
    assert mc.validate_kb(data) == []
    assert data["license"] == "CC-BY-4.0"
    assert 60 <= len(data["entities"]) <= 120


def test_every_entity_has_required_fields(kb):
    for e in kb:
        for f in mc.COMMON_FIELDS + mc.KIND_FIELDS[e["kind"]]:
            assert e.get(f), f"{e['name']}: missing {f}"
        assert e["difficulty"] in (1, 2, 3)
        assert isinstance(e["definition"], str) and e["definition"].endswith(".")
        assert mc.masked_definition(e).startswith("____"), e["name"]


def test_kb_covers_specialties_and_kinds(kb):
    specialties = {e["specialty"] for e in kb}
    assert {"cardiology", "endocrinology", "infectious disease", "pulmonology", "nephrology", "neurology",
            "gastroenterology", "hematology", "pharmacology", "pediatrics"} <= specialties
    assert {e["kind"] for e in kb} == set(mc.KIND_FIELDS)
    assert len({e["name"] for e in kb}) == len(kb)


def test_validator_rejects_broken_entity():
    data = yaml.safe_load((DEMO / "knowledge_base.yaml").read_text(encoding="utf-8"))
    bad = dict(data["entities"][0])
    del bad["symptoms"]
    bad["difficulty"] = 7
    data["entities"] = [bad]
    problems = mc.validate_kb(data)
    assert any("symptoms" in p for p in problems) and any("difficulty" in p for p in problems)


# ------------------------------------------------------------------- generator
def test_generator_is_deterministic(corpus_dir, tmp_path):
    again = tmp_path / "again"
    _run_cli(again, "--seed", "0", "--scale", "0.25")
    for name in OUTPUTS:
        assert (corpus_dir / f"{name}.jsonl").read_bytes() == (again / f"{name}.jsonl").read_bytes(), name


def test_other_seed_differs(corpus_dir, tmp_path):
    other = tmp_path / "other"
    stdout = _run_cli(other, "--seed", "1", "--scale", "0.25")
    assert "train.jsonl" in stdout and "bytes" in stdout
    assert (corpus_dir / "train.jsonl").read_bytes() != (other / "train.jsonl").read_bytes()


def _check_tags(rec: dict, specialties: set[str]):
    for t in TAGS:
        assert t in rec, t
    assert rec["specialty"] in specialties
    assert rec["difficulty"] in (1, 2, 3)
    assert rec["kind"] in mc.KIND_FIELDS


def test_text_records_have_fields_and_tags(corpus, kb):
    specialties = {e["specialty"] for e in kb}
    for split in ("train", "heldout"):
        assert corpus[split], split
        ids = [r["id"] for r in corpus[split]]
        assert len(ids) == len(set(ids))
        for r in corpus[split]:
            assert isinstance(r["text"], str) and len(r["text"]) > 20
            assert r["format"] in ("paragraph", "qa", "instruction", "chat", "mcq")
            _check_tags(r, specialties)


def test_heldout_is_disjoint_from_train(corpus):
    train_text = {r["text"] for r in corpus["train"]}
    assert not any(r["text"] in train_text for r in corpus["heldout"])
    train_combos = {(r["entity"], r["template"]) for r in corpus["train"]}
    assert not any((r["entity"], r["template"]) in train_combos for r in corpus["heldout"])
    ratio = len(corpus["heldout"]) / (len(corpus["train"]) + len(corpus["heldout"]))
    assert 0.05 <= ratio <= 0.15


def test_structured_outputs(corpus, kb):
    specialties = {e["specialty"] for e in kb}
    assert corpus["instructions"] and corpus["chat"] and corpus["mcq"]
    for r in corpus["instructions"]:
        assert all(isinstance(r[k], str) for k in ("instruction", "input", "output"))
        assert r["instruction"] and r["output"]
        _check_tags(r, specialties)
    for r in corpus["chat"]:
        roles = [m["role"] for m in r["messages"]]
        assert roles[0] == "system" and roles[-1] == "assistant"
        assert set(roles) <= {"system", "user", "assistant"}
        assert all(isinstance(m["content"], str) and m["content"] for m in r["messages"])
        _check_tags(r, specialties)
    for r in corpus["mcq"]:
        assert isinstance(r["question"], str) and r["question"]
        assert len(r["options"]) == 4 and len(set(r["options"])) == 4
        assert isinstance(r["answer"], int) and 0 <= r["answer"] < 4
        _check_tags(r, specialties)


def test_short_answer_items_state_a_true_fact(corpus, kb):
    # qa.pick.FIELD: a multiple-choice question of the KB with one true item as the answer,
    # the form distill-eval scores choices in ("Question: ...\nAnswer: CHOICE").
    by_name = {e["name"]: e for e in kb}
    picks = [r for r in corpus["train"] if r["template"].startswith("qa.pick.")]
    assert len(picks) >= 0.05 * len(corpus["train"])
    for r in picks:
        field = r["template"].removeprefix("qa.pick.")
        answer = r["text"].splitlines()[-1].split(": ", 1)[-1]
        assert answer in by_name[r["entity"]][field], r


def test_kb_mcq_eval_set(corpus, kb):
    rows = corpus["medmcq_kb"]
    assert len(rows) == mc.MCQ_EVAL_ITEMS
    assert len({r["id"] for r in rows}) == len(rows)
    counts = collections.Counter(r["answer"] for r in rows)
    assert set(counts.values()) == {len(rows) // 4}, counts  # each position equally often
    by_name = {e["name"]: e for e in kb}
    assert len({r["entity"] for r in rows}) >= 0.8 * len(kb)  # spread over the entities
    for r in rows:
        entity = by_name[r["entity"]]
        assert len(r["choices"]) == 4 and len(set(r["choices"])) == 4
        assert r["choices"][r["answer"]] in entity[r["field"]]  # the key is a true fact
        for i, wrong in enumerate(r["choices"]):  # no distractor shares a word with the truth
            if i != r["answer"]:
                assert not mc.words(wrong) & mc.claims_of(entity), (r, wrong)
    # Its own random stream: the same questions at every corpus scale.
    assert mc.build_mcq_eval(kb, seed=0) == rows


def test_fact_drill_and_transfer_facts(kb, tmp_path):
    # --drill R: transfer.jsonl states one fact per (entity, field), drill.jsonl every fact R
    # times, both in the form distill-eval scores a choice in; medmcq_kb then asks none of the
    # transfer facts (they are what the students' transfer set states).
    _run_cli(tmp_path, "--seed", "0", "--scale", "0.05", "--drill", "3")
    transfer = _read_jsonl(tmp_path / "transfer.jsonl")
    drill = _read_jsonl(tmp_path / "drill.jsonl")
    asked = _read_jsonl(tmp_path / "medmcq_kb.jsonl")
    by_name = {e["name"]: e for e in kb}
    facts = [(e["name"], f, x) for e in kb for f in mc.list_fields(e) if "mcq" in mc.FIELDS[f]
             for x in e[f]]
    pairs = {(name, f) for name, f, _ in facts}

    def fact(r):
        question, answer = r["text"].removeprefix("Question: ").split("\nAnswer: ")
        field = r["template"].removeprefix("fact.")
        assert question == mc.FIELDS[field]["mcq"].format(t=mc.term(by_name[r["entity"]]))
        return r["entity"], field, answer

    told = [fact(r) for r in transfer]
    assert {(name, f) for name, f, _ in told} == pairs and len(told) == len(pairs)
    assert collections.Counter(map(fact, drill)) == {f: 3 for f in facts}
    assert len(asked) == mc.MCQ_EVAL_ITEMS
    assert not {(r["entity"], r["field"], r["choices"][r["answer"]]) for r in asked} & set(told)
    for r in asked:  # the scored text of the key is a drill record
        key = f"Question: {r['question']}\nAnswer: {r['choices'][r['answer']]}"
        assert key in {d["text"] for d in drill}


def test_default_scale_size(kb):
    out = mc.build(kb, seed=0, scale=1.0)
    text_bytes = sum(len(r["text"].encode("utf-8")) for s in ("train", "heldout") for r in out[s])
    assert len(out["train"]) >= 2000
    assert 1_000_000 <= text_bytes <= 2_500_000
    assert len({r["specialty"] for r in out["train"]}) == len({e["specialty"] for e in kb})


# ------------------------------------------------------------------- eval tasks
def test_medmcq_mini(kb):
    rows = _read_jsonl(TASKS / "medmcq_mini.jsonl")
    assert 50 <= len(rows) <= 80
    assert len({r["id"] for r in rows}) == len(rows)
    specialties = {e["specialty"] for e in kb}
    for r in rows:
        assert set(r) >= {"id", "question", "choices", "answer", "specialty"}
        assert isinstance(r["question"], str) and r["question"]
        assert len(r["choices"]) == 4 and len(set(r["choices"])) == 4
        assert all(isinstance(c, str) and c for c in r["choices"])
        assert isinstance(r["answer"], int) and 0 <= r["answer"] <= 3
        assert r["specialty"] in specialties
    counts = collections.Counter(r["answer"] for r in rows)
    assert max(counts.values()) - min(counts.values()) <= 2, counts


def test_medgen_mini(kb):
    rows = _read_jsonl(TASKS / "medgen_mini.jsonl")
    assert 30 <= len(rows) <= 60
    assert len({r["id"] for r in rows}) == len(rows)
    specialties = {e["specialty"] for e in kb}
    for r in rows:
        assert set(r) >= {"id", "prompt", "reference", "specialty"}
        assert r["prompt"].strip() and r["reference"].strip()
        assert r["specialty"] in specialties
