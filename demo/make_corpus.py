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

Wording per field comes from the YAML's `phrasing` section; the templates decide structure
(overview / study note / bullet list / comparison paragraphs, Q/A, cloze, true-false,
instruction, chat and multiple-choice items). Distractors come from other entities of the
same kind and are filtered so they cannot also be true.

The pieces, beside this file: corpus_kb.py (knowledge base: schema, loading, slicing),
corpus_phrasing.py (a fact as a sentence), corpus_choices.py (distractors, MCQ items),
corpus_templates.py (the item templates), corpus_records.py (train/heldout and their
structured views), corpus_mcq_eval.py (medmcq_kb) and corpus_drill.py (transfer/drill).
This file is the CLI and re-exports their names.

Everything is driven by one random.Random seeded from a string (stable across Python
runs and PYTHONHASHSEED), we never iterate over sets, and files are written with fixed
key order and "\n" newlines, so the same seed gives byte-identical files.
Only the standard library and PyYAML are used so this runs before torch is installed.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

# The pieces live beside this file (corpus_*.py). Running it puts demo/ on sys.path already;
# loading it by file path (tests/test_demo_corpus.py) does not, so add it for these imports.
_DEMO_DIR = str(Path(__file__).resolve().parent)
_ADDED = _DEMO_DIR not in sys.path
if _ADDED:
    sys.path.insert(0, _DEMO_DIR)
try:
    # Re-exported: other code and the tests use these names as make_corpus.NAME.
    from corpus_choices import (GENERIC, LETTERS, STOP, claims_of, distractors,  # noqa: F401
                                mcq_item, words)
    from corpus_drill import build_drill, fact_text, transfer_facts  # noqa: F401
    from corpus_kb import (ALL_FIELDS, COMMON_FIELDS, FIELDS, KB_PATH, KIND_FIELDS,  # noqa: F401
                           OPTIONAL_FIELDS, SCALAR_FIELDS, fields_of, list_fields, load_kb,
                           select_entities, subject_pattern, term, validate_kb)
    from corpus_mcq_eval import MCQ_EVAL_ITEMS, build_mcq_eval  # noqa: F401
    from corpus_phrasing import cap, join, masked_definition, sentence, value  # noqa: F401
    from corpus_records import BASE_TRAIN, HELDOUT_FRACTION, build, sample, to_text  # noqa: F401
    from corpus_templates import (KIND_WORD, SYSTEM_PROMPTS, TEMPLATES,  # noqa: F401
                                  make_pick, make_qa, t_bullets, t_chat_quiz, t_chat_tutor,
                                  t_cloze, t_compare, t_instr_extract, t_instr_identify,
                                  t_instr_list, t_instr_summary, t_mcq_field, t_mcq_identify,
                                  t_overview, t_qa_definition, t_qa_notes, t_study_note,
                                  t_true_false)
finally:
    if _ADDED:
        sys.path.remove(_DEMO_DIR)


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
