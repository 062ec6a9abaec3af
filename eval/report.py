"""The distill-eval report: comparison math, report.json, report.md and report.png.

Retention (per metric, one row of the comparison table):

    retention  = student / teacher
    gap_closed = (student - baseline) / (teacher - baseline)

`gap_closed` is 1 when the student matches the teacher and 0 when it is no better than
the baseline, whatever the metric's direction. It is given only where it means something:
a quality metric (for efficiency, "how much of the teacher-baseline gap" has no meaning:
see the ratios) on which the teacher beats the baseline by more than 2 standard errors.
Elsewhere it is null and `gap_closed_reason` says why (in report.md: "–" and the reason);
dividing by a teacher-baseline gap that is noise, or negative, gives numbers like 6 or
170 for a student that is worse than the baseline. Retention is null (never an error)
when a value is missing or not finite, or when the teacher's is 0. For lower-is-better
metrics (perplexity, latency, memory; marked ↓ in report.md) a retention above 1 means
the student is worse.

Tokenizers: perplexity, NLL and next-token accuracy are per token of each model's own
tokenizer, so between two models of different tokenizers (a student distilled across
tokenizers, a baseline of another family) their retention, difference and gap closed are
null with `tokenizer_note` saying why; held-out texts also give bits per byte
(eval/perplexity.py), which compares any two.

Uncertainty (eval/uncertainty.py): each role's standard error comes from its per-item
scores (questions, held-out sequences), else from lm-eval's stderr; the student-baseline
and teacher-baseline differences are paired over the items both were scored on. A
difference is *resolved* when it exceeds 2 standard errors; `findings` says in words
which student-baseline differences are.

Ratios of the efficiency section, all "> 1 = the student is cheaper/faster":
compression = teacher parameters (or disk bytes) / student's; memory = teacher peak /
student peak; speed-up = student tokens/s / teacher tokens/s, and teacher latency /
student latency.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable

from eval.tokenizer_units import tokenizer_clash, without_cross_tokenizer_comparisons
from eval.uncertainty import (RESOLVED_AT, Estimate, estimate, is_resolved, paired_difference,
                              unpaired_difference)
from logitstore.toolkit.json_values import nonfinite_to_none

ROLES = ("teacher", "student", "baseline")
EFFICIENCY = "efficiency"
# Metrics where lower is better; everything else reported is higher-is-better.
LOWER_IS_BETTER = {"perplexity", "nll", "bits_per_byte", "parameters", "weights_bytes",
                   "disk_bytes", "peak_memory_bytes", "latency_p50_s", "latency_p95_s"}
# Counts that describe the data, not the model: kept in report.json, not compared.
NOT_COMPARED = {"tokens", "sequences", "speed_samples", "bytes"}
# name -> (numerator role metric, denominator role metric), both from `efficiency`
RATIOS = {
    "compression_parameters": ("teacher", "student", "parameters"),
    "compression_weights_in_memory": ("teacher", "student", "weights_bytes"),
    "compression_disk": ("teacher", "student", "disk_bytes"),
    "memory_reduction": ("teacher", "student", "peak_memory_bytes"),
    "speedup_prompt_tokens": ("student", "teacher", "prompt_tokens_per_s"),
    "speedup_generation_tokens": ("student", "teacher", "generation_tokens_per_s"),
    "speedup_latency_p50": ("teacher", "student", "latency_p50_s"),
    "speedup_latency_p95": ("teacher", "student", "latency_p95_s"),
}


# ----------------------------------------------------------------------------- math


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def ratio(numerator: Any, denominator: Any) -> float | None:
    """numerator / denominator, or None when either is missing/non-finite or denom is 0."""
    a, b = _number(numerator), _number(denominator)
    if a is None or b is None or b == 0:
        return None
    return a / b


def retention(student: Any, teacher: Any) -> float | None:
    return ratio(student, teacher)


def gap_closed(student: Any, teacher: Any, baseline: Any) -> float | None:
    s, t, b = _number(student), _number(teacher), _number(baseline)
    if s is None or t is None or b is None:
        return None
    return ratio(s - b, t - b)


def comparison_rows(results: dict[str, dict[str, dict[str, Any]]],
                    stderr: dict | None = None, items: dict | None = None,
                    tokenizers: dict[str, str | None] | None = None) -> list[dict[str, Any]]:
    """One row per (task, metric) any role has, in first-seen order, efficiency last.

    `stderr[role][task][metric]`: lm-eval's standard errors; `items[role][task][metric]`:
    per-item scores (eval/uncertainty.py), from which the standard errors and the paired
    differences are computed where they exist. `tokenizers[role]`: its tokenizer's
    fingerprint; a per-token metric of two roles with different ones gets no retention,
    difference or gap closed (`tokenizer_note` says why)."""
    keys: dict[tuple[str, str], None] = {}
    for role in ROLES:
        for task, metrics in results.get(role, {}).items():
            for metric in metrics:
                if metric not in NOT_COMPARED:
                    keys[(task, metric)] = None
    ordered = sorted(keys, key=lambda k: k[0] == EFFICIENCY)  # stable: tasks keep order
    rows = []
    for task, metric in ordered:
        values = {role: _number(results.get(role, {}).get(task, {}).get(metric))
                  for role in ROLES}
        row = {
            "task": task,
            "metric": metric,
            "higher_is_better": metric not in LOWER_IS_BETTER,
            **values,
            "retention": retention(values["student"], values["teacher"]),
        }
        if task != EFFICIENCY:
            row.update(_uncertainty(task, metric, values, stderr or {}, items or {}))
        clash = tokenizer_clash(metric, tokenizers or {})
        if clash:
            row.update(without_cross_tokenizer_comparisons(row, clash))
        row["gap_closed"], row["gap_closed_reason"] = (None, clash[1]) if clash else \
            _gap_closed_or_reason(row)  # (any pair: it takes all three roles)
        rows.append(row)
    return rows


def _uncertainty(task: str, metric: str, values: dict, stderr: dict, items: dict) -> dict:
    """A row's `stderr` per role and its student/teacher-vs-baseline differences."""
    per_item = {role: items.get(role, {}).get(task, {}).get(metric) for role in ROLES}
    errors = {}
    for role in ROLES:
        fit = estimate(per_item[role], metric)
        lm_eval = _number(stderr.get(role, {}).get(task, {}).get(metric))
        errors[role] = fit.stderr if fit is not None and fit.stderr is not None else lm_eval
    out: dict[str, Any] = {"stderr": errors}
    for role in ("student", "teacher"):
        diff = paired_difference(per_item[role], per_item["baseline"], metric) or \
            unpaired_difference(values[role], errors[role], values["baseline"],
                                errors["baseline"])
        out[f"{role}_vs_baseline"] = _difference(diff, role, metric not in LOWER_IS_BETTER)
    return out


