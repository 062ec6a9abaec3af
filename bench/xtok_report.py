"""Summary, markdown and plot of bench/cross_tokenizer_bench.py (pure Python but the plot).

summarise   per student variant: held-out bits per byte, tokens per byte, step and collate
            seconds over seeds (mean, 95 % t-interval: bench/fidelity_stats.py); the paired
            figures behind the issue's goals, each computed from the runs, never written in:
  gap closed    (bpb[ce-C] - bpb[xkd]) / (bpb[ce-C] - bpb[kd-A]): the share of the gap
                between CE only (student C) and same-tokenizer KD (student A) that a
                cross-tokenizer student closes; ratio of the mean paired differences, with the
                per-seed shares' interval; "–" with the reason unless the gap is resolved > 0.
                A student trained on the draws (xkd-pkl-draws) is measured against the
                same-tokenizer student of the same target (kd-A-draws): `REFERENCE`
  own-CE gain   (bpb[ce-C] - bpb[xkd]) / (bpb[ce-A] - bpb[kd-A]): KD's gain for student C
                from teacher A over KD's gain for student A (the tokenizers' own difference
                left out); "–" unless student A's gain is resolved > 0
  step cost     per seed Step.train seconds of xkd / kd-A, and with each one's batch collate
                (the data path: tokenize, align, gather), and per student token
  alignment     summed over seeds and steps from the batches' cross/ counts: share of trained
                student positions aligned with a teacher position, share given a KD target
                (aligned and mapped share >= min_mapped_share, or inside a teacher token and
                conditioned: student_train/cross_inside.py), the skip reasons, the map's
                coverage (teacher top-k mass at aligned positions whose token maps), and the
                share of positions given a conditioned inside-token target with the top-k mass
                the conditioning keeps there (conditioned coverage)
  two teachers  xkd-AB-pkl (student C from store AB: teacher A's and teacher B's signals,
                weights --two-teacher-weights, default 0.5 / 0.5), xkd-AB-pkl-conf (the
                same with signal_mixture confidence), xkd-AB-pkl-draws (from the draws) and
                xkd-AB-pkl-noinside (no inside-token targets) where run, each against the
                better single teacher (the lower mean bits per byte of xkd-pkl and
                xkd-B-pkl; of their -draws students; of xkd-pkl, xkd-pkl-noinside and
                xkd-B-pkl-noinside):
                paired per-seed difference AB - single and its interval, and against each
                single teacher and the other two-teacher students; "met" when the interval
                is below 0, "not met" when above, "not resolved" otherwise
"""

from __future__ import annotations

from pathlib import Path

from fidelity_stats import interval
from xtok_train import A_VARIANTS, ALL_VARIANTS

GOAL_CLOSED = 0.60
GOAL_STEP_RATIO = 1.2
NO_TWO_TEACHERS = ("this run did not train this two-teacher student, or not every single-teacher "
                   "student it is judged against (--variants left them out, --no-b, or a run "
                   "from before the bench built store AB)")
SINGLES = ("xkd-pkl", "xkd-B-pkl")
TWO = "xkd-AB-pkl"
MEANS = "xkd-AB-pkl-means"  # the ablation: each teacher's mean over its own positions
CONF = "xkd-AB-pkl-conf"  # signal_mixture confidence: weights x P(next token) per position
PRIORITY = "xkd-AB-pkl-priority"  # signal_mixture priority: A's target first, B's in A's gaps
DRAWS_SINGLES, TWO_DRAWS = ("xkd-pkl-draws", "xkd-B-pkl-draws"), "xkd-AB-pkl-draws"
# without inside-token targets: against teacher A with them or without, and B without
NOINSIDE_SINGLES, TWO_NOINSIDE = ("xkd-pkl", "xkd-pkl-noinside", "xkd-B-pkl-noinside"), \
    "xkd-AB-pkl-noinside"
# CE at 1 - alpha where no target: against teacher A with that weight or the full one, and B
BLEND_SINGLES, TWO_BLEND = ("xkd-pkl", "xkd-pkl-blend", "xkd-B-pkl"), "xkd-AB-pkl-blend"
PRIORITY_BLEND = "xkd-AB-pkl-priority-blend"  # both: A first, and CE at 1 - alpha
SINGLES_OF = {TWO_DRAWS: DRAWS_SINGLES, TWO_NOINSIDE: NOINSIDE_SINGLES,
              TWO_BLEND: BLEND_SINGLES, PRIORITY_BLEND: BLEND_SINGLES}
