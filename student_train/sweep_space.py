"""The search space of `student-train sweep`: student-train config keys -> distributions.

space.yaml is a mapping of student-train config keys (student_train/config.py's FIELDS, the
keys of a preset's `train:` section) to one distribution each:

    lr:           {type: float, low: 1.0e-4, high: 1.0e-2, log: true}
    alpha:        {type: float, low: 0, high: 1}
    temperature:  {type: float, low: 1, high: 4, step: 0.5}
    batch_tokens: {type: int, low: 128, high: 512, step: 128}
    loss:         {type: categorical, choices: [kl, rkl]}

`float` suits float settings, `int` integer settings (`log: true` samples on a log scale;
`step` a grid), `categorical` any setting (each choice is checked as that setting's value).
`load_space(path)` reads and checks the file and raises ONE ConfigError listing every problem
(unknown key, a key the sweep sets itself, missing/wrong bounds, a distribution type that
does not fit the key, empty or invalid choices), before any trial runs.
`SearchSpace.suggest(trial)` draws one point from an Optuna trial: {key: value}.
No torch here.
"""

from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from logitstore.errors import ConfigError
from logitstore.toolkit.options import Field
from student_train.config import FIELDS

# Settings each trial gets from the sweep itself, never from the space.
SWEEP_CONTROLLED = {
    "out": "each trial's run directory is DIR/trials/NNN/run",
    "resume": "a trial always starts fresh (a killed trial is re-run)",
    "plan": "a trial trains; --plan only prints a memory plan",
}
_DIST_KEYS = {"float": {"type", "low", "high", "log", "step"},
              "int": {"type", "low", "high", "log", "step"},
              "categorical": {"type", "choices"}}
_NUMERIC_KINDS = {"float": ("float", "optional_float"), "int": ("int", "optional_int")}


@dataclass(frozen=True)
class Dimension:
    """One swept key: a float/int range or a list of choices."""

    name: str
    type: str  # float | int | categorical
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: tuple | None = None

    def suggest(self, trial) -> Any:
        if self.type == "float":
            return trial.suggest_float(self.name, self.low, self.high, log=self.log,
                                       step=self.step)
        if self.type == "int":
            return trial.suggest_int(self.name, self.low, self.high, log=self.log,
                                     step=self.step or 1)
        return trial.suggest_categorical(self.name, list(self.choices))


@dataclass(frozen=True)
class SearchSpace:
    """The checked space, in file order."""

    dimensions: tuple[Dimension, ...]

    @property
    def names(self) -> list[str]:
        return [d.name for d in self.dimensions]

    def suggest(self, trial) -> dict[str, Any]:
        """One point of the space, drawn by (and recorded in) the Optuna trial."""
        return {d.name: d.suggest(trial) for d in self.dimensions}

    def as_dict(self) -> dict[str, dict[str, Any]]:
        """JSON-able form (stored with the study, to refuse resuming with another space)."""
        return {d.name: {k: list(v) if isinstance(v, tuple) else v
                         for k, v in asdict(d).items() if k != "name" and v not in (None, False)}
                for d in self.dimensions}


def load_space(path: str | Path) -> SearchSpace:
    """Read and check space.yaml; ConfigError with every problem when anything is wrong."""
    space, problems = read_space(path)
    if problems:
        raise ConfigError(problems)
    return space


