"""student-export never loses a previous export: the new one is built beside --out and
swapped in only once complete (student_export/staging.py). A failed gate, an exception
mid-way or an interrupt with --overwrite leave the previous export byte-identical and no
staging directory behind; a refused run (no --overwrite) loads nothing; a successful
--overwrite replaces the export; a failed swap renames the previous export back."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from student_export import export, staging
from student_export.cli import student_export
from tiny_hf import make_tiny_llama, make_tokenizer

CHECK = ["--check-limit", "4"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny")
    return make_tiny_llama(root / "model", make_tokenizer(root / "tok"))


@pytest.fixture
def previous(tmp_path) -> Path:
    """A previous export as --overwrite recognises one: export.json and flat files."""
    out = tmp_path / "exports" / "student"
    out.mkdir(parents=True)
    (out / "export.json").write_text(json.dumps({"status": "complete", "created": "then"}))
    (out / "model.safetensors").write_bytes(os.urandom(4096))
    (out / "tokenizer.json").write_text('{"old": true}')
    return out


def snapshot(directory: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under `directory`."""
    return {p.relative_to(directory).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def siblings(out: Path) -> list[str]:
    """What sits beside `out` in its parent (staging or set-aside directories would)."""
    return sorted(p.name for p in out.parent.iterdir() if p != out)


def run_cli(*args) -> object:
    return CliRunner().invoke(student_export, [str(a) for a in args])


def corrupt_the_weights(monkeypatch) -> None:
    """Make the export's lm_head noise, so the quality gate fails."""
    import torch
    from safetensors.torch import load_file, save_file

    original = export._write_model

    def write_then_corrupt(cfg, source, out, tokenizer, max_length):
        section = original(cfg, source, out, tokenizer, max_length)
        weights = load_file(out / "model.safetensors")
        head = weights["lm_head.weight"]
        noise = torch.randn(head.shape, generator=torch.Generator().manual_seed(0))
        weights["lm_head.weight"] = head + noise
        save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
        return section

    monkeypatch.setattr(export, "_write_model", write_then_corrupt)


def test_a_failed_gate_with_overwrite_keeps_the_previous_export(tiny, previous, monkeypatch):
    before = snapshot(previous)
    corrupt_the_weights(monkeypatch)
    result = run_cli(tiny, "--out", previous, "--format", "torch", "--overwrite", *CHECK)
    assert result.exit_code == 1, result.output
    message = result.output.strip().splitlines()[-1]
    assert message.startswith("student-export: error: quality gate failed")
    assert f"previous export in {previous} is left as it was" in message
    assert snapshot(previous) == before
    assert siblings(previous) == []


@pytest.mark.parametrize("failure,code", [(RuntimeError("disk on fire"), 1),
                                          (KeyboardInterrupt(), 130)])
def test_a_failure_mid_way_with_overwrite_keeps_the_previous_export(tiny, previous,
                                                                    monkeypatch, failure, code):
    # The gate runs after the weights are written: the staging directory is full by then.
    staged: list[Path] = []

    def fail(source, out, *args, **kwargs):
        staged.append(out)
        assert (out / "model.safetensors").is_file()
        raise failure

    monkeypatch.setattr(export, "run_gate", fail)
    before = snapshot(previous)
    result = run_cli(tiny, "--out", previous, "--format", "torch", "--overwrite", *CHECK)
    assert result.exit_code == code, result.output
    assert staged and staged[0].parent == previous.parent
    assert staging.STAGING_MARK in staged[0].name and not staged[0].exists()
    assert snapshot(previous) == before
    assert siblings(previous) == []


def test_overwrite_replaces_the_previous_export_once_complete(tiny, previous):
    result = run_cli(tiny, "--out", previous, "--format", "torch", "--overwrite", *CHECK)
    assert result.exit_code == 0, result.output
    manifest = json.loads((previous / "export.json").read_text())
    assert manifest["status"] == "complete" and manifest["quality"]["passed"] is True
    assert json.loads((previous / "tokenizer.json").read_text()) != {"old": True}
    assert set(manifest["files"]) == set(snapshot(previous)) - {"export.json"}
    assert siblings(previous) == []


def test_without_overwrite_an_existing_export_is_refused_before_loading(tiny, previous,
                                                                       monkeypatch):
    def must_not_load(*args, **kwargs):
        raise AssertionError("loaded the model although the output is refused")

    monkeypatch.setattr(export, "resolve_source", must_not_load)
    monkeypatch.setattr("logitstore.toolkit.hf.load_tokenizer", must_not_load)
    before = snapshot(previous)
    result = run_cli(tiny, "--out", previous, "--format", "torch", *CHECK)
    assert result.exit_code == 1 and "pass --overwrite" in result.output, result.output
    assert snapshot(previous) == before and siblings(previous) == []


def test_a_failed_swap_renames_the_previous_export_back(previous, monkeypatch):
    before = snapshot(previous)
    new = staging.new_staging_dir(previous)
    (new / "export.json").write_text("{}")
    renames: list[tuple[str, str]] = []
    real_rename = os.rename

    def rename_fails_second_time(src, dst):
        renames.append((Path(src).name, Path(dst).name))
        if len(renames) == 2:
            raise OSError("simulated: cannot rename the new export into place")
        real_rename(src, dst)

    monkeypatch.setattr(staging.os, "rename", rename_fails_second_time)
    with pytest.raises(OSError, match="simulated"):
        staging.publish(new, previous, replace=True)
    aside = renames[0][1]  # student -> student.old-XXXXXXXX, then the new one in, then back
    assert staging.OLD_MARK in aside and renames[1] == (new.name, "student")
    assert renames[2] == (aside, "student")
    assert snapshot(previous) == before
    staging.discard(new)
    assert siblings(previous) == []


def test_publish_without_replace_refuses_a_directory_filled_meanwhile(previous, tmp_path):
    new = staging.new_staging_dir(previous)
    before = snapshot(previous)
    with pytest.raises(Exception, match="no longer empty"):
        staging.publish(new, previous, replace=False)
    assert snapshot(previous) == before and new.is_dir()
    empty = tmp_path / "empty"
    empty.mkdir()
    fresh = staging.new_staging_dir(empty)
    (fresh / "export.json").write_text("{}")
    staging.publish(fresh, empty, replace=False)
    assert snapshot(empty) == {"export.json": hashlib.sha256(b"{}").hexdigest()}
    assert not fresh.exists()