# every cross student (tokenizer C, KD), and the names the "other" bin's variants had in
# the runs that tested it (2026-12-07)
CROSS = (*(n for n in ALL_VARIANTS if n.startswith("xkd-")),
         "xkd-pkl-other", "xkd-B-pkl-other", "xkd-AB-pkl-other")
# same-tokenizer KD of the same target; else kd-A
REFERENCE = {name: "kd-A-draws" for name in ("xkd-pkl-draws", "xkd-B-pkl-draws", TWO_DRAWS)}
WEIGHTS_BEFORE_OPTION = (0.5, 0.5)  # runs before --two-teacher-weights: equal weights
MIXTURES = {TWO: "signals A:{a}, B:{b}", CONF: "signals A:{a}, B:{b}, each times its "
            "probability of the next token", PRIORITY: "signals A:{a}, B:{b}, A first, B where A "
            "has no target", TWO_DRAWS: "signals A:{a}, B:{b}, their draws",
            TWO_NOINSIDE: "signals A:{a}, B:{b}, no inside-token targets",
            TWO_BLEND: "signals A:{a}, B:{b}, CE at 1 - alpha where no target",
            PRIORITY_BLEND: "signals A:{a}, B:{b}, A first, CE at 1 - alpha where no target"}
# the summary's key of each two-teacher student beside xkd-AB-pkl ("two_teachers")
TWO_TEACHER_KEYS = {CONF: "two_teachers_conf", PRIORITY: "two_teachers_priority",
                    TWO_DRAWS: "two_teachers_draws", TWO_NOINSIDE: "two_teachers_noinside",
                    TWO_BLEND: "two_teachers_blend", PRIORITY_BLEND: "two_teachers_priority_blend"}


def _seeds(runs, name, key="bits_per_byte"):
    return [r["heldout"][name][key] for r in runs]


def _resolved_positive(gap: dict) -> tuple[bool, str | None]:
    if gap["half_width"] is None:
        return False, "one seed: no interval"
    if gap["low"] <= 0:
        return False, (f"not resolved > 0 ({gap['mean']:+.4f} bits/byte, 95 % CI "
                       f"{gap['low']:+.4f} .. {gap['high']:+.4f})")
    return True, None


def share_of(gain: list[float], reference: list[float], what: str) -> dict:
    """Ratio of mean paired differences gain / reference, per-seed shares' interval; None with
    the reason unless the reference difference is resolved > 0."""
    ref = interval(reference)
    ok, reason = _resolved_positive(ref)
    if not ok:
        return {"share": None, "reason": f"{what} {reason}", "reference": ref}
    return {"share": sum(gain) / sum(reference), "reason": None, "reference": ref,
            "per_seed": interval([g / r for g, r in zip(gain, reference)])}


def method_rows(runs: list[dict]) -> dict:
    rows = {}
    for name in runs[0]["heldout"]:
        kind = runs[0]["batch_kind"][name]
        steps = [r["step_s"][name] for r in runs]
        with_collate = [r["step_s"][name] + r["collate_s"][kind] for r in runs]
        per_token = [r["step_s"][name] / (r["tokens"][name] / r["steps"]) * 1e6 for r in runs]
        rows[name] = {"bits_per_byte": interval(_seeds(runs, name)),
                      "nll_per_token": interval(_seeds(runs, name, "nll_per_token")),
                      "tokens_per_byte": runs[0]["heldout"][name]["tokens_per_byte"],
                      "step_s": interval(steps), "step_collate_s": interval(with_collate),
                      "step_ms_per_1k_tokens": interval(per_token),  # 1e6: s/token -> ms/1k
                      "tokens_per_step": runs[0]["tokens"][name] / runs[0]["steps"]}
        if name != "ce-C":
            rows[name]["vs_ce_c"] = interval([a - b for a, b in zip(
                _seeds(runs, name), _seeds(runs, "ce-C"))])
    return rows