def _difference(diff: Estimate | None, role: str, higher_is_better: bool) -> dict | None:
    """report.json's form of `role - baseline`: which is better, and whether it is resolved."""
    if diff is None:
        return None
    better = None
    if diff.value != 0:
        better = role if (diff.value > 0) == higher_is_better else "baseline"
    return {"difference": diff.value, "stderr": diff.stderr, "items": diff.n,
            "paired": diff.paired, "resolved": is_resolved(diff), "better": better}


def _gap_closed_or_reason(row: dict[str, Any]) -> tuple[float | None, str | None]:
    """(gap_closed, None) where the teacher beats the baseline by more than the noise,
    else (None, why not)."""
    if row["task"] == EFFICIENCY:
        return None, "efficiency is not a quality metric: see the ratios"
    missing = [role for role in ROLES if row[role] is None]
    if missing:
        return None, f"no {' or '.join(missing)} score"
    gap = row.get("teacher_vs_baseline")
    if gap is None or gap["stderr"] is None:
        return None, ("no standard error for this metric (a corpus-level score has no "
                      "per-item values), so the teacher-baseline gap cannot be told from noise")
    shown = f"teacher − baseline = {gap['difference']:+.3g} ± {gap['stderr']:.2g}"
    if gap["better"] != "teacher":
        return None, f"the teacher does not beat the baseline ({shown})"
    if not gap["resolved"]:
        return None, (f"the teacher's lead over the baseline is within {RESOLVED_AT:g} "
                      f"standard errors ({shown})")
    return gap_closed(row["student"], row["teacher"], row["baseline"]), None


