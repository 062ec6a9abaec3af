"""The `distill-eval --task classify` report: report.json, report.md, report.png, config.yaml.

    report = build_classify_report({role: {head: logits [N, C]}}, {head: labels [N]},
                                   models=..., heads=..., data=..., config=..., options=...)
    paths = write_classify_report(report, "report/")

report.json:

    task                     "classify"
    models[ROLE]             what was loaded (name, path, class, kind, heads, parameters, dtype)
    heads                    {head: classes}
    data                     sources (usable/skipped per file) or store + split; samples;
                             records_skipped; problems[] ("FILE:LINE: reason", every one)
    results[ROLE]            classify_metrics.ClassifierMetrics.to_dict(): heads[HEAD]
                             {accuracy, accuracy_se, macro_f1, macro_f1_se, ece, ece_se, nll,
                             nll_se, per_class_f1, confusion, ...}, mean_macro_f1(_se)
    comparison               {"student_vs_baseline": ..., "student_vs_teacher": ...}: each
                             PairedComparison.to_dict() (heads[HEAD][METRIC] and
                             mean_macro_f1 = {metric, value = student − other, stderr, n,
                             resolved (|value| > 2 stderr), better ("a" = student, "b")}),
                             null when that role was not given
    findings[]               sentences: the resolved differences
    uncertainty              how the standard errors were computed
    config, environment

ROLE: teacher, student, baseline (those given). Every number is finite or null.
"""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

from eval.report import ROLES, _bars, _difference_cell, _table, _with_se, write_report_files
from logitstore.toolkit.json_values import nonfinite_to_none

PAIRS = (("student_vs_baseline", "baseline"), ("student_vs_teacher", "teacher"))
METRIC_NAMES = {"accuracy": "accuracy", "macro_f1": "macro-F1", "ece": "ECE", "nll": "NLL",
                "mean_macro_f1": "mean macro-F1"}
LOWER_IS_BETTER = {"ece", "nll"}


def _uncertainty(options: dict[str, Any]) -> dict[str, str]:
    return {
        "accuracy": "binomial sqrt(p (1 - p) / (n - 1)) over the labelled samples",
        "nll": "sd / sqrt(n) of the per-sample negative log-likelihoods (nats)",
        "macro-F1, ECE, mean macro-F1": f"sd of the metric over {options['bootstrap']} "
                                        f"bootstrap resamples of the samples (seed "
                                        f"{options['seed']}); ECE over {options['ece_bins']} "
                                        f"equal-width confidence bins",
        "paired differences": "student − other on the same samples: accuracy and NLL through "
                              "the per-sample differences, macro-F1/ECE through the same "
                              "resamples for both models; resolved = |d| > 2 standard errors",
    }


def findings(comparison: dict[str, Any]) -> list[str]:
    """One sentence per resolved difference (student vs baseline, then vs teacher)."""
    out = []
    for pair, other in PAIRS:
        entry = comparison.get(pair)
        if not entry:
            continue
        rows = [("all heads", entry["mean_macro_f1"])] + [
            (head, diff) for head, diffs in entry["heads"].items() for diff in diffs.values()]
        for where, diff in rows:
            if diff and diff["resolved"]:
                side = "better" if diff["better"] == "a" else "worse"
                out.append(f"student is {side} than the {other} on {where} "
                           f"{METRIC_NAMES[diff['metric']]}: {diff['value']:+.3g} ± "
                           f"{diff['stderr']:.2g} (n = {diff['n']})")
    return out


def build_classify_report(logits: dict[str, dict[str, Any]], labels: dict[str, Any], *,
                          models: dict, heads: dict, data: dict, config: dict,
                          options: dict[str, Any]) -> dict[str, Any]:
    """The report.json dict (module docstring) from every role's logits on the same labels."""
    from logitstore.toolkit.classify_metrics import classifier_metrics, paired_differences

    results = {role: classifier_metrics(logits[role], labels, **options).to_dict()
               for role in ROLES if role in logits}
    comparison = {pair: paired_differences(logits["student"], logits[other], labels,
                                           **options).to_dict() if other in logits else None
                  for pair, other in PAIRS}
    report = {"task": "classify", "models": models, "heads": dict(heads), "data": data,
              "results": results, "comparison": comparison, "findings": findings(comparison),
              "uncertainty": _uncertainty(options), "config": config,
              "environment": _environment()}
    return nonfinite_to_none(report)


