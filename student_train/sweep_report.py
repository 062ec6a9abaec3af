"""What `student-train sweep` writes about its study, in DIR:

- `best.yaml`: the best complete trial's resolved config (its trials/NNN/config.yaml) as a
  ready preset, `out` and `resume` cleared; its header names the command that uses it and the
  trial, the metric and its value;
- `trials.csv`: one row per trial: number, state, value, duration_s, each parameter, note
  (why it failed, `stale` for one whose process died with a killed sweep, `rerun of N`);
- `trials.png`: the metric against each parameter, one panel per parameter (complete trials
  as dots, pruned ones at their last reported value as crosses, the best one ringed).

`write_reports(study, out, metric, direction, command)` writes all three (best.yaml only when
a trial completed) and returns the best trial or None.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

STALE = "stale"  # user attribute of a trial whose process died with its sweep
ERROR = "error"  # user attribute: why a trial failed
RERUN_OF = "rerun_of"  # user attribute: the stale trial this one re-runs


def trial_value(trial) -> float | None:
    """A complete trial's value, a pruned one's last reported value, else None."""
    if trial.value is not None:
        return trial.value
    if trial.intermediate_values:
        return trial.intermediate_values[max(trial.intermediate_values)]
    return None


def trial_note(trial) -> str:
    attrs = trial.user_attrs
    notes = []
    if attrs.get(STALE):
        notes.append("stale: its process ended with the sweep; re-run")
    if attrs.get(RERUN_OF) is not None:
        notes.append(f"rerun of trial {attrs[RERUN_OF]}")
    if attrs.get(ERROR):
        notes.append(" ".join(str(attrs[ERROR]).split()))
    return "; ".join(notes)


def best_trial(study):
    from optuna.trial import TrialState

    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                if t.value is not None and not math.isnan(t.value)]
    if not complete:
        return None
    pick = min if study.direction.name == "MINIMIZE" else max
    return pick(complete, key=lambda t: t.value)


def write_trials_csv(study, path: Path, names: list[str]) -> None:
    rows = []
    for t in study.get_trials(deepcopy=False):
        duration = (t.datetime_complete - t.datetime_start).total_seconds() \
            if t.datetime_complete and t.datetime_start else None
        value = trial_value(t)
        rows.append({"number": t.number, "state": t.state.name.lower(),
                     "value": "" if value is None else f"{value:.6g}",
                     "duration_s": "" if duration is None else f"{duration:.1f}",
                     **{n: t.params.get(n, "") for n in names}, "note": trial_note(t)})
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, ["number", "state", "value", "duration_s", *names, "note"])
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)


def write_best_preset(trial, out: Path, metric: str, direction: str, command: str) -> Path:
    """best.yaml from trials/NNN/config.yaml of `trial` (out/resume cleared)."""
    import yaml

    source = out / "trials" / f"{trial.number:03d}" / "config.yaml"
    config = yaml.safe_load(source.read_text(encoding="utf-8"))["train"]
    config["out"], config["resume"] = None, None
    path = out / "best.yaml"
    header = (f"# student-train --config {path} --out RUN_DIR\n"
              f"# best trial of a sweep: trial {trial.number}, {metric} = {trial.value:.6g} "
              f"({direction}); its run: {source.parent / 'run'}\n"
              f"# sweep: {command}\n")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(header + yaml.safe_dump({"train": config}, sort_keys=False),
                   encoding="utf-8")
    tmp.replace(path)
    return path


def _as_position(values: list[Any], dimension: dict[str, Any]) -> tuple[list[float], list | None]:
    """x positions of parameter values; categorical values at 0, 1, ... (with their labels)."""
    if dimension.get("type") != "categorical":
        return [float(v) for v in values], None
    labels = list(dimension.get("choices", []))
    return [float(labels.index(v)) if v in labels else math.nan for v in values], labels


def write_trials_plot(study, path: Path, space: dict[str, dict], metric: str) -> None:
    """trials.png: metric vs each parameter, one panel per parameter."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from optuna.trial import TrialState

    names = list(space)
    cols = min(3, max(1, len(names)))
    rows = math.ceil(len(names) / cols) or 1
    figure = Figure(figsize=(4.2 * cols, 3.4 * rows), layout="constrained")
    FigureCanvasAgg(figure)
    best = best_trial(study)
    kinds = {"complete": (TrialState.COMPLETE,), "pruned": (TrialState.PRUNED,)}
    for i, name in enumerate(names):
        axes = figure.add_subplot(rows, cols, i + 1)
        plotted = 0
        for label, states in kinds.items():
            trials = [t for t in study.get_trials(deepcopy=False, states=states)
                      if name in t.params and trial_value(t) is not None]
            xs, ticks = _as_position([t.params[name] for t in trials], space[name])
            plotted += len(xs)
            axes.scatter(xs, [trial_value(t) for t in trials], label=label,
                         marker="o" if label == "complete" else "x", alpha=0.8)
            if ticks is not None:
                axes.set_xticks(range(len(ticks)), [str(c) for c in ticks])
                axes.set_xlim(-0.5, len(ticks) - 0.5)
        if best is not None and name in best.params:
            xs, _ = _as_position([best.params[name]], space[name])
            axes.scatter(xs, [best.value], s=160, facecolors="none", edgecolors="red",
                         label="best")
        if space[name].get("log") and plotted:  # a log scale of no points is an error
            axes.set_xscale("log")
        axes.set_xlabel(name)
        axes.set_ylabel(metric)
        if i == 0:
            axes.legend(fontsize="small")
    figure.suptitle(f"{metric} per trial ({len(study.trials)} trials)")
    tmp = path.with_name(path.name + ".tmp.png")
    figure.savefig(tmp, dpi=90)
    tmp.replace(path)


def write_reports(study, out: Path, space: dict[str, dict], metric: str, direction: str,
                  command: str):
    """trials.csv, trials.png and (when a trial completed) best.yaml; returns the best trial."""
    out = Path(out)
    write_trials_csv(study, out / "trials.csv", list(space))
    write_trials_plot(study, out / "trials.png", space, metric)
    best = best_trial(study)
    if best is not None:
        write_best_preset(best, out, metric, direction, command)
    return best