def alignment(runs: list[dict]) -> dict:
    """Per cross variant: counts summed over seeds and steps, and their shares."""
    out = {}
    for name in runs[0]["cross_counts"]:
        total: dict[str, float] = {}
        for r in runs:
            for k, v in r["cross_counts"][name].items():
                total[k] = total.get(k, 0.0) + v
        counts = {k.split("/", 1)[1]: v for k, v in total.items()}
        positions = counts.get("positions", 0.0)
        row = {"counts": counts,
               "aligned_share": counts.get("aligned", 0.0) / positions if positions else None}
        for key, value in counts.items():
            if key.startswith("kd_positions/"):
                row["kd_share"] = value / positions if positions else None
            if key.startswith("topk_mass/") and value > 0:
                row["map_coverage"] = counts["mapped_mass/" + key.split("/", 1)[1]] / value
            if key.startswith("inside/"):
                row["inside_share"] = value / positions if positions else None
            if key.startswith(("chained/", "chain_skipped_")):
                row[key.split("/", 1)[0] + "_share"] = value / positions if positions else None
            if key.startswith("inside_topk_mass/") and value > 0:
                row["conditioned_coverage"] = \
                    counts["conditioned_mass/" + key.split("/", 1)[1]] / value
        row["skipped"] = {k[len("skipped_"):]: v / positions for k, v in counts.items()
                          if k.startswith("skipped_") and positions}
        row["per_signal"] = _per_signal(counts, positions)
        if len(row["per_signal"]) > 1:  # several teachers: no one signal speaks for the row
            for key in ("kd_share", "map_coverage", "inside_share", "conditioned_coverage",
                        "chained_share", "chain_skipped_unended_share",
                        "chain_skipped_unranked_share"):
                row.pop(key, None)
        out[name] = row
    return out


def _per_signal(counts: dict, positions: float) -> dict:
    """signal -> shares of trained student positions aligned with its tokenization / given
    its KD target, and its map coverage (from the `<count>/<signal>` keys)."""
    out: dict[str, dict] = {}
    for key, value in counts.items():
        kind, _, signal = key.partition("/")
        if not signal or not positions:
            continue
        row = out.setdefault(signal, {})
        if kind in ("aligned", "kd_positions"):
            row["aligned_share" if kind == "aligned" else "kd_share"] = value / positions
        elif kind == "topk_mass" and value > 0:
            row["map_coverage"] = counts[f"mapped_mass/{signal}"] / value
    return out


def two_teachers(runs: list[dict], rows: dict, name: str = TWO) -> dict:
    """The two-teacher goal (module docstring) for student `name` (xkd-AB-pkl,
    xkd-AB-pkl-conf, xkd-AB-pkl-draws against the single teachers' draws students, or
    xkd-AB-pkl-noinside against the single teachers with and without inside-token targets,
    xkd-AB-pkl-blend against teacher A's students with either CE weight and teacher B's)
    vs the better single teacher, and vs the other two-teacher students."""
    single_names = SINGLES_OF.get(name, SINGLES)
    singles = {n: rows[n]["bits_per_byte"]["mean"] for n in single_names if n in rows}
    if name not in rows or len(singles) < len(single_names):
        return {"runnable": False, "reason": NO_TWO_TEACHERS, "met": None, "name": name,
                "better_single": None, "single_bpb": singles}
    better = min(singles, key=singles.get)
    vs = {n: interval([ab - one for ab, one in zip(_seeds(runs, name), _seeds(runs, n))])
          for n in (*single_names, TWO, MEANS, CONF, PRIORITY, TWO_BLEND)
          if n in rows and n != name}
    d = vs[better]
    met = None if d["half_width"] is None or d["low"] <= 0 <= d["high"] else d["high"] < 0
    verdict = {True: "met", False: "not met", None: "not resolved"}[met]
    return {"runnable": True, "reason": None, "met": met, "verdict": verdict, "name": name,
            "better_single": better, "single_bpb": singles, "vs_single": vs,
            "two_bpb": rows[name]["bits_per_byte"]}


