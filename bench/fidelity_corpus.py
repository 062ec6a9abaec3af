"""Real text for the fidelity benchmark's teacher, from what is installed: nothing downloaded.

The text is English technical prose that ships with Python and with the project's own
dependencies: the docstrings of the standard library's modules, classes and functions, the
language reference topics of `pydoc_data.topics` (what `help("for")` prints), and the
docstrings of installed packages (numpy, matplotlib and torch by default; all three are
dependencies of logitstore). Docstrings are written by people, one module at a time: unlike
the demo's templated corpus, no second pass over them is a copy of the first, and held-out
modules are text no model has seen.

build_corpus(cache, settings) -> paths of one cached corpus directory:
  units        one per module (its docstrings in source order, >= min_chars each) or pydoc
               topic; sorted by the SHA-256 of their names, the first ones (until
               heldout_chars) are the held-out split, the others the teacher's
  tokenizer    byte-level BPE (vocab_size) trained on the teacher's units only
  documents    every unit's paragraphs grouped, in order, into documents of <= doc_tokens
               tokens (BOS and EOS included) -> teacher.jsonl (shuffled, seeded) and
               heldout.jsonl; transfer.jsonl = the first teacher documents up to
               transfer_tokens: a held-in split, far smaller than the teacher's text
The directory is named by the SHA-256 of the settings and of the collected text, so other
settings or other installed versions (other docstrings) build another one.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import json
import random
import sysconfig
from pathlib import Path

# the standard library's own tests, GUI demos and vendored copies are not prose
STDLIB_SKIP = {"site-packages", "test", "idlelib", "lib2to3", "tkinter", "turtledemo",
               "ensurepip", "tests"}
DEFAULT_CORPUS = {"sources": ["pydoc-topics", "stdlib", "numpy", "matplotlib", "torch"],
                  "min_chars": 80, "heldout_chars": 200_000, "vocab_size": 8192,
                  "doc_tokens": 256, "transfer_tokens": 150_000, "seed": 0}


def _docstrings(path: Path, min_chars: int) -> list[str]:
    """The docstrings of a module file (module, classes, functions) of >= min_chars."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return []
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    texts = (ast.get_docstring(node) for node in ast.walk(tree) if isinstance(node, kinds))
    return [t.strip() for t in texts if t and len(t.strip()) >= min_chars]


def _module_units(root: Path, prefix: str, min_chars: int) -> dict[str, str]:
    units = {}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if STDLIB_SKIP.intersection(rel.parts[:-1]) or rel.name.startswith("test_"):
            continue
        docs = _docstrings(path, min_chars)
        if docs:
            units[f"{prefix}/{rel.as_posix()}"] = "\n\n".join(docs)
    return units


def collect_units(sources: list[str], min_chars: int) -> dict[str, str]:
    """name -> text of every unit of the given sources (see the module docstring)."""
    units: dict[str, str] = {}
    for source in sources:
        if source == "pydoc-topics":
            from pydoc_data.topics import topics
            units.update({f"pydoc/{k}": v.strip() for k, v in sorted(topics.items())
                          if len(v.strip()) >= min_chars})
        elif source == "stdlib":
            units.update(_module_units(Path(sysconfig.get_paths()["stdlib"]), "stdlib",
                                       min_chars))
        else:
            spec = importlib.util.find_spec(source)
            if spec is None or not spec.submodule_search_locations:
                raise ValueError(f"corpus source {source!r}: expected an installed package "
                                 f"(or pydoc-topics, stdlib), found none of that name; "
                                 f"install it or drop it from the corpus sources")
            root = Path(list(spec.submodule_search_locations)[0])
            units.update(_module_units(root, source, min_chars))
    return units


def _train_tokenizer(texts: list[str], vocab_size: int, out: Path):
    """The demo's byte-level BPE recipe (demo/demo_prepare.py), trained on these texts."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "demo"))
    from demo_prepare import train_byte_level_bpe

    return train_byte_level_bpe(texts, vocab_size, out)


def _documents(unit: str, text: str, backend, budget: int) -> list[tuple[str, int]]:
    """(text, tokens) of the unit's paragraphs grouped in order into <= budget tokens."""
    docs, current, size = [], [], 2  # BOS + EOS
    for para in (p for p in text.split("\n\n") if p.strip()):
        n = len(backend.encode(para, add_special_tokens=False).ids) + 1  # + the separator
        if current and size + n > budget:
            docs.append(("\n\n".join(current), size))
            current, size = [], 2
        current.append(para)
        size += n
    if current:
        docs.append(("\n\n".join(current), size))
    return docs


def _write_jsonl(path: Path, docs: list[dict]) -> None:
    path.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs),
                    encoding="utf-8")


def corpus_key(settings: dict, units: dict[str, str]) -> str:
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for name, text in units.items():
        h.update(name.encode() + b"\0" + text.encode() + b"\0")
    return h.hexdigest()


def build_corpus(cache: Path, settings: dict | None = None) -> dict:
    """The corpus directory for `settings` (DEFAULT_CORPUS's keys), built when missing."""
    s = {**DEFAULT_CORPUS, **(settings or {})}
    units = collect_units(s["sources"], s["min_chars"])
    key = corpus_key(s, units)
    out = cache / f"corpus-{key[:12]}"
    paths = {"dir": out, "tokenizer": out / "tokenizer", "teacher": out / "teacher.jsonl",
             "transfer": out / "transfer.jsonl", "heldout": out / "heldout.jsonl",
             "sizes": out / "sizes.json", "key": key}
    if paths["sizes"].is_file():
        return {**paths, "built": False, "sizes_data": json.loads(paths["sizes"].read_text())}
    out.mkdir(parents=True, exist_ok=True)
    order = sorted(units, key=lambda n: hashlib.sha256(n.encode()).hexdigest())
    heldout_units, chars = [], 0
    for name in order:
        if chars >= s["heldout_chars"]:
            break
        heldout_units.append(name)
        chars += len(units[name])
    train_units = [n for n in units if n not in set(heldout_units)]
    backend = _train_tokenizer([units[n] for n in train_units], s["vocab_size"],
                               paths["tokenizer"])
    split = {}
    for part, names in (("teacher", train_units), ("heldout", heldout_units)):
        split[part] = [{"id": f"{part}-{i:06d}", "unit": n, "text": t, "tokens": k}
                       for i, (n, t, k) in enumerate(
                           (n, t, k) for n in names
                           for t, k in _documents(n, units[n], backend, s["doc_tokens"]))]
    random.Random(s["seed"]).shuffle(split["teacher"])
    transfer, total = [], 0
    for doc in split["teacher"]:
        if total >= s["transfer_tokens"]:
            break
        transfer.append(doc)
        total += doc["tokens"]
    for part, docs in (("teacher", split["teacher"]), ("transfer", transfer),
                       ("heldout", split["heldout"])):
        _write_jsonl(paths[part], docs)
    sizes = {part: {"documents": len(docs), "tokens": sum(d["tokens"] for d in docs)}
             for part, docs in (("teacher", split["teacher"]), ("transfer", transfer),
                                ("heldout", split["heldout"]))}
    sizes["units"] = {"teacher": len(train_units), "heldout": len(heldout_units)}
    sizes["teacher_to_transfer"] = round(sizes["teacher"]["tokens"]
                                         / max(1, sizes["transfer"]["tokens"]), 2)
    sizes["settings"] = s
    paths["sizes"].write_text(json.dumps(sizes, indent=1) + "\n", encoding="utf-8")
    return {**paths, "built": True, "sizes_data": sizes}