def read_space(path: str | Path) -> tuple[SearchSpace | None, list[str]]:
    """(the space, problems): every problem of the file, each one paragraph."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        return None, [f"space {path}: cannot be read ({exc.strerror or exc}); give the YAML "
                      f"file of the search space with --space"]
    except yaml.YAMLError as exc:
        return None, [f"space {path} is not valid YAML: {' '.join(str(exc).split())}"]
    if not isinstance(data, dict) or not data:
        return None, [f"space {path}: expected a mapping of student-train settings to "
                      f"distributions (e.g. `lr: {{type: float, low: 1e-4, high: 1e-2, log: "
                      f"true}}`), got {type(data).__name__ if data else 'nothing'}"]
    dimensions, problems = [], []
    for key, spec in data.items():
        dimension, found = _dimension(str(key), spec, f"space {path}: {key}")
        problems += found
        if dimension is not None:
            dimensions.append(dimension)
    return SearchSpace(tuple(dimensions)), problems


def _dimension(key: str, spec: Any, where: str) -> tuple[Dimension | None, list[str]]:
    field = FIELDS.get(key)
    if field is None:
        close = difflib.get_close_matches(key, FIELDS, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        return None, [f"{where}: not a student-train setting{hint}; the space's keys are the "
                      f"keys of a preset's `train:` section (student-train --help)"]
    if key in SWEEP_CONTROLLED:
        return None, [f"{where}: the sweep sets this itself ({SWEEP_CONTROLLED[key]}); "
                      f"remove it from the space"]
    if not isinstance(spec, dict) or spec.get("type") not in _DIST_KEYS:
        return None, [f"{where}: expected a distribution with `type: float`, `type: int` or "
                      f"`type: categorical`, got {spec!r}"]
    kind = spec["type"]
    unknown = sorted(set(spec) - _DIST_KEYS[kind])
    if unknown:
        takes = ", ".join(sorted(_DIST_KEYS[kind]))
        return None, [f"{where}: {_article(kind)} {kind} distribution takes {takes}; "
                      f"unknown: {', '.join(map(str, unknown))}"]
    if kind == "categorical":
        return _categorical(key, field, spec.get("choices"), where)
    return _numeric(key, field, kind, spec, where)


def _categorical(key: str, field: Field, choices: Any,
                 where: str) -> tuple[Dimension | None, list[str]]:
    if not isinstance(choices, list) or not choices:
        return None, [f"{where}: categorical needs a non-empty list `choices: [a, b]`, "
                      f"got {choices!r}"]
    problems = []
    for choice in choices:
        if choice is not None and not isinstance(choice, (bool, int, float, str)):
            problems.append(f"{where}: choice {choice!r} is not a single value (Optuna "
                            f"records numbers, strings, booleans or null; write a list "
                            f"setting as one string, e.g. 'a,b')")
            continue
        problem = _value_problem(field, choice)
        if problem:
            problems.append(f"{where}: choice {choice!r} {problem}")
    if len(set(map(repr, choices))) != len(choices):
        problems.append(f"{where}: choices {choices} list a value twice")
    return (None if problems else Dimension(key, "categorical", choices=tuple(choices))), problems


def _numeric(key: str, field: Field, kind: str, spec: dict,
             where: str) -> tuple[Dimension | None, list[str]]:
    if field.kind not in _NUMERIC_KINDS[kind]:
        fits = next((t for t, kinds in _NUMERIC_KINDS.items() if field.kind in kinds), None)
        advice = f"use `type: {fits}`" if fits else "use `type: categorical` with its values"
        return None, [f"{where}: {_article(kind)} {kind} range does not fit this {field.kind} "
                      f"setting; "
                      f"{advice}"]
    cast = float if kind == "float" else int
    number = "an integer" if kind == "int" else "a number"
    bounds, problems = {}, []
    for bound in ("low", "high"):
        value = spec.get(bound)
        if not _is_number(value, integer=kind == "int"):
            problems.append(f"{where}: {bound} must be {number}, got {value!r}")
            continue
        problem = _value_problem(field, cast(value))
        if problem:
            problems.append(f"{where}: {bound} {value!r} {problem}")
        else:
            bounds[bound] = cast(value)  # only valid bounds are compared below
    log, step = spec.get("log", False), spec.get("step")
    if not isinstance(log, bool):
        problems.append(f"{where}: log must be true or false, got {log!r}")
    if step is not None and not (_is_number(step, integer=kind == "int") and step > 0):
        problems.append(f"{where}: step must be {number} > 0, got {step!r}")
    problems += _range_problems(kind, bounds, log is True, step, where)
    if problems:
        return None, problems
    return Dimension(key, kind, bounds["low"], bounds["high"], log=log,
                     step=None if step is None else cast(step)), []


def _range_problems(kind: str, bounds: dict, log: bool, step: Any, where: str) -> list[str]:
    problems = []
    low, high = bounds.get("low"), bounds.get("high")
    if low is not None and high is not None and not low < high:
        problems.append(f"{where}: low must be below high, got low {low}, high {high} (a fixed "
                        f"value belongs in the base config, not the space)")
    if log and low is not None and low <= 0:
        problems.append(f"{where}: a log range needs low > 0, got {low}")
    if log and step is not None and (kind == "float" or step != 1):
        problems.append(f"{where}: log and step cannot be combined (Optuna samples a log range "
                        f"continuously); drop one of them")
    return problems


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _is_number(value: Any, *, integer: bool) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return not integer or float(value).is_integer()


def _value_problem(field: Field, value: Any) -> str | None:
    """Why `value` is not a valid value of the setting (coercion, choices, check), or None."""
    try:
        coerced = field.coerce(value)
    except ValueError as exc:
        return str(exc)
    return field.problem(coerced)
