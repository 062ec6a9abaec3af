"""Option tables: each tool declares each of its settings once, as a `Field` in a table.

A tool (teacher_dump/config.py, student_train/config.py, eval/config.py) holds one table
`{name: Field}`; everything else is generated from it here:

- `click_options(fields)`: the command's flags, `--name-with-dashes` per field (a field
  with a `yaml_only` reason has none: `yaml_only_note` lists it in the `--config` help);
  flag values are read as text and checked below, with the preset's, so that one run
  reports every problem of a command line and its preset together;
- `config_class(name, fields)`: the config object, a frozen dataclass with one attribute
  per field (lists as tuples) and `as_dict()`;
- `resolve_fields(fields, section, preset, overrides)`: defaults <- the preset's section
  (`dump:`, `train:`, `eval:`) <- the flags; coerces every value (option_values.py), runs
  every check and returns ALL problems; `preset` is a path or the name of a bundled
  preset (`find_preset`);
- `config_differences(saved, new, fields)`: the settings that differ between two resolved
  configs (a saved run and its resume), `resumable` fields excepted; a key the saved config
  lacks holds its field's `absent` value (the setting's behaviour before it existed);
- `saved_value(saved, key, field)`: what a saved config did for one setting (its value, else
  `absent`, else the default);
- `verbose_option()`: the one flag that is not a field (`-v`: logging of this invocation);
- `other_task_problems(task, origin, fields, task_fields, tasks)`: the settings given that a
  tool's `--task` does not read (a tool with two tasks, each refusing the other's settings).

No torch here.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from logitstore.toolkit.option_values import coerce

# Bundled presets: the checkout's configs/, installed as this package (pyproject.toml).
PRESETS_PACKAGE = "logitstore.presets"
_CHECKOUT_PRESETS = Path(__file__).resolve().parents[2] / "configs"

_TYPES = {"str": str, "int": int, "float": float, "bool": bool, "list_str": tuple[str, ...],
          "list_int": tuple[int, ...], "weights": dict[str, float], "custom": Any}
_METAVARS = {"int": "N", "float": "X", "list_int": "I,J", "weights": "NAME:W,...", "str": "TEXT"}


class _Unset:
    def __repr__(self) -> str:
        return "UNSET"


UNSET = _Unset()  # Field.absent not declared


@dataclass(frozen=True)
class Field:
    """One setting: its type, default, check and help; the flag and YAML key share its name."""

    kind: str  # str | int | float | bool | list_str | list_int | weights | optional_<scalar>
    #            | custom (coerced by `parse`)
    default: Any
    check: Callable[[Any], str | None] | None = None  # -> problem text, or None when fine
    help: str = ""
    choices: tuple | None = None  # allowed values: checked, and shown as the flag's metavar
    metavar: str | None = None  # the flag's metavar when choices/kind do not say it well
    flag_names: str | None = None  # e.g. "--split-long/--truncate-long" (default from the name)
    bare_value: Any = None  # value of the flag given alone (`--resume` = "latest"); None: none
    yaml_only: str = ""  # why this setting has no flag (shown in --config's help); "" = it has
    resumable: bool = False  # may differ between a run and its resume (no effect on results)
    parse: Callable[[Any], Any] | None = None  # kind custom: value -> its form (ValueError)
    # What a config saved before this setting existed did (config_differences compares it);
    # UNSET: the same as its default, so a saved config's lacking it is no difference.
    absent: Any = UNSET

    @property
    def flag(self) -> bool:
        return not self.yaml_only

    def coerce(self, value: Any) -> Any:
        """value (from YAML or a flag) -> this setting's type; ValueError with a short reason."""
        return self.parse(value) if self.kind == "custom" else coerce(self.kind, value)

    def problem(self, value: Any) -> str | None:
        """What is wrong with a coerced value (choices, then the check), or None."""
        if self.choices is not None:
            found = one_of(self.choices)(value)
            if found:
                return found
        return self.check(value) if self.check is not None else None


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
        f"must be one of {', '.join(map(str, choices))}, got {v!r}"


def positive(v):
    return None if v is None or v > 0 else f"must be > 0, got {v}"


# -- the command line


