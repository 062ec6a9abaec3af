#!/usr/bin/env python3
"""Turn demo/knowledge_base.yaml into the JSONL corpora used by the logitstore demo.

    python demo/make_corpus.py --out DIR [--seed 0] [--scale 1.0] [--entities N] [--drill R]

Outputs (all UTF-8 JSONL, one object per line):
  train.jsonl         plain-text records: id, text, specialty, difficulty, kind, entity, template, format
  heldout.jsonl       same fields; built only from (entity, template) combos never used for train
  instructions.jsonl  id, instruction, input, output + tags      (structured view of train items)
  chat.jsonl          id, messages[{role, content}] + tags       (structured view of train items)
  mcq.jsonl           id, question, options[4], answer, explanation + tags
  medmcq_kb.jsonl     id, question, choices[4], answer + tags   (eval set, --mcq-eval N)
  transfer.jsonl      one fact per (entity, field) in the scored form         (--drill R)
  drill.jsonl         every fact R times in the scored form                   (--drill R)

Wording per field comes from the YAML's `phrasing` section; the template functions here
decide structure (overview / study note / bullet list / comparison paragraphs, Q/A, cloze,
true-false, instruction, chat and multiple-choice items). Distractors come from other
entities of the same kind and are filtered so they cannot also be true.

Everything is driven by one random.Random seeded from a string (stable across Python
runs and PYTHONHASHSEED), we never iterate over sets, and files are written with fixed
key order and "\n" newlines, so the same seed gives byte-identical files.
Only the standard library and PyYAML are used so this runs before torch is installed.
"""
from __future__ import annotations

import argparse
import json
import random
import re
import sys
import time
from pathlib import Path

import yaml

KB_PATH = Path(__file__).resolve().parent / "knowledge_base.yaml"
COMMON_FIELDS = ("name", "specialty", "kind", "difficulty", "definition")
# Required kind-specific fields, in the order paragraphs present them.
KIND_FIELDS = {
    "condition": ("causes", "symptoms", "diagnosis", "treatment", "complications"),
    "drug": ("drug_class", "mechanism", "uses", "side_effects"),
    "lab_test": ("normal_range", "high_in"),
    "anatomy": ("location", "function", "related_conditions"),
    "procedure": ("indications", "how", "risks"),
}
OPTIONAL_FIELDS = {"drug": ("contraindications", "monitoring"), "lab_test": ("low_in",)}
SCALAR_FIELDS = ("drug_class", "mechanism", "normal_range", "location", "how")
KIND_WORD = {"condition": "condition", "drug": "drug", "lab_test": "laboratory test",
             "anatomy": "anatomical structure", "procedure": "procedure"}
BASE_TRAIN = 3600          # train records at --scale 1.0 (about 1.5 MB of text with heldout)
HELDOUT_FRACTION = 0.10    # share of (entity, template) combos and of records held out
LETTERS = "ABCD"
MCQ_EVAL_ITEMS = 400       # questions in medmcq_kb.jsonl (--mcq-eval): SE of accuracy <= 0.025

ALL_FIELDS = tuple(dict.fromkeys(f for k in KIND_FIELDS for f in KIND_FIELDS[k] + OPTIONAL_FIELDS.get(k, ())))
# Per-field phrasing (label, sentences, questions, rel, mcq) lives in the YAML's `phrasing`
# section so wording can grow without touching code; load_kb() fills this dict.
FIELDS: dict[str, dict] = {}
SYSTEM_PROMPTS = [
    "You are a helpful medical tutor. Give general educational information, not advice for individual patients.",
    "You are a concise clinical study assistant for medical and nursing students.",
    "You answer medical knowledge questions clearly and briefly for exam revision.",
]
# Findings, risks and treatments so common that, as a wrong option, they could well be true.
GENERIC = {w[:5] for w in (
    "tiredness", "fatigue", "nausea", "vomiting", "fever", "headache", "weight", "breathlessness",
    "confusion", "dizziness", "older", "family", "genetic", "smoking", "obesity", "alcohol", "inactivity",
    "immobility", "surgery", "pregnancy", "infection", "sepsis", "death", "disability", "falls", "anemia",
    "depression", "diabetes", "hypertension", "dehydration", "bleeding", "pain", "fluids", "supportive",
    "antibiotics", "oxygen", "dialysis", "steroids", "corticosteroids", "vaccination", "clots", "thrombosis",
    "clinical", "criteria", "serum", "blood", "urine", "rise")}
