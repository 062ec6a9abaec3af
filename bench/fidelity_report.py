"""The report of bench/fidelity.py: markdown tables and the quality-per-byte plot.

render      the tables printed at the end of a run (and written by --markdown for
            BENCHMARKS.md): per method the signal's bytes per token, the paired held-out NLL
            gap to online KD with its 95 % interval and verdict, the share of online KD's gain
            over CE only that it keeps, KL(teacher || student), accuracy, ECE, step time
plot        student quality (paired gap to online KD, interval as error bars) against bytes per
            token, log x axis, the Pareto front joined, the 0.5 % and 24 B/token limits drawn
A figure that means nothing is "–" with the reason under the table, never a number.
"""

from __future__ import annotations

from pathlib import Path

from fidelity_metrics import GOAL_BYTES_PER_TOKEN
from fidelity_stats import WITHIN_LIMIT


def _ci(gap: dict, scale: float = 100.0) -> str:
    """'+0.31 % [-0.05, +0.67]' (the 95 % interval), or the mean alone with one seed."""
    if gap["half_width"] is None:
        return f"{gap['mean'] * scale:+.2f} % [–]"
    return (f"{gap['mean'] * scale:+.2f} % [{gap['low'] * scale:+.2f}, "
            f"{gap['high'] * scale:+.2f}]")


def _pm(stat: dict, fmt: str) -> str:
    """mean ± half-width of the 95 % interval (mean alone with one seed)."""
    text = format(stat["mean"], fmt)
    return text if stat["half_width"] is None else f"{text} ± {format(stat['half_width'], fmt)}"


def _within(row: dict) -> str:
    v = row["verdict"]
    return {"resolved": "yes, resolved", "excluded": "no, resolved",
            "unresolved": "not resolved", "–": "–"}[v["within"]]


def method_table(summary: dict) -> list[str]:
    m = summary["methods"]
    lines = ["| method | B/token | held-out NLL | gap to online KD (95 % CI) | within 0.5 %? "
             "| kept share of online's gain | KL(teacher‖student) | accuracy | ECE "
             "| step s |", "|---|---|---|---|---|---|---|---|---|---|"]
    notes = set()
    for name, row in m.items():
        bpt = "–" if row["bytes_per_token"] is None else f"{row['bytes_per_token']:.2f}"
        if name in ("ce", "online"):
            within, kept = ("reference" if name == "online" else _within(row)), "–"
        else:
            within = _within(row)
            share = row.get("kept_share")
            kept = "–" if share is None else f"{share:.2f}"
            if share is None:
                notes.add(f"kept share –: {row['kept_share_reason']}")
        gap = "0 (reference)" if name == "online" else _ci(row["gap_to_online"])
        if row["verdict"]["reason"] and name != "online":
            notes.add(f"within 0.5 % –: {row['verdict']['reason']}")
        lines.append(f"| {name} | {bpt} | {_pm(row['nll'], '.4f')} | {gap} | {within} | {kept} "
                     f"| {_pm(row['kl_from_teacher'], '.4f')} | {_pm(row['accuracy'], '.4f')} "
                     f"| {_pm(row['ece'], '.4f')} | {_pm(row['step_s'], '.3f')} |")
    legend = ("- values: mean over seeds ± half-width of its 95 % t-interval; gap = paired "
              "(method - online) / online held-out NLL per seed, mean [95 % interval]; B/token "
              "= the signal's own arrays on disk")
    return lines + ["", legend] + [f"- {n}" for n in sorted(notes)]