def tool_command(prog: str, fields: dict[str, Field], section: str, *,
                 preset_example: str = "tiny-cpu", interrupted_hint: str = ""):
    """Decorator: the click command of a tool, with the exit status of
    logitstore/exit_codes.py, `--config PATH|NAME` (a preset whose `section:` sets the
    defaults) and one flag per field. The function gets `config_path` and the flags
    (text, None = not given); options declared below the decorator come last in --help."""
    import click

    from logitstore import exit_codes

    def decorate(function):
        function = click_options(fields)(function)
        function = click.option(
            "--config", "config_path", metavar="PATH|NAME",
            help=f"YAML preset (a path, or the name of a bundled preset such as "
                 f"{preset_example}); its `{section}:` section sets defaults for every flag "
                 f"below, flags override it." + yaml_only_note(fields, section))(function)
        return click.command(name=prog, cls=exit_codes.Command,
                             interrupted_hint=interrupted_hint,
                             context_settings={"help_option_names": ["-h", "--help"],
                                               "max_content_width": 100})(function)
    return decorate


def verbose_option(what: str = ""):
    """Decorator: the `-v/--verbose` flag. Not a field of the table: it sets how much this
    invocation logs, never what the command computes or writes, so it has no YAML key."""
    import click

    return click.option("-v", "--verbose", is_flag=True,
                        help=f"Log at DEBUG level{what}. Command line only, no preset key: it "
                             "sets how much this invocation logs, not a setting saved with "
                             "the output.")


def click_options(fields: dict[str, Field]):
    """Decorator: one click option per field with a flag, in table order.

    Every value stays text (None = not given) for `resolve_fields` to coerce and check;
    a bool is a `--name/--no-name` pair, a list_str repeats or comma-separates.
    """
    def decorate(command):
        for name, field in reversed(list(fields.items())):
            if field.flag:
                command = _click_option(name, field)(command)
        return command
    return decorate


def _click_option(name: str, field: Field):
    import click

    dashed = "--" + name.replace("_", "-")
    help_text = field.help
    if field.kind == "bool":
        return click.option(field.flag_names or f"{dashed}/--no-{dashed[2:]}", name,
                            default=None, help=f"{help_text} [default: "
                                               f"{flag_setting(name, field, field.default)}]")
    if field.default not in (None, [], {}):
        shown = ",".join(map(str, field.default)) if isinstance(field.default, list) \
            else field.default
        help_text += f" [default: {shown}]"
    names = (field.flag_names or dashed,)
    if field.kind == "list_str":
        return click.option(*names, name, multiple=True, default=None, metavar="TEXT",
                            help=f"{help_text} Repeat the flag or comma-separate.".strip())
    kind = field.kind.removeprefix("optional_")
    metavar = field.metavar or (f"[{'|'.join(map(str, field.choices))}]" if field.choices
                                else _METAVARS.get(kind, "TEXT"))
    optional_value = {} if field.bare_value is None else \
        {"is_flag": False, "flag_value": field.bare_value}
    return click.option(*names, name, type=str, default=None, metavar=metavar,
                        help=help_text.strip(), **optional_value)


def flag_setting(name: str, field: Field, value: Any) -> str:
    """What sets `name` to `value`: `--x`/`--no-x` (bool), `--x VALUE`, or the YAML key."""
    dashed = "--" + name.replace("_", "-")
    if not field.flag:
        return f"`{name}: {_plain(value)!r}` in the config"
    if field.kind == "bool":
        return (field.flag_names or f"{dashed}/--no-{dashed[2:]}").split("/")[not value].strip()
    shown = ",".join(map(str, value)) if isinstance(value, (list, tuple)) else value
    return f"{(field.flag_names or dashed)} {shown if shown != '' else repr('')}"


def yaml_only_note(fields: dict[str, Field], section: str) -> str:
    """The settings without a flag and why, for the help of --config ("" when none)."""
    notes = [f"{name} ({field.yaml_only})" for name, field in fields.items()
             if field.yaml_only]
    return f" Only in its `{section}:` section: {'; '.join(notes)}." if notes else ""


# -- the config object


def config_class(name: str, fields: dict[str, Field], *, module: str, doc: str,
                 methods: dict[str, Any] | None = None) -> type:
    """A frozen dataclass with one attribute per field, `as_dict()` and `methods`."""
    def kind_type(kind: str):
        base = _TYPES[kind.removeprefix("optional_")]
        return base | None if kind.startswith("optional_") else base

    cls = dataclasses.make_dataclass(
        name, [(key, kind_type(field.kind)) for key, field in fields.items()],
        namespace={"as_dict": _as_dict, **(methods or {})}, frozen=True)
    cls.__module__, cls.__doc__ = module, doc
    return cls


