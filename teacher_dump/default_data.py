"""The data a teacher alias names, for `teacher-dump --model med42 --out store/` (no --data),
and the check, made before any tokenizer or model is loaded, that the hub datasets of a
dump can be read at all (logitstore.toolkit.hub_data, naming the alias when its default
data is the one missing).

An alias entry of the model aliases (logitstore/toolkit/models.yaml, or $LOGITSTORE_MODELS)
may carry `default_data`: one data spec or a list of them, in `--data`'s syntax (a hub
dataset `name[:config][@split]`, a file, a directory...). `resolve_config` uses it when
neither `--data` nor the preset's `dump.data` is given.
"""

from __future__ import annotations

from collections.abc import Sequence

from logitstore.errors import ConfigError
from logitstore.toolkit.hub_data import check_hub_data_readable

DEFAULT_DATA_KEY = "default_data"


def alias_default_data(model: str | None) -> list[str]:
    """The `default_data` specs of the alias `model` resolves to; [] when `model` is a
    directory, a hub id no alias names, an unknown name, or an alias without the key."""
    if not model:
        return []
    from logitstore.toolkit.hf import ModelLoadError, models_file, resolve_model

    try:
        spec = resolve_model(model)
    except ModelLoadError:
        return []  # the model load reports the unknown name, with the aliases it knows
    value = spec.defaults.get(DEFAULT_DATA_KEY)
    if value is None:
        return []
    specs = [value] if isinstance(value, str) else value
    if not isinstance(specs, list) or not specs or not all(
            isinstance(s, str) and s.strip() for s in specs):
        raise ConfigError([f"{models_file()}: {model}.{DEFAULT_DATA_KEY} must be a data spec "
                           f"(e.g. org/name@train) or a list of them, found {value!r}"])
    return list(specs)


def check_dump_data_readable(data: Sequence[str], model: str | None = None) -> None:
    """`check_hub_data_readable` for a dump: DataSourceError when a hub dataset of `data`
    cannot be read offline; the message names the alias `model` when `data` is its
    `default_data`."""
    default = (f", the default data of the model alias {model!r} (models.yaml `default_data`)"
               if model and list(data) == alias_default_data(model) else "")
    check_hub_data_readable(data, described_as=default)