def findings(rows: list[dict[str, Any]]) -> list[str]:
    """One sentence per quality metric: is the student-baseline difference resolved?"""
    out = []
    for row in rows:
        diff = row.get("student_vs_baseline")
        if row["task"] == EFFICIENCY or diff is None:
            continue
        name = f"{row['task']} {row['metric']}"
        values = f"student {_fmt(row['student'])}, baseline {_fmt(row['baseline'])}"
        if diff["stderr"] is None:
            out.append(f"{name}: {values}; no standard error (no per-item scores), so "
                       "whether they differ is not known.")
            continue
        how = (f"paired over {diff['items']} items" if diff["paired"] else
               "unpaired (no per-item scores)")
        size = f"{diff['difference']:+.3g} ± {diff['stderr']:.2g}, {how}"
        if diff["better"] is None:
            out.append(f"{name}: {values}; no difference ({size}).")
        elif diff["resolved"]:
            out.append(f"{name}: the {diff['better']} is better, resolved ({size}; "
                       f"|difference| > {RESOLVED_AT:g} SE).")
        else:
            out.append(f"{name}: the {diff['better']} is ahead but not resolved ({size}; "
                       f"within {RESOLVED_AT:g} SE).")
    return out


def efficiency_ratios(results: dict[str, dict[str, dict[str, Any]]]) -> dict[str, float | None]:
    def get(role: str, metric: str):
        return results.get(role, {}).get(EFFICIENCY, {}).get(metric)

    return {name: ratio(get(num, metric), get(den, metric))
            for name, (num, den, metric) in RATIOS.items()}


UNCERTAINTY_NOTES = {
    "standard errors": "per role, from per-item scores (questions; held-out sequences for "
                       "perplexity, NLL and next-token accuracy, by the delta method), else "
                       "lm-eval's stderr; none for corpus BLEU",
    "differences": "student − baseline and teacher − baseline, paired over the items both "
                   "were scored on (unpaired where per-item scores are missing)",
    "resolved": f"|difference| > {RESOLVED_AT:g} standard errors",
    "gap closed": f"only where the teacher beats the baseline by more than {RESOLVED_AT:g} "
                  "standard errors",
}


def build_report(*, results: dict, stderr: dict, models: dict, tasks: dict, skipped: list,
                 efficiency_notes: dict, config: dict, environment: dict,
                 items: dict | None = None) -> dict[str, Any]:
    """The report.json document (layout: eval/cli.py's docstring). `items`: per-item
    scores, items[role][task][metric][item id] (eval/uncertainty.py); not stored."""
    rows = comparison_rows(results, stderr, items,
                           {role: m.get("tokenizer_fingerprint") for role, m in models.items()})
    return nonfinite_to_none({
        "schema": "distill-eval/1",
        "models": models,
        "tasks": tasks,
        "skipped": skipped,
        "results": results,
        "stderr": stderr,
        "comparison": rows,
        "findings": findings(rows),
        "uncertainty": UNCERTAINTY_NOTES,
        "ratios": efficiency_ratios(results),
        "efficiency_notes": efficiency_notes,
        "environment": environment,
        "config": config,
    })


# ----------------------------------------------------------------------------- writing


