"""medmcq_kb.jsonl: the four-option eval set on the knowledge base's facts."""
from __future__ import annotations

import random

from corpus_choices import distractors
from corpus_kb import FIELDS, list_fields, term

MCQ_EVAL_ITEMS = 400       # questions in medmcq_kb.jsonl (--mcq-eval): SE of accuracy <= 0.025


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
