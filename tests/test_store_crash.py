"""Crash safety: a writer process killed with SIGKILL at any moment leaves the last committed
state readable and verifiable; reopening the part resumes, and the finished store holds
exactly what an uninterrupted write holds.

The writer runs in a child process (`tests/crash_writer.py`). Most children are forked from a
multiprocessing forkserver that has already imported logitstore, so a trial costs a fork
instead of a fresh interpreter; one test uses a plain `python tests/crash_writer.py`.

Kills come two ways:
- at a chosen file operation of the writer (it SIGKILLs itself before, halfway through, or
  right after a write or delete), picked from the log of an uninterrupted run so that every
  phase of the protocol is hit (FORMAT.md section 8): mid segment file, between a segment's
  files and its record, between record and head, mid head, mid record, before and mid the
  store manifest that registers the part, and in close(): after the complete head, between
  consolidated index, catalog and store manifest, mid store manifest;
- by the test (SIGKILL) at seeded random moments: a random number of segment commits into
  the run, then its next file write, plus a random part of the time a segment's files, record
  and head take to write, landing wherever the writer is.
After every kill the committed state is checked, and the store is finished by reopening
the part in this process and writing the samples after `committed_count`
(tests/crash_checks.py holds the checks).

A kill must really have cut a run short: every chosen-operation kill asserts the child died
by SIGKILL before it reported DONE, at the operation it named; the random campaigns count
the runs killed mid-run and the kills that left a commit half done on disk (files the
committed state does not list, a head ahead of the store manifest) and assert a floor for
both, since a random delay may also land after the writer finished or between two commits.
"""

from __future__ import annotations

import multiprocessing
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

import crash_writer
from crash_checks import (N, PART, PART_HEAD, SEED, SETTINGS, Reference, check_committed,
                          check_final, commit_in_progress, finish, fresh_store,
                          part_is_complete, part_segments, uncommitted_segments)
from store_helpers import content_differences, content_of, make_samples, settings_json

from logitstore.format import MANIFEST
from logitstore.reader import StoreReader
from logitstore.verify import verify_store

WRITER_SCRIPT = Path(__file__).with_name("crash_writer.py")
PRELOAD = ["numpy", "pandas", "pyarrow", "pyarrow.parquet", "zarr", "logitstore.writer",
           "logitstore.reader", "synthetic", "logitstore.verify"]  # missing: skipped
TIMEOUT = 120  # seconds a child may take before the test gives up on it (never reached)


# -- running the writer child ---------------------------------------------------------------

@dataclass
class Run:
    lines: list[str] = field(default_factory=list)
    times: list[float] = field(default_factory=list)  # when each line arrived (monotonic)
    exitcode: int | None = None

    @property
    def done(self) -> bool:
        return any(line.startswith("DONE") for line in self.lines)

    @property
    def killed(self) -> bool:
        return self.exitcode == -signal.SIGKILL

    @property
    def interrupted(self) -> bool:
        """Died by SIGKILL before it reported DONE: the kill cut its write short."""
        return self.killed and not self.done

    def kill_line(self) -> str | None:
        return next((line for line in self.lines if line.startswith("KILL ")), None)


def writer_argv(store: Path, *extra: str) -> list[str]:
    return [str(store), "--n", str(N), "--seed", str(SEED), "--settings",
            settings_json(SETTINGS), "--part", PART, *extra]


@pytest.fixture(scope="module")
def mp():
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)  # no effect if this process's forkserver already runs
    return ctx


def run_forked(mp, argv: list[str], kill_after: float | None = None,
               after_commits: int = 0, after_first_write: bool = False) -> Run:
    """Run the writer in a forked child. With kill_after, SIGKILL it that many seconds after
    its `after_commits`-th segment commit (0: after READY); it may finish first. Otherwise
    let it finish or kill itself. Returns its protocol lines and exit code."""
    parent, child = mp.Pipe()
    proc = mp.Process(target=crash_writer.forked, args=(argv, child), daemon=True)
    proc.start()
    child.close()
    run = Run()

    def receive(timeout: float) -> bool:
        """One message within timeout; False on timeout or once the child has gone."""
        try:
            if not parent.poll(max(timeout, 0)):
                return False
            run.lines.append(parent.recv())
            run.times.append(time.monotonic())
            return True
        except (EOFError, OSError):
            return False

    def commits() -> int:
        return sum(line.startswith("COMMITTED") for line in run.lines)

    try:
        deadline = time.monotonic() + TIMEOUT
        while not any(line.startswith("READY") for line in run.lines):
            if not receive(deadline - time.monotonic()):
                break
        if kill_after is not None:
            while commits() < after_commits and not run.done:
                if not receive(deadline - time.monotonic()):
                    break
            if after_first_write:  # (needs --log-ops) then at the next file operation
                count = len(run.lines)
                while not any(line.startswith("OP ") for line in run.lines[count:]) and \
                        not run.done and receive(deadline - time.monotonic()):
                    pass
            kill_at = time.monotonic() + kill_after
            while (left := kill_at - time.monotonic()) > 0 and receive(left):
                pass
            proc.kill()
        else:
            while receive(deadline - time.monotonic()):
                pass
        proc.join(TIMEOUT)
        while receive(0):
            pass
    finally:
        if proc.is_alive():
            proc.kill()
            proc.join()
        parent.close()
    run.exitcode = proc.exitcode
    assert not any(line.startswith("ERROR") for line in run.lines), run.lines
    assert run.done or run.killed, f"writer neither finished nor was killed: {run}"
    return run


