"""Build an export beside its target, then swap it into place: a failed or interrupted
export never loses the previous one.

    staging = new_staging_dir(out)           # OUT.tmp-XXXXXXXX, a sibling of OUT
    try:
        ...write and check the export in staging...
        publish(staging, out, replace=True)  # only once it is complete
    except BaseException:
        discard(staging)
        raise

`publish` renames a previous OUT aside (OUT.old-XXXXXXXX), renames the staging directory to
OUT, then deletes the old one; if the second rename fails, the old one is renamed back. The
siblings share OUT's parent, so every rename stays on one file system (atomic, no copy).
Only a process killed outright (SIGKILL, power loss) can leave a sibling behind, and never
instead of OUT: until the swap, OUT is as it was.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
from pathlib import Path

from logitstore.errors import LogitStoreError

log = logging.getLogger(__name__)

STAGING_MARK = ".tmp-"
OLD_MARK = ".old-"


def swap_target(out: Path) -> Path:
    """The directory the swap renames: `out` itself; what it links to when it is a
    symbolic link (so the link keeps pointing at the export); the absolute path when it
    has no name of its own ("." or ending in "..") to put beside it."""
    return out.resolve() if out.is_symlink() or out.name in ("", "..") else out


def new_staging_dir(out: Path) -> Path:
    """An empty new directory OUT.tmp-XXXXXXXX beside `out` (its parent created)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    while True:
        staging = out.with_name(f"{out.name}{STAGING_MARK}{secrets.token_hex(4)}")
        try:
            staging.mkdir()  # umask permissions, as `out` itself would get
            return staging
        except FileExistsError:
            continue


def discard(staging: Path) -> None:
    """Remove a staging directory (a failed export's); a failure to is only logged."""
    try:
        shutil.rmtree(staging)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("could not remove the unfinished export %s (%s); delete it by hand",
                    staging, exc)


def publish(staging: Path, out: Path, *, replace: bool) -> None:
    """Rename `staging` to `out`. An existing `out` that is not empty is replaced only with
    `replace` (else LogitStoreError, both left as they are); it is renamed aside first and
    deleted once `staging` is in its place, or renamed back if that rename fails."""
    if not out.exists():
        os.rename(staging, out)
        return
    if not replace and out.is_dir() and any(out.iterdir()):
        raise LogitStoreError(
            f"out {out} is no longer empty (something wrote there while the export ran); "
            f"it is left as it is: rerun with --overwrite to replace it, or choose another "
            "directory")
    old = out.with_name(f"{out.name}{OLD_MARK}{secrets.token_hex(4)}")
    os.rename(out, old)
    try:
        os.rename(staging, out)
    except BaseException:
        os.rename(old, out)
        raise
    try:
        shutil.rmtree(old)
    except OSError as exc:  # the new export is in place; only the old one's space is lost
        log.warning("replaced %s, but could not delete the previous export now in %s (%s); "
                    "delete it by hand", out, old, exc)