def step_cost(runs: list[dict], name: str, ref: str = "kd-A") -> dict:
    kinds = runs[0]["batch_kind"]
    ratio = [r["step_s"][name] / r["step_s"][ref] for r in runs]
    with_collate = [(r["step_s"][name] + r["collate_s"][kinds[name]])
                    / (r["step_s"][ref] + r["collate_s"][kinds[ref]]) for r in runs]
    per_token = [(r["step_s"][name] / r["tokens"][name]) / (r["step_s"][ref]
                                                             / r["tokens"][ref]) for r in runs]
    vs_ce = [r["step_s"][name] / r["step_s"]["ce-C"] for r in runs]
    return {"ratio": interval(ratio), "with_collate": interval(with_collate),
            "per_token": interval(per_token), "vs_ce_c": interval(vs_ce),
            "met": interval(ratio)["mean"] <= GOAL_STEP_RATIO}


def own_ce_share(runs: list[dict], rows: dict, gain: list[float],
                 ref: str = "kd-A") -> dict:
    """`gain` (a cross student's over ce-C, per seed) as a share of student A's KD gain over
    its CE only (ce-A - `ref`); a run of selected variants (--variants) may leave ce-A out,
    and then there is no such gain to share: None with that reason."""
    if "ce-A" not in rows:
        return {"share": None, "reason": "ce-A not run", "reference": None}
    a_gain = [c - k for c, k in zip(_seeds(runs, "ce-A"), _seeds(runs, ref))]
    return share_of(gain, a_gain, "student A's KD gain over its CE only is")


def summarise(runs: list[dict], teachers: dict) -> dict:
    rows = method_rows(runs)
    ce_c = _seeds(runs, "ce-C")
    goals = {}
    for name in (n for n in CROSS if n in rows and REFERENCE.get(n, "kd-A") in rows):
        ref = REFERENCE.get(name, "kd-A")
        gap = [c - k for c, k in zip(ce_c, _seeds(runs, ref))]
        gain = [c - x for c, x in zip(ce_c, _seeds(runs, name))]
        closed = share_of(gain, gap, f"the gap CE only (C) - same-tokenizer KD ({ref}) is")
        closed["met"] = None if closed["share"] is None else closed["share"] >= GOAL_CLOSED
        goals[name] = {"gap_closed": closed, "reference": ref,
                       "own_ce_gain": own_ce_share(runs, rows, gain, ref),
                       "gain_over_ce_c": interval(gain), "step": step_cost(runs, name, ref)}
    vocab = {k: v.get("cross_tokenizer", {}).get("vocab_map")
             for k, v in runs[0]["cross_provenance"].items()}
    return {"methods": rows, "teachers": teachers, "goals": goals, "alignment": alignment(runs),
            "vocab_maps": vocab, "seeds": len(runs),
            "two_teachers": two_teachers(runs, rows),
            **{key: two_teachers(runs, rows, name) for name, key in TWO_TEACHER_KEYS.items()
               if name in rows}}


# ----------------------------------------------------------------------------- markdown

def _pm(stat: dict, fmt: str) -> str:
    text = format(stat["mean"], fmt)
    return text if stat["half_width"] is None else f"{text} ± {format(stat['half_width'], fmt)}"


def _ci(stat: dict, fmt: str = "+.4f", scale: float = 1.0) -> str:
    mean = format(stat["mean"] * scale, fmt)
    if stat["half_width"] is None:
        return f"{mean} [–]"
    return f"{mean} [{format(stat['low'] * scale, fmt)}, {format(stat['high'] * scale, fmt)}]"