def render(summary: dict, header: list[str]) -> str:
    """The whole report: header lines, the method table, the front, the goal, warnings."""
    t = summary["teacher"]
    lines = list(header) + [f"teacher held-out NLL {_pm(t['nll'], '.4f')}, accuracy "
                            f"{_pm(t['accuracy'], '.4f')}", ""]
    lines += method_table(summary)
    front = summary["pareto_front"]
    m = summary["methods"]
    lines += ["", "Pareto front (bytes per token vs mean gap to online KD): "
              + ", ".join(f"{n} ({m[n]['bytes_per_token']:.1f} B/token, "
                          f"{m[n]['gap_to_online']['mean'] * 100:+.2f} %)" for n in front)]
    goal = summary["goal"]
    lines.append(f"Goal: {goal['goal']}: " + (f"met by {', '.join(goal['configs'])}"
                                              if goal["met"] else "not met"))
    compared = [n for n in m if n != "online"]
    narrow = [n for n in compared if m[n]["verdict"]["narrow"]]
    lines.append(f"Intervals narrower than ±{WITHIN_LIMIT * 100:g} %: "
                 f"{', '.join(narrow) if narrow else 'none'} (of {len(compared)} compared "
                 f"methods)")
    r = summary["regime"]
    if not r["teacher_better_than_ce"]:
        lines.append(f"\nWARNING: the teacher's held-out NLL is not below the CE-only "
                     f"student's ({_ci(r['teacher_vs_ce'])}): KD pulls the students towards a "
                     f"worse model; a stronger teacher (--teacher-minutes) is needed")
    if not r["online_gain_resolved"]:
        lines.append(f"\nNOTE: online KD's gain over CE only is not resolved "
                     f"({_ci(r['online_vs_ce'])}): shares of that gain are left out")
    return "\n".join(lines)


def plot(summary: dict, out: Path, title: str) -> Path:
    """PNG: gap to online KD (%) with 95 % error bars against bytes per token (log x)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = summary["methods"]
    configs = [n for n, r in m.items() if r["bytes_per_token"] is not None]
    import matplotlib.ticker  # noqa: F401  (matplotlib.ticker below)

    xs = [m[n]["bytes_per_token"] for n in configs]
    fig, ax = plt.subplots(figsize=(8, 5))
    for name in configs:
        row, gap = m[name], m[name]["gap_to_online"]
        err = None if gap["half_width"] is None else gap["half_width"] * 100
        marker = "s" if "+" in name else "^" if "f16" in name else "o"
        ax.errorbar(row["bytes_per_token"], gap["mean"] * 100, yerr=err, fmt=marker, capsize=3,
                    color="tab:red" if name in summary["pareto_front"] else "tab:blue")
        ax.annotate(name, (row["bytes_per_token"], gap["mean"] * 100), fontsize=7,
                    xytext=(4, 4), textcoords="offset points")
    front = summary["pareto_front"]
    ax.plot([m[n]["bytes_per_token"] for n in front],
            [m[n]["gap_to_online"]["mean"] * 100 for n in front], "-", color="tab:red",
            alpha=0.6, label="Pareto front")
    ax.axhline(0, color="black", lw=0.8, label="online KD (teacher in memory)")
    ax.axhline(WITHIN_LIMIT * 100, color="tab:green", ls="--", lw=0.8, label="+0.5 %")
    ce = m["ce"]["gap_to_online"]["mean"] * 100
    ax.axhline(ce, color="gray", ls=":", lw=1, label=f"CE only ({ce:+.1f} %)")
    ax.axvline(GOAL_BYTES_PER_TOKEN, color="tab:green", ls=":", lw=0.8, label="24 B/token")
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xticks([t for t in (2, 4, 8, 16, 24, 32, 64, 128, 256)
                   if min(xs) / 1.5 <= t <= max(xs) * 1.5] or [GOAL_BYTES_PER_TOKEN])
    ax.set_xlabel("bytes per token of the stored signal (on disk)")
    ax.set_ylabel("held-out NLL gap to online KD, % (paired, 95 % CI)")
    ax.set_title(title, fontsize=9)
    ax.text(0.01, 0.01, "o one signal   s top-k + sampled   ^ f16 log-probs (else q8)",
            transform=ax.transAxes, fontsize=7, color="dimgray")
    ax.legend(fontsize=7, loc="best")
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
