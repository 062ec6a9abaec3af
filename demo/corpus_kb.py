"""The bundled knowledge base (demo/knowledge_base.yaml): its schema, loading and validation,
the per-field phrasing it carries (FIELDS), and the entity helpers the corpus builders share
(an entity's mid-sentence term, its fields, a smaller slice of the KB)."""
from __future__ import annotations

import re
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

ALL_FIELDS = tuple(dict.fromkeys(f for k in KIND_FIELDS for f in KIND_FIELDS[k] + OPTIONAL_FIELDS.get(k, ())))
# Per-field phrasing (label, sentences, questions, rel, mcq) lives in the YAML's `phrasing`
# section so wording can grow without touching code; load_kb() fills this dict.
FIELDS: dict[str, dict] = {}


def term(e: dict) -> str:
    """Mid-sentence form: explicit `term`, "the X" for anatomy, else lower-case the first letter
    unless the name is an acronym-like word (second letter not lower case, e.g. TSH, D-dimer)."""
    if e.get("term"):
        return e["term"]
    name = e["name"]
    if e["kind"] == "anatomy":
        return "the " + name.lower()
    return name[0].lower() + name[1:] if name[1:2].islower() else name


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


def fields_of(e: dict) -> list[str]:
    kind = e["kind"]
    return [f for f in KIND_FIELDS[kind] + OPTIONAL_FIELDS.get(kind, ()) if e.get(f)]


def list_fields(e: dict) -> list[str]:
    return [f for f in fields_of(e) if f not in SCALAR_FIELDS]


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
