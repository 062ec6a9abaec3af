"""student-export never loses a previous export: the new one is built in a staging directory
(inside an existing --out, which is never renamed, so a mount point works) and swapped in only
once complete (student_export/staging.py). A failed gate, an exception mid-way or an
interrupt with --overwrite leave the previous export byte-identical and no staging directory
behind; a refused run (no --overwrite) loads nothing; a successful --overwrite replaces the
export in the same OUT inode; a failed swap puts the previous export back, and when that
fails too the error names both copies and the staging directory is kept; a previous export
gone meanwhile, or files that appeared in an empty OUT, are refused, never deleted."""

from __future__ import annotations

import errno
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
    """What sits beside `out` in its parent, and the staging or set-aside directories left
    inside it (a swap leaves neither)."""
    return sorted([p.name for p in out.parent.iterdir() if p != out]
                  + [f"{out.name}/{p.name}" for p in out.iterdir()
                     if staging.is_leftover(p.name)])


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
    assert staged and staged[0].parent == previous  # staged inside the existing OUT
    assert staging.STAGING_MARK in staged[0].name and not staged[0].exists()
    assert snapshot(previous) == before
    assert siblings(previous) == []


def test_overwrite_replaces_the_previous_export_once_complete(tiny, previous, monkeypatch):
    # OUT as a mount point (a Docker volume): renaming it fails with EBUSY, so nothing may.
    previous.chmod(0o750)
    inode = previous.stat().st_ino
    monkeypatch.setattr(staging.os, "rename", rename_refusing(previous))
    result = run_cli(tiny, "--out", previous, "--format", "torch", "--overwrite", *CHECK)
    assert result.exit_code == 0, result.output
    assert previous.stat().st_ino == inode and previous.stat().st_mode & 0o777 == 0o750
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


