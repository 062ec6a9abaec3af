"""One trial of `student-train sweep` as a separate process, watched by the sweep.

`TrialProcess(trial_dir, command, metric_key)` starts `command + [trial_dir/config.yaml]`
(by default `python -m student_train --config`: the real student-train) with its output in
trial_dir/log.txt, its run in trial_dir/run. The sweep polls it:
  - `new_values()`: the metric of each evaluation the run appended to run/metrics.jsonl since
    the last call, as [(step, value)] (what Optuna's trial.report takes);
  - `poll()`: the exit status, None while it runs;
  - `stop()`: SIGINT (student-train exits 130, its files closed), SIGKILL after a grace time;
  - `final_value()`: the run's final metric (training_metadata.json's final_metrics, which is
    the best evaluation under early stopping), else the last one reported;
  - `failure()`: one paragraph on why it exited non-zero (its `error:` line, else its log's end).
A child dies with the sweep (Linux: parent-death signal), so a killed sweep leaves no trainer
running; `owner_id()`/`owner_alive()` tell a resumed sweep which RUNNING trials lost their
process (a trial records the owner that started it).
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

TRIAL_COMMAND = (sys.executable, "-m", "student_train", "--config")
STOP_GRACE_S = 30.0
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def metric_key(name: str) -> str:
    """--metric as named in metrics.jsonl: `eval_loss` -> `eval/loss` (`eval/loss` as is)."""
    if "/" not in name and name.startswith("eval_"):
        return "eval/" + name.removeprefix("eval_")
    return name


def _start_ticks(pid: int) -> str:
    """The process's start time in clock ticks since boot (Linux), "" elsewhere: with the pid,
    it names one process even after the pid is reused."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rpartition(")")[2].split()[19]  # field 22 of proc(5)


def owner_id() -> str:
    """host:pid:start of this sweep process."""
    return f"{socket.gethostname()}:{os.getpid()}:{_start_ticks(os.getpid())}"


def owner_alive(owner: str) -> bool:
    """Whether the sweep process `owner` still runs; True when it cannot be told (another
    host), so that a trial another machine may still be running is left alone."""
    host, _, rest = owner.partition(":")
    pid_text, _, ticks = rest.partition(":")
    if host != socket.gethostname() or not pid_text.isdigit():
        return True
    pid = int(pid_text)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return not ticks or _start_ticks(pid) == ticks


def _child_setup(parent: int) -> None:
    """In the child before exec: SIGINT handled (a sweep started in the background ignores it,
    and the ignore would be inherited, so `stop()` could not end the child cleanly); SIGTERM
    when the sweep dies (Linux), so that no trainer outlives a killed sweep."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # the sweep died before prctl took effect
        os._exit(1)


class TrialProcess:
    """A running trial: the child process and the tail of its metrics.jsonl."""

    def __init__(self, trial_dir: Path, command: tuple[str, ...] | list[str], metric: str,
                 env: dict[str, str] | None = None):
        self.dir = Path(trial_dir)
        self.metric = metric_key(metric)
        self.reported: list[tuple[int, float]] = []
        self._offset, self._partial = 0, b""
        self._log = (self.dir / "log.txt").open("ab")
        parent = os.getpid()
        self.process = subprocess.Popen(
            [*command, str(self.dir / "config.yaml")], stdin=subprocess.DEVNULL,
            stdout=self._log, stderr=subprocess.STDOUT, env=env,
            preexec_fn=(lambda: _child_setup(parent)) if os.name == "posix" else None)

    @property
    def run_dir(self) -> Path:
        return self.dir / "run"

    def new_values(self) -> list[tuple[int, float]]:
        """(step, metric) of each evaluation logged since the last call."""
        path = self.run_dir / "metrics.jsonl"
        try:
            with path.open("rb") as f:
                f.seek(self._offset)
                chunk = f.read()
        except FileNotFoundError:
            return []
        self._offset += len(chunk)
        *lines, self._partial = (self._partial + chunk).split(b"\n")  # keep a partial line
        found = []
        for line in lines:
            try:
                record = json.loads(line) if line.strip() else {}
            except ValueError:  # not a record (the file is only appended to by the run)
                continue
            if self.metric in record and "step" in record:
                found.append((int(record["step"]), float(record[self.metric])))
        self.reported += found
        return found

    def poll(self) -> int | None:
        code = self.process.poll()
        if code is not None:
            self._log.close()
        return code

    def stop(self, grace_s: float = STOP_GRACE_S) -> None:
        """End the child: SIGINT, then SIGKILL if it has not exited within `grace_s`."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(grace_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()

    def final_value(self) -> float | None:
        """The run's final metric, else the last evaluation's; None when it logged none."""
        try:
            meta = json.loads((self.run_dir / "training_metadata.json").read_text())
            value = (meta.get("final_metrics") or {}).get(self.metric)
        except (OSError, ValueError):
            value = None
        if value is None and self.reported:
            value = self.reported[-1][1]
        return None if value is None else float(value)

    def failure(self, code: int) -> str:
        """Why the child failed, one paragraph: its `error:` line, else the end of its log."""
        try:
            text = (self.dir / "log.txt").read_text(encoding="utf-8", errors="replace")
        except OSError:
            text = ""
        lines = [line.strip() for line in text.replace("\r", "\n").splitlines() if line.strip()]
        errors = [line for line in lines if ": error:" in line]
        reason = errors[-1] if errors else " | ".join(lines[-3:]) or "no output"
        return f"exit status {code}: {reason[:600]} (log: {self.dir / 'log.txt'})"

    def missing_metric(self) -> str:
        """Why a run that exited 0 has no value."""
        return (f"the run logged no {self.metric} (is there an eval set: eval_fraction, "
                f"eval_split or eval_store? is the metric named as in {self.run_dir}/"
                f"metrics.jsonl?)")


def is_number(value: float | None) -> bool:
    return value is not None and not math.isnan(value) and not math.isinf(value)
