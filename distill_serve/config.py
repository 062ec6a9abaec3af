"""distill-serve configuration: one table (`FIELDS`) for the flags and a preset's `serve:` section.

    cfg = resolve_config(None, {"port": "9000", "max_batch": "16"}, model="demo_out/export")

Resolution order, later wins: the defaults, the preset's `serve:` section, the flags given
(logitstore.toolkit.options). Every problem, the model argument's included, is raised at once
as one `ConfigError`, before the server binds its port or loads anything.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from logitstore.errors import ConfigError
from logitstore.toolkit.options import (Field, at_least, between, config_class, make_config,
                                        resolve_fields)

SECTION = "serve"
# Test hooks, read by cli.py; not flags: production never wants them.
# Seconds the background load waits before it starts, so that a test sees `/ping` answer 503.
LOAD_DELAY_ENV = "LOGITSTORE_SERVE_LOAD_DELAY_S"
# Seconds added to every forward of the model (prefill and each decode step), so that a
# test's request is still generating when it sends SIGTERM, however fast the machine.
STEP_DELAY_ENV = "LOGITSTORE_SERVE_STEP_DELAY_S"

FIELDS: dict[str, Field] = {
    "host": Field("str", "127.0.0.1",
                  help="Address to listen on (0.0.0.0: every interface, as in a container)."),
    "port": Field("int", 8080, between(0, 65535), help="TCP port (0: any free port, logged)."),
    "max_batch": Field("int", 8, at_least(1),
                       help="Most requests generated together in one batch."),
    "batch_wait_ms": Field("float", 5.0, between(0.0, 10_000.0),
                           help="A batch closes once no request has arrived for this long "
                                "(ms), or at --max-batch, or 8x this after its first request."),
    "max_new_tokens": Field("int", 256, at_least(1),
                            help="Most new tokens one request may ask for; a request that "
                                 "does not say gets this many, or what fits the model."),
    "threads": Field("optional_int", None, at_least(1),
                     help="CPU threads of the model's runtime (default: the runtime's own)."),
}

ServeConfig = config_class(
    "ServeConfig", {"model": Field("str", ""), **FIELDS}, module=__name__,
    doc="A resolved distill-serve config: the model argument and one attribute per FIELDS "
        "entry.")


def model_problem(model: str) -> str | None:
    """Why `model` cannot name a model to serve, judged without loading anything (None: it
    may). A path-like value must be an existing directory; another value must resolve as an
    alias or a hub id (logitstore.toolkit.hf.resolve_model)."""
    if not model.strip():
        return "the model argument is empty: give a model directory, an export directory, " \
               "an alias or a hub id"
    path = Path(model).expanduser()
    # As student-export judges MODEL: ORG/NAME is a hub id unless such a directory exists.
    looks_like_path = path.exists() or path.is_absolute() or model.startswith((".", "~"))
    if looks_like_path and not path.is_dir():
        found = "a file" if path.exists() else "nothing"
        return (f"model {model!r}: expected a directory (a student-train run, its final/, or a "
                f"student-export output), found {found} there; check the path")
    if looks_like_path:
        return _directory_problem(model)
    from logitstore.toolkit.hf import ModelLoadError, resolve_model

    try:
        resolve_model(model)
    except ModelLoadError as exc:
        return str(exc)
    return None


def _directory_problem(model: str) -> str | None:
    """Why the directory `model` holds no model to load (None: it holds one)."""
    from logitstore.toolkit.inference import EXPORT_MANIFEST, model_directory

    directory = model_directory(model)
    if (directory / "config.json").is_file() or (directory / EXPORT_MANIFEST).is_file():
        return None
    return (f"model {model!r}: expected a model directory (config.json and weights), a "
            f"student-train run (final/config.json) or a student-export directory "
            f"({EXPORT_MANIFEST}), found none of those files in {directory}; check the path")


def resolve_config(preset: str | Path | None, overrides: dict[str, Any] | None, *,
                   model: str) -> ServeConfig:
    """defaults <- preset `serve:` section <- overrides (None = not given), plus the model
    argument; every problem raised at once as a ConfigError."""
    resolved, _, problems = resolve_fields(FIELDS, SECTION, preset, overrides)
    found = model_problem(model)
    if found:
        problems.insert(0, found)
    if problems:
        raise ConfigError(problems)
    return make_config(ServeConfig, {"model": model, **resolved})


def delays_from_test_hooks() -> tuple[float, float]:
    """(load delay, step delay) in seconds from the LOGITSTORE_SERVE_LOAD_DELAY_S and
    LOGITSTORE_SERVE_STEP_DELAY_S test hooks (0 when unset); ConfigError naming every one
    that is not a number >= 0."""
    delays, problems = [], []
    for name in (LOAD_DELAY_ENV, STEP_DELAY_ENV):
        raw = os.environ.get(name, "").strip()
        try:
            delay = float(raw) if raw else 0.0
        except ValueError:
            delay = -1.0
        if not 0 <= delay < float("inf"):
            problems.append(f"{name} must be a number of seconds >= 0, got {raw!r}; unset it "
                            "(it is a test hook)")
        delays.append(delay)
    if problems:
        raise ConfigError(problems)
    return delays[0], delays[1]
