"""--drill: the fact records in the scored question/answer form, transfer.jsonl (one fact
per entity and field) and drill.jsonl (every fact, repeated)."""
from __future__ import annotations

import random

from corpus_kb import FIELDS, list_fields, term


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