# -- the reference: one uninterrupted write --------------------------------------------------

@pytest.fixture(scope="module")
def reference(mp, tmp_path_factory) -> Reference:
    path = tmp_path_factory.mktemp("crash") / "reference"
    run = run_forked(mp, writer_argv(path, "--log-ops"))
    assert run.done and run.exitcode == 0
    ops = []
    for line in run.lines:
        if line.startswith("OP "):
            _, n, kind, rel = line.split(" ", 3)
            ops.append((int(n), kind, rel))
    done = next(line for line in run.lines if line.startswith("DONE")).split()
    seconds = float(done[-1].split("=")[1])
    assert verify_store(str(path)) == []
    reader = StoreReader(str(path))
    ids = [s.sample_id for s in make_samples(N, SEED, SETTINGS)]
    assert reader.sample_ids == ids
    assert len(reader.segments) >= 4, "segments too large for the kills to land in many phases"
    digests = dict(zip(reader.sample_ids, reader.index.column("digest").to_pylist()))
    commits = sum(line.startswith("COMMITTED") for line in run.lines)
    return Reference(path, reader, ids, content_of(reader), digests, ops, seconds, commits,
                     write_seconds(run))


def write_seconds(run: Run) -> float:
    """Mean time from the first file operation after a commit (or READY) to the next
    commit: how long a segment's files, record and head take to write."""
    spans, start = [], None
    for line, when in zip(run.lines, run.times):
        if line.startswith("OP ") and start is None:
            start = when
        elif line.startswith("COMMITTED") and start is not None:
            spans.append(when - start)
            start = None
    assert spans, run.lines[:5]
    return sum(spans) / len(spans)


# -- kills at chosen file operations -------------------------------------------------------

