"""The distill-eval report: comparison math, report.json, report.md and report.png.

Retention (per metric, one row of the comparison table):

    retention  = student / teacher
    gap_closed = (student - baseline) / (teacher - baseline)

`gap_closed` is 1 when the student matches the teacher and 0 when it is no better than
the baseline, whatever the metric's direction; it is given for quality metrics only (for
efficiency, "how much of the teacher-baseline gap" has no meaning: see the ratios).
Both are null (never an error) when a value is missing or not finite, or when the
denominator is 0 (teacher == baseline, teacher == 0). For lower-is-better metrics
(perplexity, latency, memory; marked ↓ in report.md) a retention above 1 means the
student is worse.

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

ROLES = ("teacher", "student", "baseline")
EFFICIENCY = "efficiency"
# Metrics where lower is better; everything else reported is higher-is-better.
LOWER_IS_BETTER = {"perplexity", "nll", "parameters", "weights_bytes", "disk_bytes",
                   "peak_memory_bytes", "latency_p50_s", "latency_p95_s"}
# Counts that describe the data, not the model: kept in report.json, not compared.
NOT_COMPARED = {"tokens", "sequences", "speed_samples"}
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


def comparison_rows(results: dict[str, dict[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """One row per (task, metric) any role has, in first-seen order, efficiency last."""
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
        rows.append({
            "task": task,
            "metric": metric,
            "higher_is_better": metric not in LOWER_IS_BETTER,
            **values,
            "retention": retention(values["student"], values["teacher"]),
            "gap_closed": None if task == EFFICIENCY else
            gap_closed(values["student"], values["teacher"], values["baseline"]),
        })
    return rows


def efficiency_ratios(results: dict[str, dict[str, dict[str, Any]]]) -> dict[str, float | None]:
    def get(role: str, metric: str):
        return results.get(role, {}).get(EFFICIENCY, {}).get(metric)

    return {name: ratio(get(num, metric), get(den, metric))
            for name, (num, den, metric) in RATIOS.items()}


def build_report(*, results: dict, stderr: dict, models: dict, tasks: dict, skipped: list,
                 efficiency_notes: dict, config: dict, environment: dict) -> dict[str, Any]:
    """The report.json document (layout: eval/cli.py's docstring)."""
    return _finite({
        "schema": "distill-eval/1",
        "models": models,
        "tasks": tasks,
        "skipped": skipped,
        "results": results,
        "stderr": stderr,
        "comparison": comparison_rows(results),
        "ratios": efficiency_ratios(results),
        "efficiency_notes": efficiency_notes,
        "environment": environment,
        "config": config,
    })


def _finite(value: Any) -> Any:
    """NaN/inf -> None everywhere: JSON has no such numbers and tools choke on them."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


# ----------------------------------------------------------------------------- writing


def write_report(report: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """report.json, report.md, report.png and config.yaml in out_dir; their paths."""
    import yaml

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {name: out / name for name in ("report.json", "report.md", "report.png",
                                           "config.yaml")}
    paths["report.json"].write_text(json.dumps(report, indent=2, allow_nan=False) + "\n",
                                    encoding="utf-8")
    paths["config.yaml"].write_text(
        "# distill-eval resolved configuration (every option, defaults included)\n"
        + yaml.safe_dump(report["config"], sort_keys=False), encoding="utf-8")
    write_chart(report, paths["report.png"])
    paths["report.md"].write_text(render_markdown(report), encoding="utf-8")
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


def render_markdown(report: dict[str, Any]) -> str:
    models = report["models"]
    lines = ["# distill-eval report", ""]
    lines += _table(["role", "model", "quantization", "dtype", "device"],
                    [[role, m.get("name"), m.get("quantization"), m.get("dtype"),
                      m.get("device")] for role, m in models.items()])
    lines += ["", "## Results", "",
              "retention = student / teacher; gap closed = (student − baseline) / "
              "(teacher − baseline); – = not available (role missing, task skipped, or "
              "teacher = baseline). ↑ higher is better, ↓ lower is better. ROUGE in [0, 1], "
              "BLEU in [0, 100].", ""]
    lines += _table(["task", "metric", "", "teacher", "student", "baseline", "retention",
                     "gap closed"],
                    [[r["task"], r["metric"], "↑" if r["higher_is_better"] else "↓",
                      r["teacher"], r["student"], r["baseline"], r["retention"],
                      r["gap_closed"]] for r in report["comparison"]])
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
    lines += ["", "![accuracy and efficiency](report.png)", ""]
    return "\n".join(lines)


def write_chart(report: dict[str, Any], path: str | Path) -> None:
    """Two panels: quality metrics by role (bars) and efficiency relative to the teacher."""
    import matplotlib

    matplotlib.use("Agg")  # no display; safe on servers and in tests
    import matplotlib.pyplot as plt

    roles = [r for r in ROLES if r in report["results"]]
    quality = [r for r in report["comparison"] if r["task"] != EFFICIENCY
               and r["metric"] in {"acc", "acc_norm", "rouge1", "rouge2", "rougeL",
                                   "next_token_accuracy"}]
    efficiency = [r for r in report["comparison"] if r["task"] == EFFICIENCY]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    _bars(left, [f"{r['task']}\n{r['metric']}" for r in quality],
          {role: [r[role] for r in quality] for role in roles})
    left.set_title("Quality (higher is better)")
    left.set_ylim(0, 1)
    _bars(right, [r["metric"] for r in efficiency],
          {role: [ratio(r[role], r["teacher"]) for r in efficiency] for role in roles})
    right.set_title("Efficiency relative to the teacher (teacher = 1)")
    right.axhline(1.0, color="grey", linewidth=0.8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _bars(ax, labels: list[str], series: dict[str, list[float | None]]) -> None:
    if not labels:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        ax.set_xticks([])
        return
    width = 0.8 / max(len(series), 1)
    for i, (role, values) in enumerate(series.items()):
        xs = [x + (i - (len(series) - 1) / 2) * width for x in range(len(labels))]
        ax.bar(xs, [v if v is not None else 0.0 for v in values], width, label=role)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=45, ha="right", fontsize=8)
    ax.legend()
