"""Exit status of every command: logitstore, teacher-dump, student-train, distill-eval,
student-export, distill-serve (and its container entry point `serve`).

    0    success
    1    user, config or data error: a LogitStoreError or an OSError on the user's paths,
         one paragraph `PROG: error: ...`; or store damage found by `logitstore verify`
         or `logitstore cp` (verifying the copy), one `DAMAGED <file>: <problem>` line
         per problem, which `verify` follows with `STORE: N problem(s)`
    2    usage error found by click itself (unknown flag, missing argument)
    130  interrupted (Ctrl-C); teacher-dump and student-train resume when rerun

The commands build on `Command`/`Group` below, so an interrupt exits 130 everywhere
(click alone prints "Aborted!" and exits 1), and report errors through `fail`.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Iterator, NoReturn

import click

from logitstore.errors import LogitStoreError

OK = 0
USER_ERROR = 1
USAGE = 2  # click's own UsageError.exit_code
INTERRUPTED = 130  # 128 + SIGINT, as shells report a Ctrl-C


def fail(prog: str, message: str, *, code: int = USER_ERROR, prefix: str = "") -> NoReturn:
    """Print `PROG: error: MESSAGE` on stderr and exit with `code`.

    `prefix` goes before it, e.g. "[rank 1] " in a multi-process run.
    """
    click.echo(f"{prefix}{prog}: error: {message}", err=True)
    sys.exit(code)


@contextlib.contextmanager
def errors_reported(prog: str, *, verbose: bool = False) -> Iterator[None]:
    """Exit 1 with one paragraph for what goes wrong inside the block.

    A LogitStoreError (config, model loading, store, data) prints its message; an OSError
    (the output is not writable, the disk is full) its type and message; any other exception
    (a bug, an unexpected library failure) its type and first 500 characters, or its
    traceback when `verbose`.
    """
    try:
        yield
    except LogitStoreError as exc:
        fail(prog, str(exc))
    except OSError as exc:
        fail(prog, f"{type(exc).__name__}: {exc}")
    except Exception as exc:
        if verbose:
            raise
        fail(prog, f"unexpected {type(exc).__name__}: {' '.join(str(exc).split())[:500]} "
                   "(rerun with -v for the traceback)")


def interrupted(prog: str, hint: str = "") -> NoReturn:
    """Print `PROG: interrupted[; HINT]` on stderr and exit 130."""
    click.echo(f"{prog}: interrupted" + (f"; {hint}" if hint else ""), err=True)
    sys.exit(INTERRUPTED)


class _ExitsOnInterrupt:
    """A click command that exits 130 on KeyboardInterrupt; `interrupted_hint` says what
    to do next (a keyword of the command decorator)."""

    def __init__(self, *args, interrupted_hint: str = "", **kwargs):
        super().__init__(*args, **kwargs)
        self.interrupted_hint = interrupted_hint

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            interrupted(self.name, self.interrupted_hint)


class Command(_ExitsOnInterrupt, click.Command):
    """click.Command with the exit status above (use as `@click.command(cls=Command)`)."""


class Group(_ExitsOnInterrupt, click.Group):
    """click.Group with the exit status above; covers every subcommand."""
