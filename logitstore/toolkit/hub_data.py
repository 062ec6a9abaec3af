"""Can the hub datasets named by `--data` specs be read here? Checked before any tokenizer
or model is loaded (teacher-dump, student-train --data).

A hub dataset is read by `datasets.load_dataset`, which offline can only use its local
caches. `check_hub_data_readable` refuses data whose hub dataset is in neither cache while
the hub is offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE, or the endpoint does not answer):
at once, rather than after a model's weights have been loaded. Local specs that do not
exist fail here too (`resolve_sources`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from logitstore.toolkit.data_sources import DataSourceError, HFDatasetSpec, resolve_sources

PROBE_TIMEOUT_S = 3.0


def check_hub_data_readable(data: Sequence[str], *, described_as: str = "") -> None:
    """Raise DataSourceError when a hub dataset of `data` cannot be read: the hub is offline
    or unreachable and neither the hub cache nor the datasets cache holds it.
    `described_as`: what the data is to the command (e.g. ", the default data of the model
    alias 'med42'"), put after the dataset's name in the message."""
    hub = [src.hf for spec in data for src in resolve_sources(spec) if src.kind == "hub"]
    missing = [(spec, places) for spec in hub
               for places in [cache_places(spec)] if not any(p.exists() for p in places)]
    if not missing:
        return
    offline = _offline_reason()
    if offline is None:
        return  # online: datasets downloads it
    spec, places = missing[0]
    split = f" (split {spec.split})" if spec.split else ""
    raise DataSourceError(
        f"cannot read the Hugging Face dataset {spec.name!r}{split}{described_as}: the hub is "
        f"offline ({offline}) and no copy of it is in the local caches (looked in "
        f"{' and '.join(str(p) for p in places)}). To fix: pass local data with --data "
        "(a JSONL/JSON/Parquet file, a directory of them, or a save_to_disk folder), or on "
        f"a machine with internet run `hf download {spec.name} --repo-type dataset` and "
        "copy its Hugging Face cache (HF_HOME) here")


def cache_places(spec: HFDatasetSpec) -> list[Path]:
    """Where a copy of `spec` would be: the hub cache's repo folder and the datasets cache's
    prepared-dataset folder (`namespace___name`), as the running libraries name them."""
    import datasets
    from huggingface_hub import constants

    hub = Path(constants.HF_HUB_CACHE) / ("datasets--" + spec.name.replace("/", "--"))
    root = Path(datasets.config.HF_DATASETS_CACHE)
    prepared = root / spec.name.replace("/", "___")
    if root.is_dir():  # datasets may snake-case the name part: match loosely
        wanted = _loose(prepared.name)
        prepared = next((p for p in root.iterdir() if _loose(p.name) == wanted), prepared)
    return [hub, prepared]


def _loose(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def _offline_reason() -> str | None:
    """Why the hub cannot be used now (offline variables, or no answer), None when it can."""
    import datasets

    from logitstore.toolkit.hf import hub_offline
    from logitstore.toolkit.hub_probe import probe_hub

    if hub_offline() or datasets.config.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE or HF_DATASETS_OFFLINE is set"
    return probe_hub(PROBE_TIMEOUT_S)
