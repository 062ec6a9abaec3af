"""The one config mechanism of the tools: YAML preset section <- command-line flags.

Each tool declares its settings as a table of `Field`s; `resolve_fields` layers the defaults,
the preset's section (`dump:`, `train:`, ...) and the flags, coerces every value, runs every
field's check and returns ALL problems at once, so a user fixes a config in one go.
No torch here.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable


@dataclass(frozen=True)
class Field:
    kind: str  # str | int | float | bool | list_str | list_int | weights | optional_<scalar>
    default: Any
    check: Callable[[Any], str | None] | None = None  # -> problem text, or None when fine
    help: str = ""
    flag: bool = True  # exposed as a command-line flag (else YAML only)
    resumable: bool = False  # may differ between a run and its resume (no effect on results)


# -- checks (each returns a problem text or None; None values are "not set")


def at_least(low):
    return lambda v: None if v is None or v >= low else f"must be >= {low}, got {v}"


def between(low, high, *, high_open=False):
    def check(v):
        if v is None:
            return None
        ok = low <= v < high if high_open else low <= v <= high
        return None if ok else f"must be in [{low}, {high}{')' if high_open else ']'}, got {v}"
    return check


def one_of(choices):
    return lambda v: None if v is None or v in choices else \
        f"must be one of {', '.join(choices)}, got {v!r}"


def positive(v):
    return None if v is None or v > 0 else f"must be > 0, got {v}"


# -- coercion


def split_list(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


def _number(value: Any, cast, what: str):
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"must be {what}, got {value!r}")
    try:
        return cast(value)
    except ValueError:
        raise ValueError(f"must be {what}, got {value!r}") from None


def _weights(value: Any) -> dict[str, float]:
    """{"a": 0.6} or "a:0.6,b:0.4" or ["a", "b"] (weight 1) -> {name: weight >= 0}."""
    if isinstance(value, str):
        value = split_list(value)
    if isinstance(value, (list, tuple)):
        out: dict[str, Any] = {}
        for item in value:
            name, _, weight = str(item).partition(":")
            if not name.strip():
                raise ValueError(f"entries must look like name or name:weight, got {item!r}")
            out[name.strip()] = weight.strip() or 1.0
        value = out
    if not isinstance(value, dict):
        raise ValueError(f"must be a mapping name: weight, got {value!r}")
    parsed = {}
    for name, weight in value.items():
        w = _number(weight, float, "a number")
        if w < 0:
            raise ValueError(f"weight of {name!r} must be >= 0, got {w}")
        parsed[str(name)] = w
    return parsed


def _int_list(value: Any) -> list[int]:
    if value is None:
        return []
    items = split_list(value) if isinstance(value, str) else value
    items = items if isinstance(items, (list, tuple)) else [items]
    out = []
    for item in items:
        if isinstance(item, bool):
            raise ValueError(f"must be integers, got {item!r}")
        try:
            out.append(int(item))
        except (TypeError, ValueError):
            raise ValueError(f"must be integers like -1,-4, got {item!r}") from None
    if len(set(out)) != len(out):
        raise ValueError(f"lists a layer twice: {out}")
    return out


def coerce(kind: str, value: Any) -> Any:
    """value (from YAML or a flag) -> the field's type; ValueError with a short reason."""
    if kind.startswith("optional_"):
        if value is None or (isinstance(value, str) and value.lower() in ("", "none", "null")):
            return None
        kind = kind.removeprefix("optional_")
    if kind == "str":
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ValueError(f"must be a string, got {type(value).__name__}")
        return str(value)
    if kind == "int":
        return _number(value, int, "an integer")
    if kind == "float":
        return _number(value, float, "a number")
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "false", "no", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ValueError(f"must be true or false, got {value!r}")
    if kind == "list_str":
        items = value if isinstance(value, (list, tuple)) else [value]
        out = []
        for item in items:
            if not isinstance(item, str):
                raise ValueError(f"must be strings, got {item!r}")
            out += split_list(item)  # "a,b" and repeated flags both work
        return out
    if kind == "list_int":
        return _int_list(value)
    if kind == "weights":
        return _weights(value)
    raise AssertionError(f"unknown field kind {kind}")


# -- presets and resolution


def load_section(path: str | Path, section: str,
                 fields: dict[str, Field]) -> tuple[dict[str, Any], list[str]]:
    """(the `section:` mapping of a YAML preset, problems); a missing section is a problem."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        return {}, [f"cannot read config file {path}: {exc.strerror or exc}"]
    except yaml.YAMLError as exc:
        return {}, [f"{path} is not valid YAML: {' '.join(str(exc).split())}"]
    data = {} if data is None else data
    if not isinstance(data, dict):
        return {}, [f"{path}: expected a mapping with a '{section}:' section, "
                    f"got {type(data).__name__}"]
    found = data.get(section)
    if found is None:
        misplaced = sorted(set(data) & set(fields))
        hint = f" (keys {misplaced} belong under '{section}:')" if misplaced else ""
        return {}, [f"{path} has no '{section}:' section{hint}"]
    if not isinstance(found, dict):
        return {}, [f"{path}: '{section}:' must be a mapping of settings"]
    return found, []


def resolve_fields(fields: dict[str, Field], section: str, preset: str | Path | None,
                   overrides: dict[str, Any] | None
                   ) -> tuple[dict[str, Any], dict[str, str], list[str]]:
    """defaults <- preset section <- overrides (None / empty = not given).

    Returns (every field's value, where each given value came from, problems).
    """
    problems: list[str] = []
    layers: list[tuple[str, dict[str, Any]]] = []
    if preset is not None:
        found, preset_problems = load_section(preset, section, fields)
        problems += preset_problems
        layers.append((str(preset), found))
    layers.append(("command line", {k: v for k, v in (overrides or {}).items()
                                    if v is not None and v != () and v != []}))
    values: dict[str, Any] = {}
    origin: dict[str, str] = {}
    for where, layer in layers:
        for key, raw in layer.items():
            norm = str(key).replace("-", "_")
            field = fields.get(norm)
            if field is None:
                close = difflib.get_close_matches(norm, fields, n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                problems.append(f"{where}: unknown setting '{key}'{hint}")
                continue
            try:
                values[norm] = coerce(field.kind, raw)
                origin[norm] = where
            except ValueError as exc:
                problems.append(f"{norm} ({where}): {exc}")
    resolved = {key: values.get(key, field.default) for key, field in fields.items()}
    for key, field in fields.items():
        if key in values and field.check is not None:
            problem = field.check(resolved[key])
            if problem:
                problems.append(f"{key} ({origin[key]}): {problem}")
    return resolved, origin, problems