STOP = {"with", "from", "that", "this", "such", "when", "than", "into", "over", "after", "before",
        "their", "which", "other", "some", "most", "more", "very", "about", "acute", "chronic", "severe"}


# ----------------------------------------------------------------- knowledge base
def term(e: dict) -> str:
    """Mid-sentence form: explicit `term`, "the X" for anatomy, else lower-case the first letter
    unless the name is an acronym-like word (second letter not lower case, e.g. TSH, D-dimer)."""
    if e.get("term"):
        return e["term"]
    name = e["name"]
    if e["kind"] == "anatomy":
        return "the " + name.lower()
    return name[0].lower() + name[1:] if name[1:2].islower() else name


def cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def subject_pattern(e: dict) -> re.Pattern:
    """Matches the name (or term/alias, with optional article and parenthetical) that opens the definition."""
    names = [e["name"], term(e)] + list(e.get("aliases", []))
    names = sorted({re.sub(r"^(a|an|the)\s+", "", n, flags=re.I) for n in names}, key=lambda n: (-len(n), n))
    alt = "|".join(re.escape(n) for n in names)
    return re.compile(rf"^(?:(?:a|an|the)\s+)?(?:{alt})\b(?:\s*\([^)]*\))?", re.I)


def validate_kb(data: dict) -> list[str]:
    """Return human-readable schema problems (empty list means the KB is usable)."""
    problems, seen = [], set()
    entities = data.get("entities") if isinstance(data, dict) else None
    if not isinstance(entities, list) or not entities:
        return ["top-level 'entities' list missing or empty"]
    phrasing = data.get("phrasing") or {}
    for f in ALL_FIELDS:
        spec = phrasing.get(f)
        if not (isinstance(spec, dict) and spec.get("label") and spec.get("sentences") and spec.get("questions")):
            problems.append(f"phrasing.{f}: needs label, sentences and questions")
    for i, e in enumerate(entities):
        where = f"entity #{i} ({e.get('name', '?') if isinstance(e, dict) else '?'})"
        if not isinstance(e, dict):
            problems.append(f"{where}: not a mapping")
            continue
        missing = [f for f in COMMON_FIELDS if f not in e]
        if missing:
            problems.append(f"{where}: missing {', '.join(missing)}")
            continue
        if e["name"] in seen:
            problems.append(f"{where}: duplicate name")
        seen.add(e["name"])
        if e["kind"] not in KIND_FIELDS:
            problems.append(f"{where}: unknown kind {e['kind']!r}")
            continue
        if not isinstance(e["difficulty"], int) or not 1 <= e["difficulty"] <= 3:
            problems.append(f"{where}: difficulty must be 1, 2 or 3")
        if not isinstance(e["definition"], str) or not subject_pattern(e).match(e["definition"]):
            problems.append(f"{where}: definition must start with the name, term or an alias")
        for f in KIND_FIELDS[e["kind"]] + OPTIONAL_FIELDS.get(e["kind"], ()):
            v = e.get(f)
            if v is None and f not in KIND_FIELDS[e["kind"]]:
                continue
            if f in SCALAR_FIELDS:
                if not isinstance(v, str) or not v.strip():
                    problems.append(f"{where}: {f} must be a non-empty string")
            elif not isinstance(v, list) or not v or not all(isinstance(x, str) and x.strip() and "," not in x for x in v):
                problems.append(f"{where}: {f} must be a non-empty list of comma-free strings")
        if e["kind"] == "drug" and not str(e.get("mechanism", "")).startswith("It "):
            problems.append(f"{where}: mechanism must start with 'It '")
    return problems