def entries(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_an_empty_mount_point_out_gets_the_export_in_place(tiny, tmp_path, monkeypatch):
    out = tmp_path / "volume"
    out.mkdir()
    out.chmod(0o2770)  # a user-made OUT: its permissions must survive the export
    inode = out.stat().st_ino
    staged: list[Path] = []
    real_new_staging_dir = staging.new_staging_dir

    def record(target):
        staged.append(real_new_staging_dir(target))
        return staged[-1]

    monkeypatch.setattr(export, "new_staging_dir", record)
    monkeypatch.setattr(staging.os, "rename", rename_refusing(out))
    result = run_cli(tiny, "--out", out, "--format", "torch", *CHECK)
    assert result.exit_code == 0, result.output
    assert staged[0].parent == out and staged[0].name.startswith(staging.STAGING_MARK)
    assert out.stat().st_ino == inode and out.stat().st_mode & 0o7777 == 0o2770
    manifest = json.loads((out / "export.json").read_text())
    assert set(manifest["files"]) == set(snapshot(out)) - {"export.json"}
    assert siblings(out) == []


def rename_refusing(out: Path, fail_at: int | None = None, fails: list | None = None):
    """os.rename that raises EBUSY for `out` itself (a mount point), and a simulated
    failure on call number `fail_at` and on the calls numbered in `fails`."""
    real_rename = os.rename
    calls = [0]

    def rename(src, dst):
        calls[0] += 1
        if Path(src) == out or Path(dst) == out:
            raise OSError(errno.EBUSY, "Device or resource busy", str(src))
        if calls[0] == fail_at or calls[0] in (fails or []):
            raise OSError(f"simulated: rename {calls[0]} fails")
        real_rename(src, dst)

    return rename


def staged_export(out: Path) -> tuple[Path, dict[str, str]]:
    new = staging.new_staging_dir(out)
    (new / "export.json").write_text('{"new": true}')
    (new / "model.safetensors").write_bytes(os.urandom(1024))
    return new, snapshot(new)


def test_a_failed_swap_puts_the_previous_export_back(previous, monkeypatch):
    before = snapshot(previous)
    new, staged = staged_export(previous)
    # 3 old entries move aside (renames 1-3), then the 2 new ones up: the second of those fails.
    monkeypatch.setattr(staging.os, "rename", rename_refusing(previous, fail_at=5))
    with pytest.raises(OSError, match="simulated: rename 5"):
        staging.publish(new, previous, replace=True)
    assert snapshot(previous) == {**before, **{f"{new.name}/{k}": v for k, v in staged.items()}}
    assert entries(previous) == sorted([*before, new.name])  # no .old- directory left
    staging.discard(new)
    assert snapshot(previous) == before and siblings(previous) == []


def test_a_failed_restore_names_both_copies_and_keeps_them(previous, monkeypatch):
    before = snapshot(previous)
    new, staged = staged_export(previous)
    # The 5th rename (second new entry up) fails, and so does the first undo (the 6th).
    monkeypatch.setattr(staging.os, "rename", rename_refusing(previous, fails=[5, 6]))
    with pytest.raises(staging.SwapRestoreFailed) as caught:
        staging.publish(new, previous, replace=True)
    message = str(caught.value)
    old = next(p for p in previous.iterdir() if p.name.startswith(staging.OLD_MARK))
    assert "simulated: rename 5" in message and "simulated: rename 6" in message
    assert str(old) in message and str(new) in message
    # Nothing deleted: every file of both exports is still somewhere under OUT.
    found = {hashlib.sha256(p.read_bytes()).hexdigest()
             for p in previous.rglob("*") if p.is_file()}
    assert set(before.values()) | set(staged.values()) <= found


def test_run_export_keeps_the_staging_directory_when_the_restore_failed(tiny, previous,
                                                                       monkeypatch):
    def swap_and_restore_fail(new, out, *, replace):
        raise staging.SwapRestoreFailed(f"simulated: see {new}")

    monkeypatch.setattr(export, "publish", swap_and_restore_fail)
    result = run_cli(tiny, "--out", previous, "--format", "torch", "--overwrite", *CHECK)
    assert result.exit_code == 1 and "simulated: see" in result.output, result.output
    kept = [p for p in previous.iterdir() if staging.is_leftover(p.name)]
    assert len(kept) == 1 and (kept[0] / "model.safetensors").is_file()


def test_publish_refuses_when_the_previous_export_is_gone(previous):
    new, _ = staged_export(previous)
    (previous / "export.json").unlink()
    (previous / "notes.txt").write_text("mine")
    before = snapshot(previous)
    with pytest.raises(Exception, match="no longer holds the previous export"):
        staging.publish(new, previous, replace=True)
    assert snapshot(previous) == before and new.is_dir()


def test_a_run_into_an_empty_out_never_deletes_files_that_appeared(tiny, tmp_path,
                                                                   monkeypatch):
    out = tmp_path / "empty"
    out.mkdir()
    real_publish = staging.publish

    def someone_writes_first(new, target, *, replace):
        (target / "notes.txt").write_text("mine")
        real_publish(new, target, replace=replace)

    monkeypatch.setattr(export, "publish", someone_writes_first)
    result = run_cli(tiny, "--out", out, "--format", "torch", "--overwrite", *CHECK)
    assert result.exit_code == 1 and "no longer empty" in result.output, result.output
    assert entries(out) == ["notes.txt"]


def test_publish_without_replace_refuses_a_directory_filled_meanwhile(previous, tmp_path):
    new = staging.new_staging_dir(previous)
    before = snapshot(previous)
    with pytest.raises(Exception, match="no longer empty"):
        staging.publish(new, previous, replace=False)
    assert snapshot(previous) == before and new.is_dir()
    empty = tmp_path / "empty"
    empty.mkdir()
    fresh = staging.new_staging_dir(empty)
    assert fresh.parent == empty
    (fresh / "export.json").write_text("{}")
    staging.publish(fresh, empty, replace=False)
    assert snapshot(empty) == {"export.json": hashlib.sha256(b"{}").hexdigest()}
    assert entries(empty) == ["export.json"]


def test_a_missing_out_is_staged_beside_it_and_renamed(tmp_path):
    out = tmp_path / "new" / "student"
    fresh = staging.new_staging_dir(out)
    assert fresh.parent == out.parent and fresh.name.startswith("student" + staging.STAGING_MARK)
    (fresh / "export.json").write_text("{}")
    staging.publish(fresh, out, replace=False)
    assert entries(out) == ["export.json"] and siblings(out) == []
