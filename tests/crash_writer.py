"""Writer subprocess for the crash-safety and concurrency tests (not a test module).

    python tests/crash_writer.py STORE --n 60 --seed 3 [options]
    multiprocessing: Process(target=crash_writer.forked, args=(argv, pipe_end))

Builds `store_helpers.make_samples(n, seed, settings)` (the same samples in every process),
opens `StoreWriter(STORE, settings, part=...)`, skips the `committed_count` samples already
committed (resume) and writes the rest, then closes the writer. Protocol on stdout, one
line each, flushed at once:

    READY committed=<samples already committed in this part>
    COMMITTED <count>                          after each add() that committed a segment
    OP <n> <write|delete> <relative path>      with --log-ops, before each file operation
    KILL <n> <write|delete> <phase> <path>     just before killing itself (--kill-op)
    DONE committed=<count> ops=<file operations> seconds=<time spent writing>

Options:
    --settings JSON       StoreSettings.to_json() (default store_helpers.make_settings())
    --part NAME           part to write (default part-00000)
    --select all|even|odd which of the n samples this writer writes (by position)
    --no-commit           StoreWriter(commit_store=False): leave the store commit to others
    --wait-go             after READY, wait for a line on stdin before writing (a barrier)
    --lockstep M          after each of the first M segment commits, wait for a stdin line
    --sleep S             sleep S seconds after every add() (a slow writer)
    --kill-op K --kill-phase before|partial|after
                          SIGKILL itself at its K-th file operation (0-based; writes and
                          deletes through StoreFS): before doing it, halfway through it (a
                          temp file holding half the bytes; half of a directory's files
                          deleted), or right after it
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from store_helpers import make_samples, make_settings  # noqa: E402

from logitstore.format import TMP_MARK, StoreSettings  # noqa: E402
from logitstore.fs import StoreFS  # noqa: E402
from logitstore.writer import StoreWriter  # noqa: E402


_channel = None  # a multiprocessing Connection when run through `forked`, else stdout


def say(line: str) -> None:
    if _channel is not None:
        _channel.send(line)
    else:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


def wait_for_go() -> None:
    if _channel is not None:
        _channel.recv()
    else:
        sys.stdin.readline()


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(60)  # never reached


class FileOps:
    """Counts StoreFS writes and deletes; optionally logs them or dies at one of them."""

    def __init__(self, kill_op: int | None, kill_phase: str, log_ops: bool):
        self.count = 0
        self.kill_op, self.kill_phase, self.log_ops = kill_op, kill_phase, log_ops
        self._write, self._delete = StoreFS.write_bytes, StoreFS.delete
        ops = self

        def write_bytes(fs: StoreFS, rel: str, data: bytes) -> None:
            ops.around(fs, "write", rel, lambda: ops._write(fs, rel, data),
                       lambda: ops._half_write(fs, rel, data))

        def delete(fs: StoreFS, rel: str, recursive: bool = False) -> None:
            ops.around(fs, "delete", rel, lambda: ops._delete(fs, rel, recursive),
                       lambda: ops._half_delete(fs, rel))

        StoreFS.write_bytes, StoreFS.delete = write_bytes, delete

    def around(self, fs, kind, rel, do, half) -> None:
        n = self.count
        self.count += 1
        if self.log_ops:
            say(f"OP {n} {kind} {rel}")
        if n != self.kill_op:
            do()
            return
        say(f"KILL {n} {kind} {self.kill_phase} {rel}")
        if self.kill_phase == "partial":
            half()
        elif self.kill_phase == "after":
            do()
        die()

    @staticmethod
    def _half_write(fs: StoreFS, rel: str, data: bytes) -> None:
        """What a write killed halfway leaves on a local disk: a truncated temp file."""
        assert fs.is_local, "--kill-phase partial needs a local store"
        full = fs.path(rel)
        os.makedirs(os.path.dirname(full), exist_ok=True)
        tmp = os.path.join(os.path.dirname(full), f"{TMP_MARK}{uuid.uuid4().hex}-"
                                                  f"{os.path.basename(full)}")
        with open(tmp, "wb") as handle:
            handle.write(data[:len(data) // 2])

    @staticmethod
    def _half_delete(fs: StoreFS, rel: str) -> None:
        full = fs.path(rel)
        if os.path.isdir(full):
            files = sorted(os.path.join(d, f) for d, _, names in os.walk(full) for f in names)
            for path in files[:len(files) // 2]:
                os.remove(path)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("store")
    p.add_argument("--n", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--settings")
    p.add_argument("--part", default="part-00000")
    p.add_argument("--select", choices=("all", "even", "odd"), default="all")
    p.add_argument("--no-commit", action="store_true")
    p.add_argument("--wait-go", action="store_true")
    p.add_argument("--lockstep", type=int, default=0)
    p.add_argument("--sleep", type=float, default=0.0)
    p.add_argument("--kill-op", type=int)
    p.add_argument("--kill-phase", choices=("before", "partial", "after"), default="before")
    p.add_argument("--log-ops", action="store_true")
    args = p.parse_args(argv)

    try:  # pyarrow imports pandas on first use; do it before READY, not while writing
        import pandas  # noqa: F401
    except ImportError:
        pass

    settings = (StoreSettings.from_json(json.loads(args.settings)) if args.settings
                else make_settings())
    samples = make_samples(args.n, args.seed, settings)
    if args.select != "all":
        samples = samples[args.select == "odd"::2]
    ops = FileOps(args.kill_op, args.kill_phase, args.log_ops)

    writer = StoreWriter(args.store, settings, part=args.part, commit_store=not args.no_commit)
    committed = writer.committed_count
    say(f"READY committed={committed}")
    if args.wait_go:
        wait_for_go()
    start = time.perf_counter()
    commits = 0
    for sample in samples[committed:]:
        writer.add(sample)
        if writer.committed_count != committed:
            committed = writer.committed_count
            commits += 1
            say(f"COMMITTED {committed}")
            if commits <= args.lockstep:
                wait_for_go()
        if args.sleep:
            time.sleep(args.sleep)
    writer.close()
    say(f"DONE committed={writer.committed_count} ops={ops.count} "
        f"seconds={time.perf_counter() - start:.3f}")


def forked(argv: list[str], channel) -> None:
    """Entry point for a multiprocessing child: the protocol lines go to `channel` (a Pipe
    end; a "go" is any message received on it) instead of stdout/stdin."""
    global _channel
    _channel = channel
    # A lock numcodecs' blosc creates on first use would otherwise be registered with the
    # resource tracker (forkserver/spawn children), and be reported as leaked once SIGKILLed.
    import multiprocessing

    multiprocessing.set_start_method("fork", force=True)
    try:
        main(argv)
    except BaseException as err:
        say(f"ERROR {type(err).__name__}: {err}")
        raise


if __name__ == "__main__":
    main()