def load_kb(path: Path = KB_PATH) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        data = yaml.load(fh, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # C loader is faster
    problems = validate_kb(data)
    if problems:
        raise ValueError("knowledge base invalid:\n  " + "\n  ".join(problems))
    FIELDS.clear()
    FIELDS.update({f: {"label": v["label"], "sents": v["sentences"], "qs": v["questions"],
                       **{k: v[k] for k in ("rel", "mcq") if k in v}} for f, v in data["phrasing"].items()})
    return data["entities"]


# ------------------------------------------------------------------- phrasing
def fields_of(e: dict) -> list[str]:
    kind = e["kind"]
    return [f for f in KIND_FIELDS[kind] + OPTIONAL_FIELDS.get(kind, ()) if e.get(f)]


def list_fields(e: dict) -> list[str]:
    return [f for f in fields_of(e) if f not in SCALAR_FIELDS]


def value(e: dict, f: str, items: list[str] | None = None) -> str:
    v = e[f] if items is None else items
    if f == "drug_class":
        return ("an " if v[0].lower() in "aeiou" else "a ") + v
    return v if isinstance(v, str) else join(v)


def sentence(e: dict, f: str, rng: random.Random, items: list[str] | None = None) -> str:
    t = term(e)
    mech = e.get("mechanism", "")
    return rng.choice(FIELDS[f]["sents"]).format(
        t=t, T=cap(t), v=value(e, f, items), c=e.get("drug_class", ""),
        M=re.sub(r"^It ", cap(t) + " ", mech), m=re.sub(r"^It ", t + " ", mech))


def masked_definition(e: dict) -> str:
    return subject_pattern(e).sub("____", e["definition"], count=1)


def words(s: str) -> set[str]:
    """Crude stems (first 5 letters) of content words, so 'diabetic' and 'diabetes' collide."""
    return {w[:5] for w in re.findall(r"[a-z0-9]+", s.lower()) if len(w) > 3 and w not in STOP}


def claims_of(e: dict) -> set[str]:
    """Content words of everything true about e; a distractor sharing one is too risky to use."""
    out = words(e["name"]) | words(" ".join(e.get("aliases", []))) | words(e["definition"])
    for f in list_fields(e):
        out |= words(" ".join(e[f]))
    return out


def distractors(e: dict, f: str, ctx: dict, rng: random.Random, k: int = 3) -> list[str] | None:
    """k values of field f from other entities of the same kind that share no content word with
    anything stated about e, so the keyed answer stays the only right one. Names come from the
    same specialty first (harder, and a name can't be accidentally true); facts come from other
    specialties first, because neighbours often share true facts (two anticoagulants, say)."""
    bad, pool = claims_of(e), []
    others = [o for o in ctx["by_kind"][e["kind"]] if o is not e and o.get(f)]
    same = [o for o in others if o["specialty"] == e["specialty"]]
    other = [o for o in others if o["specialty"] != e["specialty"]]
    for group in ((same, other) if f == "name" else (other, same)):
        cands = [x for o in group for x in (o[f] if isinstance(o[f], list) else [o[f]])]
        rng.shuffle(cands)
        for x in cands:
            if x not in pool and not (words(x) & bad) and not (f != "name" and words(x) & GENERIC):
                pool.append(x)
    return pool[:k] if len(pool) >= k else None


def mcq_item(question: str, correct: str, wrong: list[str], rng: random.Random, explanation: str) -> dict:
    options = [correct] + wrong
    rng.shuffle(options)
    return dict(format="mcq", question=question, options=options, answer=options.index(correct),
                explanation=explanation)


# ------------------------------------------------------------------ templates
# Each template: fn(entity, rng, ctx) -> item dict (or None if it does not apply).
def t_overview(e, rng, ctx):
    fs = [f for f in fields_of(e) if len(fields_of(e)) <= 3 or rng.random() > 0.2]
    head = rng.choice([e["name"], f"{e['name']} ({e['specialty']})", f"Topic: {e['name']}", ""])
    body = " ".join([e["definition"]] + [sentence(e, f, rng) for f in fs]
                    + ([e["notes"]] if e.get("notes") and rng.random() < 0.7 else []))
    return dict(format="paragraph", text=f"{head}\n\n{body}" if head else body)


def t_study_note(e, rng, ctx):
    fs = fields_of(e)
    rng.shuffle(fs)
    intro = rng.choice([f"{cap(e['specialty'])} study note.", f"Revision note ({e['specialty']}):",
                        f"Exam tip for {e['specialty']}:"])
    note = [f"Remember: {e['notes']}"] if e.get("notes") else []
    return dict(format="paragraph", text=" ".join([intro, e["definition"]] + [sentence(e, f, rng) for f in fs] + note))


def t_bullets(e, rng, ctx):
    lines = [rng.choice([f"Key facts about {term(e)}:", f"{e['name']} - summary", f"{e['name']}:"]),
             f"- Definition: {e['definition']}"]
    for f in fields_of(e):
        lines.append(f"- {cap(FIELDS[f]['label'])}: {e[f] if f in SCALAR_FIELDS else join(e[f])}")
    if e.get("notes"):
        lines.append(f"- Note: {e['notes']}")
    return dict(format="paragraph", text="\n".join(lines))


def t_compare(e, rng, ctx):
    others = [o for o in ctx["by_kind"][e["kind"]] if o is not e]
    if not others:  # the only one of its kind (a small --entities slice)
        return None
    same = [o for o in others if o["specialty"] == e["specialty"]]
    o = rng.choice(same or others)
    key = {"condition": ["symptoms", "treatment"], "drug": ["drug_class", "uses"], "lab_test": ["high_in"],
           "anatomy": ["function"], "procedure": ["indications"]}[e["kind"]]
    parts = [rng.choice([f"{e['name']} versus {term(o)}", f"Comparing {term(e)} and {term(o)}"]), "",
             e["definition"], o["definition"]]
    parts[3:3] = [sentence(e, f, rng) for f in key]
    parts += [sentence(o, f, rng) for f in key]
    if o["specialty"] == e["specialty"]:
        parts.append(f"Both are topics in {e['specialty']}.")
    return dict(format="paragraph", text=parts[0] + "\n\n" + " ".join(parts[2:]),
                difficulty=max(e["difficulty"], o["difficulty"]))


def t_qa_definition(e, rng, ctx):
    q = rng.choice(["What is {t}?", "Define {t}.", "Can you explain what {t} is?", "Give a short definition of {t}."])
    a = e["definition"] + (" " + e["notes"] if e.get("notes") and rng.random() < 0.4 else "")
    return dict(format="qa", question=q.format(t=term(e)), answer=a)


def make_qa(f):
    def fn(e, rng, ctx):
        if not e.get(f):
            return None
        return dict(format="qa", question=rng.choice(FIELDS[f]["qs"]).format(t=term(e)), answer=sentence(e, f, rng))
    return fn


def make_pick(f):
    """Short-answer form of a multiple-choice question: the question, one true item."""
    def fn(e, rng, ctx):
        if not e.get(f) or "mcq" not in FIELDS[f]:
            return None
        return dict(format="qa", question=FIELDS[f]["mcq"].format(t=term(e)), answer=rng.choice(e[f]))
    return fn


def t_qa_notes(e, rng, ctx):
    if not e.get("notes"):
        return None
    q = rng.choice(["What is an important clinical point about {t}?", "Give one high-yield fact about {t}.",
                    "What should a student remember about {t}?"])
    return dict(format="qa", question=q.format(t=term(e)), answer=e["notes"])


def t_cloze(e, rng, ctx):
    f = rng.choice([f for f in list_fields(e) if len(e[f]) >= 2] or [None])
    if f is None:
        return None
    i = rng.randrange(len(e[f]))
    items = [x if j != i else "____" for j, x in enumerate(e[f])]
    q = "Fill in the blank: " + sentence(e, f, rng, items)
    return dict(format="qa", question=q, answer=e[f][i])


def t_true_false(e, rng, ctx):
    fs = [f for f in list_fields(e) if "rel" in FIELDS[f]]
    if not fs:
        return None
    f = rng.choice(fs)
    t = term(e)
    truth = rng.random() < 0.5
    x = rng.choice(e[f]) if truth else (distractors(e, f, ctx, rng, 1) or [None])[0]
    if x is None:
        return None
    claim = FIELDS[f]["rel"].format(X=cap(x), x=x, T=cap(t), t=t)
    answer = ("True. " if truth else "False. ") + sentence(e, f, rng)
    return dict(format="qa", question=f"True or false: {claim}", answer=answer)


def t_instr_summary(e, rng, ctx):
    fs = fields_of(e)
    picked = sorted(rng.sample(range(len(fs)), min(3, len(fs))))
    out = " ".join([e["definition"]] + [sentence(e, fs[i], rng) for i in picked])
    ins = rng.choice(["Summarize the key facts about {t}.", "Write a short study summary of {t} for a medical student.",
                      "Give a brief overview of {t}."]).format(t=term(e))
    return dict(format="instruction", instruction=ins, input="", output=out)


def t_instr_list(e, rng, ctx):
    f = rng.choice(list_fields(e))
    ins = rng.choice(["List the {l} of {t}.", "Give a bulleted list of the {l} of {t}.",
                      "What are the {l} of {t}? Answer as a list."]).format(l=FIELDS[f]["label"], t=term(e))
    return dict(format="instruction", instruction=ins, input="", output="\n".join("- " + x for x in e[f]))


def t_instr_identify(e, rng, ctx):
    ins = rng.choice(["Identify the {k} described in the text.", "Name the {k} that matches this description.",
                      "Which {k} is being described? Give its name."]).format(k=KIND_WORD[e["kind"]])
    return dict(format="instruction", instruction=ins, input=masked_definition(e), output=e["name"])


def t_instr_extract(e, rng, ctx):
    f = rng.choice(list_fields(e))
    passage = " ".join([e["definition"]] + [sentence(e, g, rng) for g in fields_of(e)])
    ins = rng.choice(["Read the passage and list the {l} it mentions.",
                      "Extract the {l} from the passage below as a bulleted list."]).format(l=FIELDS[f]["label"])
    return dict(format="instruction", instruction=ins, input=passage, output="\n".join("- " + x for x in e[f]))


def t_chat_tutor(e, rng, ctx):
    f = rng.choice(fields_of(e))
    t = term(e)
    first = rng.choice(["What is {t}?", "Can you explain {t} to me?", "I am revising {t}. What is it?"]).format(t=t)
    return dict(format="chat", messages=[
        {"role": "system", "content": rng.choice(SYSTEM_PROMPTS)},
        {"role": "user", "content": first},
        {"role": "assistant", "content": e["definition"]},
        {"role": "user", "content": rng.choice(FIELDS[f]["qs"]).format(t=t)},
        {"role": "assistant", "content": sentence(e, f, rng)}])


def t_chat_quiz(e, rng, ctx):
    m = t_mcq_field(e, rng, ctx)
    if m is None:
        return None
    opts = "\n".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(m["options"]))
    pick = m["answer"] if rng.random() < 0.6 else rng.choice([i for i in range(4) if i != m["answer"]])
    key = f"{LETTERS[m['answer']]}. {m['options'][m['answer']]}"
    verdict = f"Correct! {m['explanation']}" if pick == m["answer"] else f"Not quite. The answer is {key}. {m['explanation']}"
    return dict(format="chat", messages=[
        {"role": "system", "content": rng.choice(SYSTEM_PROMPTS)},
        {"role": "user", "content": rng.choice(["Quiz me on {t}.", "Can you test me on {t}?"]).format(t=term(e))},
        {"role": "assistant", "content": f"{m['question']}\n{opts}"},
        {"role": "user", "content": LETTERS[pick]},
        {"role": "assistant", "content": verdict}])


