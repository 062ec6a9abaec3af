"""Sentence-level wording of knowledge-base facts: capitalising, joining lists, one field
of an entity as a sentence (from the YAML's phrasing), and the definition with its subject
masked out."""
from __future__ import annotations

import random
import re

from corpus_kb import FIELDS, subject_pattern, term


def cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


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