def _as_dict(self) -> dict[str, Any]:
    """JSON/YAML-able form (tuples as lists), as echoed and saved."""
    return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def make_config(cls: type, resolved: dict[str, Any]):
    """`cls` (from `config_class`) of resolved values; lists become tuples (frozen)."""
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in resolved.items()})


def saved_value(saved: dict[str, Any], key: str, field: Field) -> Any:
    """What a saved config did for `key`: its value, else (saved before the setting existed)
    the field's `absent` value, else its default."""
    if key in saved:
        return saved[key]
    return field.default if field.absent is UNSET else field.absent


def config_differences(saved: dict[str, Any], new: Any, fields: dict[str, Field], *,
                       saved_as: str = "saved") -> list[str]:
    """`key: <saved_as> has X, now Y` for each non-resumable key that differs.

    `new` is a config object or its `as_dict()`. A key missing from `saved` (a setting added
    since it was written) holds its field's `absent` value, reported with the flag that
    continues as saved; without one it is no difference. A list equals the tuple of the same
    items, and None equals the empty list.
    """
    now = new if isinstance(new, dict) else new.as_dict()
    out = []
    for key, field in fields.items():
        lacks = key not in saved
        if field.resumable or (lacks and field.absent is UNSET):
            continue
        before, after = saved_value(saved, key, field), _plain(now[key])
        if isinstance(before, (list, tuple)) or isinstance(after, list):
            before, after = list(before or []), list(after or [])
        if before != after:
            out.append(f"{key}: {saved_as} has {before!r}, now {after!r}" + (
                f" ({saved_as} saved before the setting existed; "
                f"{flag_setting(key, field, before)} continues as saved)" if lacks else ""))
    return out


# -- presets and resolution


def bundled_presets() -> dict[str, Any]:
    """{name: file} of the presets shipped as `logitstore.presets` (else the checkout's)."""
    from importlib import resources

    try:
        folder = resources.files(PRESETS_PACKAGE)
    except ModuleNotFoundError:  # not installed as a package (yet): the checkout's configs/
        folder = _CHECKOUT_PRESETS
    if not folder.is_dir():
        return {}
    return {entry.name.removesuffix(".yaml"): entry for entry in folder.iterdir()
            if entry.name.endswith(".yaml")}


def find_preset(preset: str | Path) -> tuple[Any, list[str]]:
    """(the file `--config` means, problems): an existing path, a path-like value as given
    (the read reports it missing), or the name of a bundled preset."""
    text = str(preset)
    path = Path(text).expanduser()
    if path.exists() or "/" in text or "\\" in text or path.suffix in (".yaml", ".yml"):
        return path, []
    found = bundled_presets()
    if text in found:
        return found[text], []
    names = ", ".join(sorted(found)) or "none"
    return None, [f"config {text!r}: no such file, and no bundled preset of that name "
                  f"(bundled: {names}); give a path to a YAML file or one of those names"]


def load_section(path: str | Path, section: str,
                 fields: dict[str, Field]) -> tuple[dict[str, Any], list[str]]:
    """(the `section:` mapping of a YAML preset, problems); a missing section is a problem.

    `path` is a path or a bundled preset's name (see `find_preset`).
    """
    import yaml

    path, problems = find_preset(path)
    if problems:
        return {}, problems
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
                values[norm] = field.coerce(raw)
                origin[norm] = where
            except ValueError as exc:
                problems.append(f"{norm} ({where}): {exc}")
    # A copy of each default: a tool may change its resolved lists and mappings in place.
    resolved = {key: values.get(key, copy.deepcopy(field.default))
                for key, field in fields.items()}
    for key, field in fields.items():
        if key in values:
            problem = field.problem(resolved[key])
            if problem:
                problems.append(f"{key} ({origin[key]}): {problem}")
    return resolved, origin, problems


def other_task_problems(task: str, origin: dict[str, str], fields: dict[str, Field],
                        task_fields: Callable[[str], tuple[str, ...]],
                        tasks: tuple[str, ...]) -> list[str]:
    """Settings given (`origin`: preset or command line) that `task` does not read
    (`task_fields(task)`), each named as a setting of the other of the two `tasks`."""
    used = set(task_fields(task))
    other = next(t for t in tasks if t != task)
    return [f"{key} ({origin[key]}): a setting of --task {other} only, which --task {task} "
            f"does not read; remove it (or run with --task {other})"
            for key in fields if key in origin and key not in used]