def t_mcq_identify(e, rng, ctx):
    wrong = distractors(e, "name", ctx, rng)
    if wrong is None:
        return None
    q = rng.choice(["Which {k} matches this description? {d}", "{d} Which {k} is this?"]).format(
        k=KIND_WORD[e["kind"]], d=masked_definition(e))
    return mcq_item(q, e["name"], wrong, rng, e["definition"])


def t_mcq_field(e, rng, ctx):
    fs = [f for f in list_fields(e) if "mcq" in FIELDS[f]]
    if e["kind"] == "anatomy":          # ask which structure performs a function instead
        x = rng.choice(e["function"])
        wrong = distractors(e, "name", ctx, rng)
        return wrong and mcq_item(f"Which structure {x}?", e["name"], wrong, rng, sentence(e, "function", rng))
    if e["kind"] == "drug" and rng.random() < 0.3:
        fs = ["drug_class"]
    rng.shuffle(fs)
    for f in fs:
        wrong = distractors(e, f, ctx, rng)
        if wrong:
            if f == "drug_class":
                q = rng.choice(["Which drug class does {t} belong to?", "{T} is best classified as which of the following?"])
                return mcq_item(q.format(t=term(e), T=cap(term(e))), e[f], wrong, rng, sentence(e, f, rng))
            return mcq_item(FIELDS[f]["mcq"].format(t=term(e)), rng.choice(e[f]), wrong, rng, sentence(e, f, rng))
    return None


