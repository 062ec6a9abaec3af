"""Multiple-choice options: wrong options (distractors) drawn from other entities of the same
kind and filtered so they cannot also be true, and the shuffled four-option item."""
from __future__ import annotations

import random
import re

from corpus_kb import list_fields

LETTERS = "ABCD"
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
