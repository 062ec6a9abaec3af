"""Markdown report of bench/xtok_real_tokenizers.py (cross-tokenizer machinery on real
tokenizers) from its result dict: tokenizer checks, vocabulary maps, alignment and the
coverage proxy, CrossCollate throughput."""

from __future__ import annotations

import numpy as np


def _range(values: list[float], fmt: str) -> str:
    """Median, with [min, max] when there are several (timings are noisy)."""
    middle = format(float(np.median(values)), fmt)
    return middle if len(values) == 1 else \
        f"{middle} [{format(min(values), fmt)}, {format(max(values), fmt)}]"


def render_markdown(result: dict) -> str:
    corpus = result["corpus"]
    lines = ["# Cross-tokenizer machinery on real tokenizers", "",
             f"Command: `{result['command']}`  ", f"Machine: {result['machine']}", "",
             f"Corpus: {corpus['heldout_records']} held-out records ({corpus['heldout_bytes']:,}"
             f" B), {corpus['transfer_records']} transfer records.", "",
             "| tokenizer | ids | tokens/byte (held-out) | round trip | same ids as source lib |"
             " byte-exact spans |", "|---|---|---|---|---|---|"]
    for name, t in result["tokenizers"].items():
        n = t["texts"]
        lines.append(f"| {name} | {t['ids']:,} | {t['tokens_per_byte']:.3f} | "
                     f"{t['round_trip']}/{n} | {t['same_ids_as_source_library']}/{n} | "
                     f"{t['byte_exact_spans']}/{n} |")
    for name, t in result["tokenizers"].items():
        for text, failed in t["stress_failures"].items():
            lines.append(f"- {name} fails {', '.join(failed)} on the edge case {text!r}")
    lines += ["", "Vocabulary maps (`vocab_map_for`; build = empty cache, median [min, max]):",
              "", "| teacher -> student | build s | cached s | .npz | exact | first piece |"
              " unmapped |", "|---|---|---|---|---|---|---|"]
    for p in result["pairs"]:
        m, s = p["map"], p["map"]["summary"]
        lines.append(f"| {p['teacher']} -> {p['student']} | {_range(m['build_s'], '.2f')} | "
                     f"{m['cached_s']:.2f} | {m['npz_bytes'] / 1e6:.2f} MB | {s['exact']:,} | "
                     f"{s['decomposed']:,} | {s['unmapped']:,} |")
    lines += ["", "Alignment on the held-out text (shares of student positions) and the "
              "coverage PROXY: the map's reach over the teacher's actual next tokens (a "
              "teacher that is always right), all positions / aligned positions:", "",
              "| teacher -> student | aligned | inside teacher token (anchored) | other skips |"
              " proxy exact | proxy first piece | proxy unmapped | proxy exact @aligned |"
              " map first != student token (same-end pairs; at first pair) |",
              "|---|---|---|---|---|---|---|---|---|"]
    for p in result["pairs"]:
        a = p["alignment"]
        r, px, pa = a["reason_shares"], a["proxy_all_next_tokens"], a["proxy_aligned_next_tokens"]
        other = sum(v for k, v in r.items() if k not in ("aligned", "inside_teacher_token"))
        lines.append(f"| {p['teacher']} -> {p['student']} | {r['aligned']:.1%} | "
                     f"{r['inside_teacher_token']:.1%} ({a['inside_anchored_share']:.1%}) | "
                     f"{other:.1%} | {px['exact']:.1%} | {px['first_piece']:.1%} | "
                     f"{px['unmapped']:.2%} | {pa['exact']:.1%} | "
                     f"{a['map_first_not_student_token']}/{a['same_end_pairs']}; "
                     f"{a['map_first_not_student_token_at_first_pair']} |")
    per_sample = [p["alignment"]["align_s"] / p["alignment"]["samples"] * 1e3
                  for p in result["pairs"]]
    lines += ["", f"align_positions + inside_anchors: {min(per_sample):.2f}-"
              f"{max(per_sample):.2f} ms per held-out sample over the pairs."]
    if all("collate" in p for p in result["pairs"]):
        lines += _collate_lines(result["pairs"])
    return "\n".join(lines) + "\n"


def _share(collate: dict, key: str) -> str:
    share = collate.get(key)
    return "– (result written before this count)" if share is None else f"{share:.2%}"


def _collate_lines(pairs: list[dict]) -> list[str]:
    lines = ["", "CrossCollate re-cutting the transfer texts (synthetic top-k, mapped loss, "
             "inside-token and chained targets; one process; median [min, max] over passes):", "",
             "| teacher -> student | samples/s | student tokens/s | aligned share |"
             " skipped: dummy prefix on one side | inside conditioned | chained |",
             "|---|---|---|---|---|---|---|"]
    for p in pairs:
        c = p["collate"]
        per_sample = c["student_tokens"] / c["samples"]
        lines.append(f"| {p['teacher']} -> {p['student']} | {_range(c['samples_per_s'], '.0f')}"
                     f" | {_range([r * per_sample for r in c['samples_per_s']], ',.0f')} | "
                     f"{c['aligned_share']:.1%} | {_share(c, 'dummy_prefix_skipped_share')} | "
                     f"{c['inside_conditioned_share']:.1%} | {_share(c, 'chained_share')} |")
    return lines