TEMPLATES = [("para.overview", t_overview), ("para.study_note", t_study_note), ("para.bullets", t_bullets),
             ("para.compare", t_compare), ("qa.definition", t_qa_definition), ("qa.notes", t_qa_notes),
             ("qa.cloze", t_cloze), ("qa.true_false", t_true_false)]
TEMPLATES += [(f"qa.{f}", make_qa(f)) for f in ALL_FIELDS]
TEMPLATES += [(f"qa.pick.{f}", make_pick(f)) for f in ALL_FIELDS if f not in SCALAR_FIELDS]
TEMPLATES += [("instr.summary", t_instr_summary), ("instr.list", t_instr_list), ("instr.identify", t_instr_identify),
              ("instr.extract", t_instr_extract),
              ("chat.tutor", t_chat_tutor), ("chat.quiz", t_chat_quiz),
              ("mcq.identify", t_mcq_identify), ("mcq.field", t_mcq_field)]


# --------------------------------------------------------------------- output
def to_text(item: dict, rng: random.Random) -> str:
    fmt = item["format"]
    if fmt == "paragraph":
        return item["text"]
    if fmt == "qa":
        style = rng.choice(["Question: {q}\nAnswer: {a}", "Q: {q}\nA: {a}", "{q}\n{a}"])
        return style.format(q=item["question"], a=item["answer"])
    if fmt == "instruction":
        if rng.random() < 0.5:
            inp = f"\n\n### Input:\n{item['input']}" if item["input"] else ""
            return f"### Instruction:\n{item['instruction']}{inp}\n\n### Response:\n{item['output']}"
        inp = f"\nInput: {item['input']}" if item["input"] else ""
        return f"Instruction: {item['instruction']}{inp}\nResponse: {item['output']}"
    if fmt == "chat":
        return "\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in item["messages"])
    opts = "\n".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(item["options"]))
    text = f"Question: {item['question']}\n{opts}\nAnswer: {LETTERS[item['answer']]}. {item['options'][item['answer']]}"
    return text + (f"\nExplanation: {item['explanation']}" if rng.random() < 0.5 else "")