def kill_points(ops: list[tuple[int, str, str]], full: bool = False
                ) -> list[tuple[str, int, str]]:
    """(what it tests, operation number, phase) covering every step of the protocol."""
    seg_files = [(n, rel) for n, kind, rel in ops if kind == "write" and "/seg-" in rel
                 and "/records/" not in rel]
    seg_index = [n for n, rel in seg_files if rel.endswith("/index.parquet")]
    writes = [(n, rel) for n, kind, rel in ops if kind == "write"]
    records = [n for n, rel in writes if "/records/" in rel]
    heads = [n for n, rel in writes if rel == PART_HEAD]
    index = [n for n, rel in writes if rel.startswith("index/") and rel.endswith(".parquet")]
    catalog = [n for n, rel in writes if rel.endswith(".catalog.json")]
    store = [n for n, rel in writes if rel == MANIFEST]
    in_seg1 = [n for n, rel in seg_files if "/seg-000001/" in rel]
    # per segment: its files, its record, the head; the store manifest once when the part
    # is registered (first segment) and once in close() (consolidation)
    assert len(records) >= 4 and len(heads) == len(records) + 1 and len(store) == 2
    assert index and catalog and not [n for n, kind, _ in ops if kind == "delete"]
    points = [
        ("before the first file", 0, "before"),
        ("first head written, store manifest never written", heads[0], "after"),
        ("halfway through the store manifest registering the part", store[0], "partial"),
        ("halfway through a shard file of segment 1", in_seg1[len(in_seg1) // 2], "partial"),
        ("segment files written, record not", seg_index[1], "after"),
        ("record written, head not", records[2], "after"),
        ("halfway through a head", heads[2], "partial"),
        ("close(): part marked complete, store not consolidated", heads[-1], "after"),
        ("close(): consolidated index written, catalog not", index[-1], "after"),
        ("close(): halfway through the consolidated store manifest", store[-1], "partial"),
    ]
    if full:
        points += [
            ("halfway through the first segment's 3rd file", seg_files[2][0], "partial"),
            ("halfway through a record", records[3], "partial"),
            ("close(): catalog written, store manifest not", catalog[-1], "after"),
            ("close(): store manifest written", store[-1], "after"),
        ]
    return points


# trials whose kill leaves an uncommitted segment directory: kill the resuming writer too,
# halfway through deleting it (its first file operation)
KILL_THE_CLEANUP_TOO = {"halfway through a shard file of segment 1"}
KILL_THE_CLEANUP_TOO_FULL = KILL_THE_CLEANUP_TOO | {"segment files written, record not"}
# kill points that leave no commit half done (every other one must: commit_in_progress)
BETWEEN_COMMITS = {"before the first file", "close(): store manifest written"}


def kill_at_protocol_steps(mp, ref: Reference, tmp_path: Path, full: bool) -> None:
    ops = {n: (kind, rel) for n, kind, rel in ref.ops}
    points = kill_points(ref.ops, full)
    outcomes = []
    for number, (what, op, phase) in enumerate(points):
        store = fresh_store(tmp_path, f"t{number:02d}")
        run = run_forked(mp, writer_argv(store, "--kill-op", str(op), "--kill-phase", phase))
        kind, rel = ops[op]
        expected, line = f"KILL {op} {kind} {phase} {rel}", run.kill_line() or ""
        if rel.endswith(".catalog.json"):  # named by its content: records' commit times
            expected, line = expected.rsplit("/", 1)[0], line.rsplit("/", 1)[0]
        assert run.interrupted and line == expected, (what, run.lines[-3:])
        left = commit_in_progress(store)
        assert (left is None) == (what in BETWEEN_COMMITS), (what, left)
        visible = check_committed(store, ref)
        if what in (KILL_THE_CLEANUP_TOO_FULL if full else KILL_THE_CLEANUP_TOO):
            assert uncommitted_segments(store), "expected a leftover segment directory"
            again = run_forked(mp, writer_argv(store, "--kill-op", "0", "--kill-phase",
                                               "partial"))
            assert again.interrupted and \
                again.kill_line().startswith("KILL 0 delete partial parts/"), again.lines[-3:]
            assert commit_in_progress(store), "half of the leftover directory should remain"
            visible = check_committed(store, ref, at_least=visible)
        how = finish(store, visible)
        check_final(store, ref)
        outcomes.append((what, visible, how))
    # the close() window is the one place where the part cannot simply be reopened
    assert [what for what, _, how in outcomes if how.startswith("complete")] == \
        [what for what, _, _ in points if what.startswith("close()")]
    print("\n".join(f"{what:55s} visible={n:3d}  {how}" for what, n, how in outcomes))


def test_kill_at_every_protocol_step(mp, reference, tmp_path):
    """SIGKILL (self-inflicted at a chosen file operation) in every phase of the protocol."""
    kill_at_protocol_steps(mp, reference, tmp_path, full=False)


@pytest.mark.slow
def test_kill_at_every_protocol_step_full(mp, reference, tmp_path):
    kill_at_protocol_steps(mp, reference, tmp_path, full=True)


@pytest.mark.slow
def test_kill_at_many_file_operations(mp, reference, tmp_path):
    """Every 5th file operation (and the last), each in a random one of the three phases."""
    rng = np.random.default_rng(7)
    ops = sorted({n for n, _, _ in reference.ops[::5]} | {reference.ops[-1][0]})
    half_done = 0
    for op in ops:
        phase = ["before", "partial", "after"][int(rng.integers(3))]
        store = fresh_store(tmp_path, f"op{op:04d}")
        run = run_forked(mp, writer_argv(store, "--kill-op", str(op), "--kill-phase", phase))
        assert run.interrupted and run.kill_line().startswith(f"KILL {op} "), run.lines[-3:]
        half_done += commit_in_progress(store) is not None
        visible = check_committed(store, reference)
        finish(store, visible)
        check_final(store, reference)
    # most file operations lie inside a commit: the kills must have cut commits short
    print(f"{half_done} of {len(ops)} kills left a commit half done")
    assert half_done >= 0.8 * len(ops), (half_done, len(ops))


# -- kills after random delays -----------------------------------------------------------

@dataclass
class Campaign:
    report: list[str] = field(default_factory=list)  # one line per writer run
    interrupted: int = 0  # runs the kill cut short (SIGKILL before DONE)
    half_done: int = 0  # of those, kills that left a commit half done (commit_in_progress)


def random_kill_trials(mp, ref: Reference, tmp_path: Path, seed: int, kills: int) -> Campaign:
    """`kills` writer runs, each SIGKILLed after a seeded random delay, in chains of 1-2 runs
    on one store (the second resumes what the first left); check after each; finish."""
    rng = np.random.default_rng(seed)
    campaign, trial = Campaign(), 0
    report = campaign.report
    while len(report) < kills:
        store = fresh_store(tmp_path, f"r{trial:03d}")
        visible = 0
        for _ in range(1 + trial % 2):  # every other trial also kills the resumed writer
            if part_is_complete(store) or len(report) == kills:
                break  # finished (or killed inside close()): a complete part is not reopened
            # Anchor the kill on a segment commit picked at random among those still to come
            # (so kills spread over the whole run whatever the machine's speed), then on the
            # next segment's first file write (encoding a segment writes nothing), then wait
            # a random part of the time its files, record and head take (+30%: sometimes
            # past its commit).
            after = int(rng.integers(0, max(ref.commits - len(part_segments(store)), 0) + 1))
            delay = float(rng.uniform(0, 1.3 * ref.write_seconds))
            run = run_forked(mp, writer_argv(store, "--log-ops"), kill_after=delay,
                             after_commits=after, after_first_write=True)
            left = commit_in_progress(store) if run.interrupted else None
            campaign.interrupted += run.interrupted
            campaign.half_done += left is not None
            visible = check_committed(store, ref, at_least=visible)
            outcome = (f"killed mid-run ({left or 'between commits'})" if run.interrupted
                       else "finished first")
            report.append(f"trial {trial} kill {delay:4.2f}s after commit {after}: "
                          f"{outcome}, {visible} visible")
        report[-1] += "; " + finish(store, visible)
        check_final(store, ref)
        trial += 1
    print("\n".join(report))
    print(f"{campaign.interrupted} of {kills} runs killed mid-run, "
          f"{campaign.half_done} with a commit half done")
    return campaign


def test_sigkill_at_random_moments(mp, reference, tmp_path):
    campaign = random_kill_trials(mp, reference, tmp_path, seed=20240611, kills=10)
    assert len(campaign.report) == 10
    # Measured 9 and 7 of 10 (a kill between commits leaves nothing half done on disk);
    # the bounds leave room for the timing of a busy machine.
    assert campaign.interrupted >= 5 and campaign.half_done >= 1, campaign


@pytest.mark.slow
def test_sigkill_at_random_moments_many(mp, reference, tmp_path):
    campaign = random_kill_trials(mp, reference, tmp_path, seed=99, kills=60)
    assert campaign.interrupted >= 40 and campaign.half_done >= 15, campaign  # 56 and 32 seen


def test_sigkill_of_a_fresh_interpreter(reference, tmp_path):
    """The same through a plain `python tests/crash_writer.py` subprocess (no forkserver):
    the first run is killed inside its second segment, the resumed one inside its first
    (a random part of a segment's write time after a commit or READY), so each dies mid-run."""
    rng = np.random.default_rng(3)
    store = fresh_store(tmp_path, "exec")
    segment_seconds = reference.seconds / (reference.commits + 1)
    visible = 0
    for after_commits in (1, 0):
        proc = subprocess.Popen([sys.executable, str(WRITER_SCRIPT), *writer_argv(store)],
                                stdout=subprocess.PIPE, text=True)
        try:
            ready = proc.stdout.readline()
            assert ready.startswith("READY committed="), ready
            assert int(ready.split("=")[1]) >= visible
            seen = [proc.stdout.readline() for _ in range(after_commits)]
            assert all(line.startswith("COMMITTED") for line in seen), seen
            time.sleep(float(rng.uniform(0, 0.3)) * segment_seconds)
            proc.kill()  # SIGKILL
            rest = proc.stdout.read().splitlines()
        finally:
            proc.kill()
            proc.wait()
            proc.stdout.close()
        assert proc.returncode == -signal.SIGKILL, (proc.returncode, ready, rest)
        assert not any(line.startswith("DONE") for line in rest), ("killed after DONE", rest)
        visible = check_committed(store, reference, at_least=visible)
    finish(store, visible)
    check_final(store, reference)
    problems = content_differences(content_of(StoreReader(str(store))), reference.content)
    assert not problems, problems  # decoded in full, whatever the layout