def _environment() -> dict[str, Any]:
    import importlib.metadata as md

    versions = {}
    for package in ("torch", "transformers", "numpy"):
        try:
            versions[package] = md.version(package)
        except md.PackageNotFoundError:
            versions[package] = None
    return {"python": platform.python_version(), "platform": platform.platform(),
            "versions": versions}


def write_classify_report(report: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """report.json, report.md, report.png and config.yaml in out_dir; their paths."""
    return write_report_files(report, out_dir, chart=write_classify_chart,
                              markdown=render_classify_markdown,
                              config_note="every option of --task classify, defaults included")


def _result_rows(report: dict[str, Any]) -> list[list[Any]]:
    roles = [r for r in ROLES if r in report["results"]]
    comparison = report["comparison"]
    rows = []
    for head in report["heads"]:
        for metric in ("accuracy", "macro_f1", "ece", "nll"):
            values = [_with_se(report["results"][r]["heads"][head][metric],
                               report["results"][r]["heads"][head][f"{metric}_se"])
                      for r in roles]
            diffs = [_difference_cell((comparison[pair] or {}).get("heads", {}).get(head, {})
                                      .get(metric), "value") for pair, _ in PAIRS]
            rows.append([head, METRIC_NAMES[metric], "↓" if metric in LOWER_IS_BETTER else "↑",
                         *values, *diffs])
    means = [_with_se(report["results"][r]["mean_macro_f1"],
                      report["results"][r]["mean_macro_f1_se"]) for r in roles]
    rows.append(["all heads", "mean macro-F1", "↑", *means,
                 *(_difference_cell((comparison[pair] or {}).get("mean_macro_f1"), "value")
                   for pair, _ in PAIRS)])
    return rows


def render_classify_markdown(report: dict[str, Any]) -> str:
    roles = [r for r in ROLES if r in report["results"]]
    data = report["data"]
    lines = ["# distill-eval report (classify)", ""]
    lines += _table(["role", "model", "class", "parameters", "dtype", "device"],
                    [[role, m.get("name"), m.get("model_class"), m.get("parameters"),
                      m.get("dtype"), m.get("device")] for role, m in report["models"].items()])
    where = (f"store {data['store']}, split {data['split']}" if "store" in data
             else ", ".join(data["sources"]))
    lines += ["", f"Data: {where}: {data['samples']} samples scored, "
                  f"{data['records_skipped']} records skipped.", "", "## Results", "",
              "value ± standard error; differences are paired over the same samples, "
              "**✓** = resolved (more than 2 standard errors). ↑ higher is better, ↓ lower is "
              "better. – = not available.", ""]
    lines += _table(["head", "metric", "", *roles, "student − baseline", "student − teacher"],
                    _result_rows(report))
    if report["findings"]:
        lines += ["", "## What is resolved", ""]
        lines += [f"- {sentence}" for sentence in report["findings"]]
    if data["problems"]:
        lines += ["", f"## Skipped records ({data['records_skipped']})", ""]
        lines += [f"- {problem}" for problem in data["problems"]]
    lines += ["", "## How uncertainty was measured", ""]
    lines += [f"- {k}: {v}" for k, v in report["uncertainty"].items()]
    lines += ["", "![macro-F1 per head](report.png)", ""]
    return "\n".join(lines)


def write_classify_chart(report: dict[str, Any], path: str | Path) -> None:
    """Macro-F1 per head (and the mean over heads) per role, ±1 standard error bars."""
    import matplotlib

    matplotlib.use("Agg")  # no display; safe on servers and in tests
    import matplotlib.pyplot as plt


    heads = list(report["heads"])
    results = report["results"]
    roles = [r for r in ROLES if r in results]
    fig, ax = plt.subplots(figsize=(2.2 * (len(heads) + 1) + 2, 4.5))
    _bars(ax, heads + ["mean"],
          {r: [results[r]["heads"][h]["macro_f1"] for h in heads]
           + [results[r]["mean_macro_f1"]] for r in roles},
          {r: [results[r]["heads"][h]["macro_f1_se"] for h in heads]
           + [results[r]["mean_macro_f1_se"]] for r in roles})
    ax.set_ylim(0, 1)
    ax.set_title("Macro-F1 per head (higher is better; bars: ±1 standard error)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
