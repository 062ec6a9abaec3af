"""The card's command as written: `teacher-dump --model med42 --out store/` (no --data) dumps
the dataset the alias names (`default_data` in models.yaml); offline and not cached, it fails
at once - before any tokenizer or model is loaded - naming the dataset, the caches and --data.
No test here touches the network: the hub is offline or points at a closed local port."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from logitstore.toolkit.data_sources import DataSourceError, resolve_sources
from logitstore.errors import ConfigError
from teacher_dump.config import resolve_config
from logitstore.toolkit.hub_data import cache_places, check_hub_data_readable
from teacher_dump.default_data import alias_default_data

REPO = Path(__file__).resolve().parents[1]
MEADOW = "medalpaca/medical_meadow_medical_flashcards@train"


def _offline_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("HF_", "HUGGINGFACE_", "LOGITSTORE_"))}
    home = tmp_path / "hf_home"
    home.mkdir(exist_ok=True)
    env.update(HF_HOME=str(home), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", **extra)
    return env


def test_medical_aliases_name_a_public_instruction_dataset():
    for alias in ("med42", "medgemma-4b"):
        assert alias_default_data(alias) == [MEADOW]
    assert alias_default_data("m42-health/Llama3-Med42-8B") == [MEADOW]  # its hub id too
    assert alias_default_data("qwen2-0.5b") == []  # a student: no default
    assert alias_default_data("no/such-model") == []
    [source] = resolve_sources(MEADOW)
    assert source.kind == "hub" and source.hf.split == "train"
    cfg = resolve_config(None, {"model": "med42", "out": "store/"})
    assert cfg.data == (MEADOW,)
    given = resolve_config(None, {"model": "med42", "data": ["x.jsonl"], "out": "store/"})
    assert given.data == ("x.jsonl",)  # --data wins over the alias's default


def test_a_bad_default_data_entry_is_a_config_error(tmp_path, monkeypatch):
    aliases = tmp_path / "models.yaml"
    aliases.write_text("m:\n  hub_id: org/m\n  default_data: [1, 2]\n")
    monkeypatch.setenv("LOGITSTORE_MODELS", str(aliases))
    with pytest.raises(ConfigError, match="m.default_data must be a data spec"):
        resolve_config(None, {"model": "m", "out": "s"})
    aliases.write_text("m:\n  hub_id: org/m\n")
    with pytest.raises(ConfigError, match="data is required"):
        resolve_config(None, {"model": "m", "out": "s"})


def test_the_cards_command_fails_at_once_offline(tmp_path):
    # A subprocess: the hub libraries read HF_HOME and the offline variables at import.
    env = _offline_env(tmp_path)
    result = subprocess.run([sys.executable, "-m", "teacher_dump", "--model", "med42",
                             "--out", str(tmp_path / "store")], env=env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr
    err = result.stderr
    message = err[err.index("teacher-dump: error:"):]
    assert "Traceback" not in err and len(message.strip().splitlines()) == 1  # one paragraph
    for needle in ("medalpaca/medical_meadow_medical_flashcards", "(split train)",
                   "default data of the model alias 'med42'", "hub is offline",
                   str(tmp_path / "hf_home" / "hub"), str(tmp_path / "hf_home" / "datasets"),
                   "--data"):
        assert needle in message, needle
    # Nothing was loaded or written: the tokenizer of med42 (not cached) was never asked for.
    assert "Llama3-Med42" not in message and not (tmp_path / "store").exists()


def test_an_unreachable_hub_counts_as_offline(tmp_path):
    env = _offline_env(tmp_path, HF_ENDPOINT="http://127.0.0.1:9")  # a closed local port
    del env["HF_HUB_OFFLINE"], env["HF_DATASETS_OFFLINE"]
    code = ("from logitstore.toolkit.hub_data import check_hub_data_readable as c\n"
            f"c([{MEADOW!r}])")
    result = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "DataSourceError" in result.stderr and "http://127.0.0.1:9 unreachable" in result.stderr


def test_a_cached_dataset_passes_the_check(tmp_path, monkeypatch):
    import datasets
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataSourceError, match="no copy of it is in the local caches"):
        check_hub_data_readable([MEADOW])
    hub_copy, prepared = cache_places(resolve_sources(MEADOW)[0].hf)
    assert hub_copy == tmp_path / "hub" / "datasets--medalpaca--medical_meadow_medical_flashcards"
    prepared.mkdir(parents=True)  # a dataset prepared by `datasets` before
    check_hub_data_readable([MEADOW])
    prepared.rmdir()
    hub_copy.mkdir(parents=True)  # files downloaded with `hf download`
    check_hub_data_readable([MEADOW])
    local = REPO / "logitstore" / "toolkit" / "tasks" / "medmcq_mini.jsonl"
    check_hub_data_readable([str(local)])  # a local file: nothing to check
    with pytest.raises(DataSourceError, match="does not exist"):
        check_hub_data_readable(["./missing.jsonl"])


def test_an_alias_default_dataset_is_dumped_without_data(tmp_path, monkeypatch):
    pytest.importorskip("torch")
    from teacher_dump.cli import teacher_dump
    from tiny_hf import corpus, make_tiny_llama, make_tokenizer

    model = make_tiny_llama(tmp_path / "llama", make_tokenizer(tmp_path / "tok"))
    data = tmp_path / "meadow.jsonl"
    data.write_text("".join(json.dumps({"instruction": "Answer truthfully.", "input": s,
                                        "output": s[:20]}) + "\n" for s in corpus()[:4]))
    aliases = tmp_path / "models.yaml"
    aliases.write_text(f"tiny:\n  hub_id: {model}\n  default_data: {data}\n")
    monkeypatch.setenv("LOGITSTORE_MODELS", str(aliases))
    result = CliRunner().invoke(teacher_dump, ["--model", "tiny", "--out", str(tmp_path / "s"),
                                               "--device", "cpu", "--top-k", "4",
                                               "--capture-kernel", "eager", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "4 records -> 4 samples" in result.output
