"""Summary, verdicts, markdown and plot of bench/classify_bench.py (pure Python + matplotlib).

    summarise(result) -> dict      methods (test macro-F1 per head and mean over seeds, paired
                                   differences to CE only), the two goals, the timing
    kd_goal(ce, full)              "the full KD student beats CE only by more than the seeds'
                                   spread": met / not met / not resolved, with the reason
    time_goal(store, online)       "a store trial costs at most 0.5x an online trial"
    render(result) -> str          bench/results/classify.md
    plot(result, path)             bench/results/classify.png

Every student of a seed has the same init and batches as that seed's CE-only student, so a
method is compared per seed (paired differences, fidelity_stats.interval: mean and 95 %
Student-t interval). The seeds' spread is the larger sample std over seeds of the two
methods' mean macro-F1. Derived figures that mean nothing (one seed: no spread, no interval)
are "–" with the reason.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from classify_students import METHOD_LABELS
from fidelity_stats import interval

TIME_LIMIT = 0.5  # issue 17: a store trial costs at most 0.5x an online-teacher trial


def _per_seed(runs: list[dict], head: str | None = None) -> list[float]:
    if head is None:
        return [r["test"]["mean_macro_f1"] for r in runs]
    return [r["test"]["heads"][head]["macro_f1"] for r in runs]


def _paired(a: list[float], b: list[float]) -> dict:
    if len(a) != len(b) or not a:
        raise ValueError(f"expected the same non-zero number of seeds for both methods, "
                         f"found {len(a)} and {len(b)}")
    return interval([x - y for x, y in zip(a, b)])


def spread(*series: list[float]) -> float | None:
    """The largest sample std over seeds among the series (None with one seed)."""
    stds = [statistics.stdev(s) for s in series if len(s) > 1]
    return max(stds) if stds else None


def kd_goal(ce: list[float], full: list[float]) -> dict:
    """met: the paired gain's 95 % interval lies above the seeds' spread; not met: it lies
    below; not resolved: it holds the spread (or one seed)."""
    gain, seeds_spread = _paired(full, ce), spread(ce, full)
    out = {"gain": gain, "spread": seeds_spread}
    if gain["half_width"] is None or seeds_spread is None:
        return {**out, "verdict": "not resolved", "reason": "one seed: no spread, no interval"}
    if gain["low"] > seeds_spread:
        return {**out, "verdict": "met", "reason": None}
    if gain["high"] < seeds_spread:
        return {**out, "verdict": "not met",
                "reason": "the gain's 95 % interval lies below the seeds' spread"}
    return {**out, "verdict": "not resolved",
            "reason": "the gain's 95 % interval holds the seeds' spread"}


def time_goal(store_s: list[float], online_s: list[float]) -> dict:
    """Per-seed ratio store / online trial seconds; met when its 95 % interval lies at or
    below 0.5, not met when above, else not resolved (one seed: the ratio alone, no verdict)."""
    ratio = interval([s / o for s, o in zip(store_s, online_s)])
    if ratio["half_width"] is None:
        return {"ratio": ratio, "verdict": "not resolved", "reason": "one seed: no interval"}
    if ratio["high"] <= TIME_LIMIT:
        return {"ratio": ratio, "verdict": "met", "reason": None}
    if ratio["low"] > TIME_LIMIT:
        return {"ratio": ratio, "verdict": "not met",
                "reason": f"the ratio's 95 % interval lies above {TIME_LIMIT}"}
    return {"ratio": ratio, "verdict": "not resolved",
            "reason": f"the ratio's 95 % interval holds {TIME_LIMIT}"}


def method_rows(students: dict[str, list[dict]], heads: list[str]) -> dict:
    """Per method: test macro-F1 per head and mean (interval over seeds) and paired
    differences to CE only."""
    ce = students["ce"]
    rows = {}
    for name, runs in students.items():
        row = {"mean_macro_f1": interval(_per_seed(runs)),
               "heads": {h: interval(_per_seed(runs, h)) for h in heads},
               "seconds": interval([r["seconds"] for r in runs])}
        if name != "ce":
            row["vs_ce"] = {"mean_macro_f1": _paired(_per_seed(runs), _per_seed(ce)),
                            "heads": {h: _paired(_per_seed(runs, h), _per_seed(ce, h))
                                      for h in heads}}
        rows[name] = row
    return rows


def summarise(result: dict) -> dict:
    students, timing = result["students"], result["timing"]
    heads = sorted(result["teacher"]["val"]["heads"])
    trials = max(1, result["settings"]["trials"])
    store = [r["seconds"] for r in timing["store"]]
    shared = [s + result["dump"]["seconds"] / trials for s in store]
    return {"methods": method_rows(students, heads),
            "kd_goal": kd_goal(_per_seed(students["ce"]), _per_seed(students["kl_mse_crd"])),
            "time_goal": time_goal(store, [r["seconds"] for r in timing["online"]]),
            "time_goal_with_dump_share": time_goal(shared,
                                                   [r["seconds"] for r in timing["online"]])}


# ---- markdown ---------------------------------------------------------------------------------

def _fmt(stat: dict, fmt: str = ".3f") -> str:
    if stat["half_width"] is None:
        return f"{stat['mean']:{fmt}}"
    return f"{stat['mean']:{fmt}} ± {stat['std']:{fmt}}"


def _ci(stat: dict, fmt: str = "+.3f") -> str:
    if stat["half_width"] is None:
        return f"{stat['mean']:{fmt}} [–: one seed]"
    return f"{stat['mean']:{fmt}} [{stat['low']:{fmt}}, {stat['high']:{fmt}}]"


def _teacher_lines(result: dict) -> list[str]:
    teacher, bayes = result["teacher"], result["dataset"].get("bayes_accuracy", {})
    lines = [f"Teacher: {teacher['parameters'] / 1e6:.2f} M parameters, {teacher['steps']} CE "
             f"steps in {teacher['seconds']:.0f} s. Student: "
             f"{result['student_parameters'] / 1e6:.2f} M parameters.", "",
             "| head | teacher val accuracy | teacher val macro-F1 | Bayes accuracy (both) |",
             "|---|---|---|---|"]
    for head, m in sorted(teacher["val"]["heads"].items()):
        ceiling = bayes.get(head, {}).get("both") if isinstance(bayes.get(head), dict) else None
        lines.append(f"| {head} | {m['accuracy']:.3f} | {m['macro_f1']:.3f} | "
                     f"{ceiling if ceiling is not None else '–'} |")
    return lines


def render(result: dict) -> str:
    summary, settings = result["summary"], result["settings"]
    heads = sorted(result["teacher"]["val"]["heads"])
    lines = [f"# Classifier KD from one store ({'quick' if settings['quick'] else 'full'})", "",
             f"{settings['samples']} samples {settings['image_size']}x{settings['image_size']}, "
             f"seeds {settings['seeds']}, {settings['steps']} student steps, sweep of "
             f"{settings['trials']} trials. Held-out = the test split; ± = std over seeds; "
             f"[..] = 95 % paired t-interval vs CE only.", ""]
    lines += _teacher_lines(result) + ["", f"Store: {result['dump']['seconds']:.1f} s to dump, "
                                       f"verify {result['dump']['verify']}.", ""]
    lines += ["| student | mean macro-F1 | " + " | ".join(f"{h} macro-F1" for h in heads)
              + " | vs CE only (mean) | s/trial |", "|---" * (len(heads) + 4) + "|"]
    for name, row in summary["methods"].items():
        paired = _ci(row["vs_ce"]["mean_macro_f1"]) if "vs_ce" in row else "–"
        lines.append(f"| {METHOD_LABELS.get(name, name)} | {_fmt(row['mean_macro_f1'])} | "
                     + " | ".join(_fmt(row["heads"][h]) for h in heads)
                     + f" | {paired} | {row['seconds']['mean']:.1f} |")
    kd, tg = summary["kd_goal"], summary["time_goal"]
    spread_text = f"{kd['spread']:.3f}" if kd["spread"] is not None else "–"
    lines += ["", f"Goal, full KD beats CE only by more than the seeds' spread: **{kd['verdict']}**"
              f" (gain {_ci(kd['gain'])}, spread {spread_text}"
              f"{'; ' + kd['reason'] if kd['reason'] else ''}).",
              f"Goal, a store trial <= {TIME_LIMIT}x an online-teacher trial: **{tg['verdict']}**"
              f" (ratio {_ci(tg['ratio'], '.3f')}{'; ' + tg['reason'] if tg['reason'] else ''});"
              f" with each trial's share of the dump over {settings['trials']} trials: "
              f"{_ci(summary['time_goal_with_dump_share']['ratio'], '.3f')}."]
    if result.get("sweep"):
        best = result["sweep"]["best"]
        lines += ["", f"Sweep: {result['sweep']['trials']} trials in "
                  f"{result['sweep']['seconds']:.0f} s (each trial a student-train "
                  f"process: median {statistics.median(result['sweep']['trial_seconds']):.1f} "
                  f"s with its interpreter start); best " + ", ".join(
                      f"{k}={v:.3g}" for k, v in best.items())]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = result["summary"]
    heads = sorted(result["teacher"]["val"]["heads"])
    names = list(summary["methods"])
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / len(heads)
    for k, head in enumerate(heads):
        stats = [summary["methods"][n]["heads"][head] for n in names]
        left.bar([i + k * width for i in range(len(names))], [s["mean"] for s in stats], width,
                 yerr=[s["std"] or 0 for s in stats], label=head, capsize=3)
        left.axhline(result["teacher"]["val"]["heads"][head]["macro_f1"], ls="--", lw=0.8,
                     color=f"C{k}")
    left.set_xticks([i + width * (len(heads) - 1) / 2 for i in range(len(names))],
                    [METHOD_LABELS.get(n, n) for n in names],
                    rotation=20)
    left.set_ylabel("test macro-F1 (dashed: teacher val)")
    left.legend()
    timing = result["timing"]
    means = [statistics.fmean(r["seconds"] for r in timing[k]) for k in ("store", "online")]
    right.bar(["store trial", "online-teacher trial"], means, color=["C2", "C3"])
    right.set_ylabel("seconds per trial")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
