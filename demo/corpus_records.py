"""The text corpora: rendering template items as plain text, sampling distinct records
from (entity, template) combos, and build(), the train / heldout split with the
instruction, chat and multiple-choice views of the train items."""
from __future__ import annotations

import random

from corpus_choices import LETTERS
from corpus_templates import TEMPLATES

BASE_TRAIN = 3600          # train records at --scale 1.0 (about 1.5 MB of text with heldout)
HELDOUT_FRACTION = 0.10    # share of (entity, template) combos and of records held out


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
