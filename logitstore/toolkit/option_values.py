"""Coercion of option values: a setting's value as YAML or a flag gives it -> its field's type.

`coerce(kind, value)` serves `options.Field.coerce` for every field kind but custom (see
logitstore/toolkit/options.py); each failure is a ValueError with a short reason that the
resolver reports with the setting's name and origin. No torch here.
"""

from __future__ import annotations

from typing import Any


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