def sample(combos, n, rng, ctx, exclude=frozenset()):
    """Round-robin over the (shuffled) combos until n distinct texts exist; re-rendering a combo
    gives new phrasings, so later rounds add variety rather than copies."""
    records, seen, attempts = [], set(exclude), 0
    while len(records) < n and attempts < 30 * n and combos:
        e, tid, fn = combos[attempts % len(combos)]
        attempts += 1
        item = fn(e, rng, ctx)
        if not item:
            continue
        text = to_text(item, rng)
        if text in seen:
            continue
        seen.add(text)
        records.append((e, tid, item, text))
    return records


def build(entities: list[dict], seed: int = 0, scale: float = 1.0) -> dict[str, list[dict]]:
    rng = random.Random(f"logitstore-demo-corpus:{seed}")
    by_kind: dict[str, list[dict]] = {}
    for e in entities:
        by_kind.setdefault(e["kind"], []).append(e)
    ctx = {"by_kind": by_kind}
    combos = [(e, tid, fn) for e in entities for tid, fn in TEMPLATES]
    # A combo is kept only if the template can render for this entity at all.
    combos = [c for c in combos if c[2](c[0], random.Random(0), ctx)]
    rng.shuffle(combos)
    held = [c for c in combos if rng.random() < HELDOUT_FRACTION]
    held_ids = {id(c) for c in held}
    train = [c for c in combos if id(c) not in held_ids]
    n_train = max(1, round(BASE_TRAIN * scale))
    n_held = max(1, round(n_train * HELDOUT_FRACTION / (1 - HELDOUT_FRACTION)))
    train_recs = sample(train, n_train, rng, ctx)
    held_recs = sample(held, n_held, rng, ctx, exclude={r[3] for r in train_recs})

    def tags(e, tid, item):
        return {"specialty": e["specialty"], "difficulty": item.get("difficulty", e["difficulty"]),
                "kind": e["kind"], "entity": e["name"], "template": tid}

    out = {name: [] for name in ("train", "heldout", "instructions", "chat", "mcq")}
    for split, recs in (("train", train_recs), ("heldout", held_recs)):
        for i, (e, tid, item, text) in enumerate(recs):
            out[split].append({"id": f"{split}-{i:05d}", "text": text, **tags(e, tid, item), "format": item["format"]})
    # Structured views of the train items only, so nothing derived from heldout combos leaks.
    views = {"instruction": ("instructions", "instr", ("instruction", "input", "output")),
             "chat": ("chat", "chat", ("messages",)), "mcq": ("mcq", "mcq", ("question", "options", "answer", "explanation"))}
    for e, tid, item, _ in train_recs:
        if item["format"] in views:
            name, prefix, keys = views[item["format"]]
            out[name].append({"id": f"{prefix}-{len(out[name]):05d}", **{k: item[k] for k in keys}, **tags(e, tid, item)})
    return out