def method_table(summary: dict) -> list[str]:
    lines = ["| student | tokenizer | held-out bits/byte | vs ce-C (paired, 95 % CI) "
             "| NLL/token | tokens/byte | student tokens/step | step s | step + collate s "
             "| ms per 1k tokens |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, row in summary["methods"].items():
        tok = "A" if name in A_VARIANTS else "C"
        vs = "reference" if name == "ce-C" else _ci(row["vs_ce_c"])
        lines.append(f"| {name} | {tok} | {_pm(row['bits_per_byte'], '.4f')} | {vs} "
                     f"| {_pm(row['nll_per_token'], '.4f')} | {row['tokens_per_byte']:.3f} "
                     f"| {row['tokens_per_step']:.0f} | {_pm(row['step_s'], '.3f')} "
                     f"| {_pm(row['step_collate_s'], '.3f')} "
                     f"| {_pm(row['step_ms_per_1k_tokens'], '.1f')} |")
    for name, t in summary["teachers"].items():
        lines.append(f"| {name} | {name[-1]} | {t['bits_per_byte']:.4f} | – | "
                     f"{t['nll_per_token']:.4f} | {t['tokens_per_byte']:.3f} | – | – | – | – |")
    return lines


def _share_text(share: dict) -> str:
    if share["share"] is None:
        return f"– ({share['reason']})"
    return (f"{share['share'] * 100:.0f} % (per seed {_ci(share['per_seed'], '.0f', 100)} %)")


def goal_lines(summary: dict) -> list[str]:
    lines = []
    for name, g in summary["goals"].items():
        closed, step, ref = g["gap_closed"], g["step"], g.get("reference", "kd-A")
        verdict = ("–" if closed["met"] is None else "met" if closed["met"] else "not met")
        lines += [f"- **{name}**: closes {_share_text(closed)} of the bits-per-byte gap "
                  f"between CE only (C) and same-tokenizer KD ({ref}) (goal ≥ "
                  f"{GOAL_CLOSED:.0%}: {verdict}); its gain over ce-C "
                  f"{_ci(g['gain_over_ce_c'])} bits/byte is "
                  f"{_share_text(g['own_ce_gain'])} of student A's KD gain over ce-A",
                  f"  step cost vs {ref}: {_ci(step['ratio'], '.2f')}x Step.train (goal ≤ "
                  f"{GOAL_STEP_RATIO}x: {'met' if step['met'] else 'not met'}), "
                  f"{_ci(step['with_collate'], '.2f')}x with each one's collate, "
                  f"{_ci(step['per_token'], '.2f')}x per student token, "
                  f"{_ci(step['vs_ce_c'], '.2f')}x a CE-only step of the same student C"]
    return lines


def two_teacher_lines(two: dict, weights) -> list[str]:
    if not two["runnable"]:
        return [f"- **two teachers A + B into C** ({two.get('name', TWO)}): – ({two['reason']})"]
    better, name = two["better_single"], two.get("name", TWO)
    others = ", ".join(f"vs {n} {_ci(d)}" for n, d in two["vs_single"].items() if n != better)
    mixture = MIXTURES[name].format(a=f"{weights[0]:g}", b=f"{weights[1]:g}")
    return [f"- **two teachers A + B into C** ({name}, {mixture}): "
            f"{_pm(two['two_bpb'], '.4f')} bits/byte; vs the better single teacher "
            f"({better}, {two['single_bpb'][better]:.4f}) paired "
            f"{_ci(two['vs_single'][better])} bits/byte (goal: below 0: **{two['verdict']}**); "
            f"{others}"]


def alignment_lines(summary: dict) -> list[str]:
    lines = []
    for name, a in summary["alignment"].items():
        skipped = ", ".join(f"{k} {v * 100:.1f} %" for k, v in a["skipped"].items() if v)
        cover = a.get("map_coverage")
        kd = a.get("kd_share")
        lines.append(f"- {name}: {a['aligned_share'] * 100:.1f} % of trained student positions "
                     f"aligned" + (f", {kd * 100:.1f} % given a KD target" if kd is not None
                                   else " with the store's own tokenization (teacher A)")
                     + (f"; map coverage {cover * 100:.1f} % of the teacher top-k mass at "
                        f"aligned positions" if cover is not None else "")
                     + (f"; {a['inside_share'] * 100:.1f} % inside a teacher token with a "
                        f"conditioned target (conditioned coverage "
                        f"{a.get('conditioned_coverage', 0) * 100:.1f} % of the top-k mass)"
                        if a.get("inside_share") else "")
                     + (f"; {a['chained_share'] * 100:.1f} % spanning several teacher tokens "
                        f"with a chained target (without: "
                        f"{a.get('chain_skipped_unended_share', 0) * 100:.1f} % ending inside a "
                        f"teacher token, {a.get('chain_skipped_unranked_share', 0) * 100:.1f} % "
                        f"with a chain token outside the top-k)"
                        if a.get("chained_share") else "")
                     + (f"; skipped: {skipped}" if skipped else ""))
        if len(a.get("per_signal", {})) > 1:  # several teachers: each one's own alignment
            lines += [f"  - signal {sig}: {r.get('aligned_share', 0) * 100:.1f} % aligned with "
                      f"its tokenization, {r.get('kd_share', 0) * 100:.1f} % given its target"
                      + (f", map coverage {r['map_coverage'] * 100:.1f} %"
                         if "map_coverage" in r else "")
                      for sig, r in a["per_signal"].items()]
    for name, c in summary.get("exact_coverage", {}).items():
        lines.append(f"- {name}: over every stored position, {c['exact'] * 100:.1f} % of teacher "
                     f"{name}'s top-k mass is on tokens the student spells with ONE token of the "
                     f"same bytes, {c['decomposed'] * 100:.1f} % on tokens it reaches by a first "
                     f"piece only, {max(0.0, c['unmapped']) * 100:.2f} % unmapped")
    for name, v in summary["vocab_maps"].items():
        if v and name != "AB":  # store AB's maps are A's and B's, listed already
            pair = {"pkl": "teacher A -> C", "B": "teacher B -> C"}.get(name, name)
            lines.append(f"- vocabulary map ({pair}): of {v['teacher_vocab']} teacher ids "
                         f"{v['exact']} exact ({v['role_mapped']} special by role), "
                         f"{v['decomposed']} by a first piece, {v['unmapped']} unmapped")
    return lines


def render(result: dict) -> str:
    s, st = result["summary"], result["settings"]
    t = result["teachers"]
    c = result["corpus"]
    lines = [f"teachers: " + ", ".join(f"{n} Llama {v['params'] / 1e6:.2f}M ({v['steps']} "
                                        f"steps of {v['train']['batch_tokens']} tokens)"
                                        for n, v in t.items())
             + f" on {c['teacher']['records']} records ({c['teacher']['bytes']:,} bytes)",
             f"students: {st['steps']} steps on the transfer set ({c['transfer']['records']} "
             f"records, {c['transfer']['bytes']:,} bytes; batches of <= "
             f"{st['train']['batch_tokens']} tokens of store A), {s['seeds']} seed(s), top-"
             f"{st['top_k']}; held-out {c['heldout']['records']} records "
             f"({c['heldout']['bytes']:,} bytes)", ""]
    lines += method_table(s)
    lines += ["", "- values: mean over seeds ± half-width of its 95 % t-interval; vs ce-C = "
              "paired difference in bits per byte (negative = better)", "", "Goals:"]
    lines += goal_lines(s)
    weights = st.get("two_teacher_weights", WEIGHTS_BEFORE_OPTION)
    lines += two_teacher_lines(s["two_teachers"], weights)
    for key in TWO_TEACHER_KEYS.values():
        if key in s:
            lines += two_teacher_lines(s[key], weights)
    lines += ["", "Alignment and map coverage (summed over seeds and steps):"]
    lines += alignment_lines(s)
    return "\n".join(lines)


def plot(result: dict, out: Path) -> Path:
    """PNG: held-out bits per byte per student (95 % error bars), teachers as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = result["summary"]
    names = list(s["methods"])
    means = [s["methods"][n]["bits_per_byte"]["mean"] for n in names]
    errs = [s["methods"][n]["bits_per_byte"]["half_width"] or 0.0 for n in names]
    colors = ["tab:gray" if n.startswith("ce") else "tab:blue" if n.startswith("kd-A")
              else "tab:purple" if n == TWO else "tab:red" for n in names]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.bar(names, means, yerr=errs, capsize=4, color=colors)
    for i, m in enumerate(means):
        ax.annotate(f"{m:.3f}", (i, m), ha="center", va="bottom", fontsize=8,
                    xytext=(0, 4), textcoords="offset points")
    for (name, t), style in zip(s["teachers"].items(), ("--", ":")):
        ax.axhline(t["bits_per_byte"], color="black", ls=style, lw=0.8,
                   label=f"{name} {t['bits_per_byte']:.3f}")
    low = min(min(means), *(t["bits_per_byte"] for t in s["teachers"].values()))
    ax.set_ylim(low * 0.9, max(means) * 1.05)
    ax.set_ylabel("held-out bits per byte (95 % CI)")
    ax.set_title(f"cross-tokenizer KD, {s['seeds']} seeds, {result['settings']['steps']} steps;"
                 f" {result['date']}", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