def write_report(report: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """report.json, report.md, report.png and config.yaml in out_dir; their paths."""
    return write_report_files(report, out_dir, chart=write_chart, markdown=render_markdown,
                              config_note="every option, defaults included")


def write_report_files(report: dict[str, Any], out_dir: str | Path, *, chart, markdown,
                       config_note: str) -> dict[str, Path]:
    """The four files of a report (either task): JSON, resolved config, chart, markdown."""
    import yaml

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {name: out / name for name in ("report.json", "report.md", "report.png",
                                           "config.yaml")}
    paths["report.json"].write_text(json.dumps(report, indent=2, allow_nan=False) + "\n",
                                    encoding="utf-8")
    paths["config.yaml"].write_text(
        f"# distill-eval resolved configuration ({config_note})\n"
        + yaml.safe_dump(report["config"], sort_keys=False), encoding="utf-8")
    chart(report, paths["report.png"])
    paths["report.md"].write_text(markdown(report), encoding="utf-8")
    return paths


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer()
                                  and abs(value) >= 1000):
        return f"{int(value):,}"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.3e}"
    return str(value)


def _table(header: list[str], rows: Iterable[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]
    return lines


def _with_se(value: Any, stderr: Any) -> str:
    return _fmt(value) if value is None or stderr is None else \
        f"{_fmt(value)} ± {stderr:.2g}"


def _difference_cell(diff: dict | None, key: str = "difference") -> str:
    """A paired difference `diff[key]` ± its standard error, ✓ when resolved; – when absent."""
    if not diff:
        return "–"
    if diff["stderr"] is None:
        return f"{diff[key]:+.4g}"
    mark = " **✓**" if diff["resolved"] else ""
    return f"{diff[key]:+.3g} ± {diff['stderr']:.2g}{mark}"


def _row_cells(r: dict[str, Any]) -> list[Any]:
    errors = r.get("stderr") or {}
    return [r["task"], r["metric"], "↑" if r["higher_is_better"] else "↓",
            *(_with_se(r[role], errors.get(role)) for role in ROLES),
            _difference_cell(r.get("student_vs_baseline")), r["retention"], r["gap_closed"]]


def render_markdown(report: dict[str, Any]) -> str:
    models = report["models"]
    rows = report["comparison"]
    lines = ["# distill-eval report", ""]
    lines += _table(["role", "model", "quantization", "dtype", "device"],
                    [[role, m.get("name"), m.get("quantization"), m.get("dtype"),
                      m.get("device")] for role, m in models.items()])
    lines += ["", "## Results", "",
              "value ± standard error; student − baseline is paired over the same items "
              f"(questions, held-out sequences), **✓** = resolved (more than {RESOLVED_AT:g} "
              "standard errors). retention = student / teacher; gap closed = (student − "
              "baseline) / (teacher − baseline), only where the teacher beats the baseline by "
              f"more than {RESOLVED_AT:g} standard errors (see below). – = not available. "
              "↑ higher is better, ↓ lower is better. ROUGE in [0, 1], BLEU in [0, 100].", ""]
    quality = [r for r in rows if r["task"] != EFFICIENCY]
    lines += _table(["task", "metric", "", "teacher", "student", "baseline",
                     "student − baseline", "retention", "gap closed"],
                    [_row_cells(r) for r in quality])
    if report.get("findings"):
        lines += ["", "## Student vs baseline: what is resolved", ""]
        lines += [f"- {sentence}" for sentence in report["findings"]]
    reasons = [r for r in quality if r.get("gap_closed_reason")]
    if reasons:
        lines += ["", "## Gap closed: where it is –, and why", ""]
        lines += [f"- {r['task']} {r['metric']}: {r['gap_closed_reason']}" for r in reasons]
    efficiency = [r for r in rows if r["task"] == EFFICIENCY]
    if efficiency:
        lines += ["", "## Efficiency", ""]
        lines += _table(["task", "metric", "", "teacher", "student", "baseline", "retention"],
                        [[r["task"], r["metric"], "↑" if r["higher_is_better"] else "↓",
                          r["teacher"], r["student"], r["baseline"], r["retention"]]
                         for r in efficiency])
    lines += ["", "## Compression and speed-up (teacher vs student, > 1 = student cheaper)", ""]
    lines += _table(["ratio", "value"], [[k, v] for k, v in report["ratios"].items()])
    if report["skipped"]:
        lines += ["", "## Skipped", ""]
        lines += [f"- **{s['task']}**" + (f" ({s['role']})" if s.get("role") else "")
                  + f": {s['reason']}" for s in report["skipped"]]
    notes = report.get("efficiency_notes") or {}
    if notes:
        lines += ["", "## How efficiency was measured", ""]
        lines += [f"- {k}: {v}" for k, v in notes.items()]
    if report.get("uncertainty"):
        lines += ["", "## How uncertainty was measured", ""]
        lines += [f"- {k}: {v}" for k, v in report["uncertainty"].items()]
    lines += ["", "![accuracy and efficiency](report.png)", ""]
    return "\n".join(lines)


def write_chart(report: dict[str, Any], path: str | Path) -> None:
    """Three panels: quality metrics in [0, 1] and held-out perplexities by role, with
    ±1 standard error bars, and efficiency relative to the teacher."""
    import matplotlib

    matplotlib.use("Agg")  # no display; safe on servers and in tests
    import matplotlib.pyplot as plt

    roles = [r for r in ROLES if r in report["results"]]
    quality = [r for r in report["comparison"] if r["task"] != EFFICIENCY
               and r["metric"] in {"acc", "acc_norm", "rouge1", "rouge2", "rougeL",
                                   "next_token_accuracy"}]
    # held-out texts: bits per byte where measured (it compares any two tokenizers)
    per_byte = [r for r in report["comparison"] if r["metric"] == "bits_per_byte"]
    held_out = per_byte or [r for r in report["comparison"] if r["metric"] == "perplexity"]
    efficiency = [r for r in report["comparison"] if r["task"] == EFFICIENCY]
    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(17, 5.5),
                                              gridspec_kw={"width_ratios": [3, 1, 2]})
    _bars(left, [f"{r['task']}\n{r['metric']}" for r in quality],
          {role: [r[role] for r in quality] for role in roles},
          {role: [(r.get("stderr") or {}).get(role) for r in quality] for role in roles})
    left.set_title("Quality (higher is better; bars: ±1 standard error)")
    left.set_ylim(0, 1)
    _bars(middle, [r["task"] for r in held_out],
          {role: [r[role] for r in held_out] for role in roles},
          {role: [(r.get("stderr") or {}).get(role) for r in held_out] for role in roles})
    middle.set_title(f"{'Bits per byte' if per_byte else 'Perplexity'} (lower is better; "
                     f"±1 SE)")
    _bars(right, [r["metric"] for r in efficiency],
          {role: [ratio(r[role], r["teacher"]) for r in efficiency] for role in roles})
    right.set_title("Efficiency relative to the teacher (teacher = 1)")
    right.axhline(1.0, color="grey", linewidth=0.8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _bars(ax, labels: list[str], series: dict[str, list[float | None]],
          errors: dict[str, list[float | None]] | None = None) -> None:
    if not labels:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        ax.set_xticks([])
        return
    width = 0.8 / max(len(series), 1)
    for i, (role, values) in enumerate(series.items()):
        xs = [x + (i - (len(series) - 1) / 2) * width for x in range(len(labels))]
        yerr = None
        if errors and any(e is not None for e in errors.get(role, [])):
            yerr = [e if e is not None else 0.0 for e in errors[role]]
        ax.bar(xs, [v if v is not None else 0.0 for v in values], width, label=role,
               yerr=yerr, capsize=3 if yerr else 0, error_kw={"elinewidth": 1})
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=45, ha="right", fontsize=8)
    ax.legend()