def build_mcq_eval(entities: list[dict], seed: int = 0, n: int = MCQ_EVAL_ITEMS,
                   exclude: frozenset = frozenset()) -> list[dict]:
    """`n` four-option questions on the knowledge base's facts, in the eval format
    (question, choices, answer): one true item of one list field of one entity, three
    distractors as in the corpus (same kind, no shared content word). Every fact is stated
    in the training text: these test what a model knows of the domain, not a template.

    Candidates are every (entity, field, true item); a seeded draw picks n of them, spread
    over the entities, and the keyed answer takes each position n/4 times (a model that
    prefers a position gains nothing). Its own random stream: the same questions whatever
    the corpus scale. `exclude`: (entity name, field, item) triples never asked (with
    --drill, the transfer set's facts)."""
    rng = random.Random(f"logitstore-demo-mcq-eval:{seed}")
    by_kind: dict[str, list[dict]] = {}
    for e in entities:
        by_kind.setdefault(e["kind"], []).append(e)
    ctx = {"by_kind": by_kind}
    per_entity = [[(e, f, x) for f in list_fields(e) if "mcq" in FIELDS[f] for x in e[f]
                   if (e["name"], f, x) not in exclude] for e in entities]
    for cands in per_entity:
        rng.shuffle(cands)
    order = [c for rnd in range(max(map(len, per_entity))) for c in
             rng.sample([p[rnd] for p in per_entity if rnd < len(p)],
                        sum(rnd < len(p) for p in per_entity))]
    items: list[dict] = []
    for e, f, x in order:
        if len(items) == n:
            break
        wrong = distractors(e, f, ctx, rng)
        if wrong is None:
            continue
        answer = len(items) % 4
        choices = wrong[:answer] + [x] + wrong[answer:]
        items.append({"id": f"kbmcq-{len(items):04d}",
                      "question": FIELDS[f]["mcq"].format(t=term(e)),
                      "choices": choices, "answer": answer, "specialty": e["specialty"],
                      "entity": e["name"], "field": f})
    return items[:len(items) // 4 * 4]  # each key position equally often


def select_entities(entities: list[dict], n: int) -> list[dict]:
    """The first n entities taken in turn from each specialty (file order): a smaller
    knowledge base with every specialty in it, whose facts a small model can learn in the
    demo's few minutes; n = 0 or >= the KB's size keeps them all."""
    if not 0 < n < len(entities):
        return entities
    queues: dict[str, list[dict]] = {}
    for e in entities:
        queues.setdefault(e["specialty"], []).append(e)
    picked: list[dict] = []
    while len(picked) < n:
        for queue in queues.values():
            if queue and len(picked) < n:
                picked.append(queue.pop(0))
    return [e for e in entities if any(e is p for p in picked)]


def fact_text(e: dict, f: str, x: str) -> str:
    """One fact in the form distill-eval scores a choice in: the question, the true item."""
    return f"Question: {FIELDS[f]['mcq'].format(t=term(e))}\nAnswer: {x}"


def transfer_facts(entities: list[dict], seed: int = 0) -> list[tuple[dict, str, str]]:
    """One seeded true item per (entity, field) that has a multiple-choice question: the
    facts the transfer set states (build_drill), and the ones medmcq_kb then does not ask."""
    rng = random.Random(f"logitstore-demo-transfer:{seed}")
    return [(e, f, rng.choice(e[f])) for e in entities for f in list_fields(e)
            if "mcq" in FIELDS[f]]


def build_drill(entities: list[dict], seed: int = 0, rounds: int = 0) -> dict[str, list[dict]]:
    """Fact records in the scored form (fact_text): `transfer` holds one fact per (entity,
    field) (transfer_facts), `drill` every true item of every such field, `rounds` times,
    each round in its own seeded order. The corpus's paragraphs state each of the ~1200 facts
    only a few times; a small model learns which finding belongs to which disease only from
    many repetitions, and the drill gives them. run_demo.py puts the transfer records first
    (so they open the distill split) and the drill in the teacher's text only."""
    rng = random.Random(f"logitstore-demo-drill:{seed}")
    facts = [(e, f, x) for e in entities for f in list_fields(e) if "mcq" in FIELDS[f]
             for x in e[f]]

    def record(kind: str, i: int, e: dict, f: str, x: str) -> dict:
        return {"id": f"{kind}-{i:05d}", "text": fact_text(e, f, x), "specialty": e["specialty"],
                "difficulty": e["difficulty"], "kind": e["kind"], "entity": e["name"],
                "template": f"fact.{f}", "format": "qa"}

    drill = []
    for _ in range(rounds):
        order = list(facts)
        rng.shuffle(order)
        drill += [record("drill", len(drill), *fact) for fact in order]
    return {"transfer": [record("transfer", i, *fact)
                         for i, fact in enumerate(transfer_facts(entities, seed))],
            "drill": drill}


def write_jsonl(path: Path, records: list[dict]) -> int:
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
    path.write_bytes(data)
    return len(data)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path, help="output directory (created if missing)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--scale", type=float, default=1.0, help="multiplies the number of train/heldout records")
    ap.add_argument("--kb", type=Path, default=KB_PATH, help="knowledge base YAML")
    ap.add_argument("--mcq-eval", type=int, default=MCQ_EVAL_ITEMS, metavar="N",
                    help="questions in medmcq_kb.jsonl (0: no such file)")
    ap.add_argument("--entities", type=int, default=0, metavar="N",
                    help="use only N entities, taken in turn from each specialty (0: all)")
    ap.add_argument("--drill", type=int, default=0, metavar="R",
                    help="also write transfer.jsonl (one fact per entity and field) and "
                         "drill.jsonl (every fact R times), in the scored question/answer form; "
                         "medmcq_kb then asks none of transfer.jsonl's facts (0: neither)")
    args = ap.parse_args(argv)
    if args.scale <= 0:
        ap.error("--scale must be positive")
    if args.drill < 0:
        ap.error("--drill must be >= 0")
    if args.mcq_eval < 0:
        ap.error("--mcq-eval must be >= 0")
    t0 = time.perf_counter()
    entities = select_entities(load_kb(args.kb), args.entities)
    corpora = build(entities, seed=args.seed, scale=args.scale)
    exclude: frozenset = frozenset()
    if args.drill:
        corpora.update(build_drill(entities, seed=args.seed, rounds=args.drill))
        exclude = frozenset((e["name"], f, x) for e, f, x in transfer_facts(entities, args.seed))
    if args.mcq_eval:
        corpora["medmcq_kb"] = build_mcq_eval(entities, seed=args.seed, n=args.mcq_eval,
                                              exclude=exclude)
    args.out.mkdir(parents=True, exist_ok=True)
    text_bytes = sum(len(r["text"].encode("utf-8")) for s in ("train", "heldout") for r in corpora[s])
    for name, recs in corpora.items():
        size = write_jsonl(args.out / f"{name}.jsonl", recs)
        print(f"{name + '.jsonl':<20} {len(recs):>6} records {size:>10,} bytes")
    print(f"train+heldout text: {text_bytes:,} bytes; seed={args.seed} scale={args.scale}; "
          f"{time.perf_counter() - t0:.1f}s -> {args.out}")
    n_train = max(1, round(BASE_TRAIN * args.scale))
    if len(corpora["train"]) < n_train:
        print(f"warning: only {len(corpora['train'])} distinct train records (wanted {n_train})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
