"""Build an export in a staging directory, then swap it into place: a failed or interrupted
export never loses the previous one.

    staging = new_staging_dir(out)           # OUT.tmp-XXXXXXXX, or OUT/.tmp-XXXXXXXX
    try:
        ...write and check the export in staging...
        publish(staging, out, replace=True)  # only once it is complete
    except SwapRestoreFailed:
        raise                                # staging holds the only complete export: kept
    except BaseException:
        discard(staging)
        raise

Where the staging directory goes:
- OUT missing: beside it (OUT.tmp-XXXXXXXX), renamed to OUT by `publish` (one rename).
- OUT exists (empty, or a previous export): INSIDE it (OUT/.tmp-XXXXXXXX, a name no export
  file has). OUT itself is never renamed: it may be a mount point (a Docker volume, where
  rename(2) fails with EBUSY), its parent may not be writable, and a user-made OUT keeps its
  inode, permissions and owner. `publish` swaps entry by entry: the previous export's entries
  move into OUT/.old-XXXXXXXX, the new ones move up, the two directories go. Each move is a
  rename within OUT's file system; if one fails, the moves done are undone in reverse, so
  OUT is as it was before `publish`.

Only a process killed outright (SIGKILL, power loss) can leave a .tmp-/.old- directory
behind; `is_leftover` recognises them (an --overwrite sweeps those inside OUT away).
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
from pathlib import Path

from logitstore.errors import LogitStoreError
from logitstore.toolkit.inference import EXPORT_MANIFEST

log = logging.getLogger(__name__)

STAGING_MARK = ".tmp-"
OLD_MARK = ".old-"


class SwapRestoreFailed(LogitStoreError):
    """A swap failed and putting the previous export back failed too: the message names
    where the previous export's entries and the complete new export are now."""


def swap_target(out: Path) -> Path:
    """The directory the export goes to: `out` itself; what it links to when it is a
    symbolic link (so the link keeps pointing at the export); the absolute path when it
    has no name of its own ("." or ending in "..")."""
    return out.resolve() if out.is_symlink() or out.name in ("", "..") else out


def is_leftover(name: str) -> bool:
    """Whether an entry of OUT is a staging or set-aside directory of an export that was
    killed outright (no export file starts with these marks)."""
    return name.startswith(STAGING_MARK) or name.startswith(OLD_MARK)


def _new_dir(parent: Path, prefix: str) -> Path:
    while True:
        candidate = parent / f"{prefix}{secrets.token_hex(4)}"
        try:
            candidate.mkdir()  # umask permissions, as a new `out` would get
            return candidate
        except FileExistsError:
            continue


def new_staging_dir(out: Path) -> Path:
    """An empty new directory: OUT/.tmp-XXXXXXXX when `out` is a directory, else
    OUT.tmp-XXXXXXXX beside it (its parent created)."""
    if out.is_dir():
        return _new_dir(out, STAGING_MARK)
    out.parent.mkdir(parents=True, exist_ok=True)
    return _new_dir(out.parent, out.name + STAGING_MARK)


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
    """Put the export in `staging` in place as `out` (module docstring). `replace`: `out`
    held a previous export, to be replaced; it must still hold its export.json now (else
    LogitStoreError, both left as they are). Without it, `out` must be missing or hold
    nothing but `staging`. A failed swap is undone and re-raised; SwapRestoreFailed when
    undoing fails too."""
    if not out.exists():
        os.rename(staging, out)
        return
    present = sorted(p for p in out.iterdir() if p != staging)
    if replace and not (out / EXPORT_MANIFEST).is_file():
        raise LogitStoreError(
            f"out {out} no longer holds the previous export's {EXPORT_MANIFEST} (something "
            "changed it while the export ran), so --overwrite does not replace it: check "
            "what is there, then rerun")
    if not replace and present:
        raise LogitStoreError(
            f"out {out} is no longer empty (something wrote there while the export ran: "
            f"{', '.join(p.name for p in present[:5])}); it is left as it is: rerun with "
            "--overwrite to replace an export, or choose another directory")
    old = _new_dir(out, OLD_MARK) if present else None
    moves = [(p, old / p.name) for p in present] if old is not None else []
    moves += [(p, out / p.name) for p in sorted(staging.iterdir())]
    _move_all(moves, out, staging, old)
    _remove_quietly(staging, out, "the emptied staging directory")
    if old is not None:
        _remove_quietly(old, out, "the previous export")


def _move_all(moves: list[tuple[Path, Path]], out: Path, staging: Path,
              old: Path | None) -> None:
    """Rename each (source, destination) in order; on a failure, undo the done ones in
    reverse and re-raise (SwapRestoreFailed when an undo fails as well)."""
    done: list[tuple[Path, Path]] = []
    try:
        for source, destination in moves:
            os.rename(source, destination)
            done.append((source, destination))
    except BaseException as failure:
        try:
            for source, destination in reversed(done):
                os.rename(destination, source)
            if old is not None:
                old.rmdir()
        except OSError as restore_error:
            previous = (f"the previous export's files are split between {old} and {out}"
                        if old is not None else f"{out} held no previous export")
            raise SwapRestoreFailed(
                f"swapping the new export into {out} failed ({failure!r}), and undoing the "
                f"moves failed too ({restore_error!r}); nothing was deleted: {previous}, the "
                f"complete new export's files between {staging} and {out}. Move the files "
                f"you want into {out} by hand, then delete the rest") from failure
        raise


def _remove_quietly(directory: Path, out: Path, what: str) -> None:
    # The new export is in place by now; a failure here only leaves space in use.
    try:
        shutil.rmtree(directory)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("replaced %s, but could not delete %s in %s (%s); delete it by hand",
                    out, what, directory, exc)
