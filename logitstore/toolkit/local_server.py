"""A server command run as a real process on this machine, for benchmarks, the demo and tests.

    port = free_port()
    with LocalServer([sys.executable, "-m", "distill_serve", model, "--port", str(port)],
                     health_url=f"http://127.0.0.1:{port}/ping") as server:
        ready_s = server.wait_ready(timeout_s=120)
        ...                                   # talk to http://127.0.0.1:PORT
        exit_code = server.stop(timeout_s=60)  # SIGTERM, then wait

The process's stdout and stderr go to a log file (a pipe nobody reads could fill up and block
it): `log_path` when given (kept), else a temporary file removed on exit. Every wait is
bounded, and leaving the `with` block kills the process if it is still running, whatever
happened inside, so no caller leaves a server behind. A server that exits, or does not answer
200 in time, raises LocalServerError with the tail of its log.

Standard library only (urllib for the health checks): importing this pulls in no HTTP client,
torch or transformers.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

LOOPBACK = "127.0.0.1"
LOG_TAIL_CHARS = 3000
# Loopback needs no proxy, and an http_proxy in the environment must not reroute the checks.
_NO_PROXY_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class LocalServerError(RuntimeError):
    """The server exited, did not get ready, or did not stop in time (message: its log tail)."""


def free_port(host: str = LOOPBACK) -> int:
    """A port on `host` nothing listens on now (the server binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def http_status(url: str, timeout_s: float) -> tuple[int, bytes] | None:
    """(status, body) of GET `url`, error statuses included; None when nothing answers
    (connection refused or reset, timeout)."""
    try:
        with _NO_PROXY_OPENER.open(url, timeout=timeout_s) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:  # a status >= 400 is an answer too
        with error:
            return error.code, error.read()
    except (OSError, ValueError):  # URLError, refused, reset, timeout; ValueError: bad chunking
        return None


class LocalServer:
    """`argv` started as a subprocess on entry to the `with` block (module docstring).

    `health_url`: what `wait_ready` polls; `env`: variables added to this process's
    environment; `cwd`: the working directory; `log_path`: where the output goes (kept);
    `name`: what messages call it (default: the program's file name).
    """

    def __init__(self, argv: Sequence[str], *, health_url: str,
                 env: Mapping[str, str] | None = None, cwd: str | Path | None = None,
                 log_path: str | Path | None = None, name: str | None = None):
        self.argv = [str(a) for a in argv]
        self.name = name or Path(self.argv[0]).name
        self.health_url = health_url
        self.env = {**os.environ, **(env or {})}
        self.cwd = cwd
        self.keep_log = log_path is not None
        self.log_path = Path(log_path) if log_path is not None else None
        self.process: subprocess.Popen | None = None
        self.started = 0.0  # time.monotonic() at start

    def start(self) -> LocalServer:
        """Start the process (once); its output goes to the log file."""
        if self.process is not None:
            raise LocalServerError(f"{self.name} was already started")
        if self.log_path is None:
            with tempfile.NamedTemporaryFile("wb", prefix="local-server-", suffix=".log",
                                             delete=False) as tmp:
                self.log_path = Path(tmp.name)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:  # the child keeps its own descriptor
            self.process = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT,
                                            cwd=self.cwd, env=self.env)
        self.started = time.monotonic()
        return self

    def __enter__(self) -> LocalServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def log_tail(self, chars: int = LOG_TAIL_CHARS) -> str:
        """The last `chars` characters the process wrote ("" before it started)."""
        if self.log_path is None or not self.log_path.is_file():
            return ""
        return self.log_path.read_text(errors="replace")[-chars:]

    def _failure(self, what: str) -> LocalServerError:
        where = f" (log: {self.log_path})" if self.keep_log else ""
        return LocalServerError(f"{self.name} {what}{where}; last lines of its log:\n"
                                f"{self.log_tail()}")

    def _running(self) -> subprocess.Popen:
        """The started process; LocalServerError before `start` (a call outside the `with`)."""
        if self.process is None:
            raise LocalServerError(f"{self.name} was not started; use it as a context manager "
                                   "(with LocalServer(...) as server:) or call start()")
        return self.process

    def wait_ready(self, timeout_s: float, *, interval_s: float = 0.1,
                   on_answer: Callable[[int, bytes], None] | None = None) -> float:
        """Seconds from the start until GET health_url answers 200, polled every
        `interval_s`; `on_answer(status, body)` sees every answer (the 200 included).
        LocalServerError when the process exits first or `timeout_s` passes, or was
        never started."""
        process = self._running()
        deadline = time.monotonic() + timeout_s
        while True:
            if process.poll() is not None:
                raise self._failure(f"exited {process.returncode} before it was ready")
            left = deadline - time.monotonic()
            if left <= 0:
                raise self._failure(f"did not answer 200 at {self.health_url} within "
                                    f"{timeout_s:g} s")
            answer = http_status(self.health_url, timeout_s=min(5.0, left))
            if answer is not None:
                if on_answer is not None:
                    on_answer(*answer)
                if answer[0] == 200:
                    return time.monotonic() - self.started
            time.sleep(min(interval_s, max(deadline - time.monotonic(), 0)))

    def terminate(self) -> None:
        """SIGTERM (a server drains its work, then exits); LocalServerError if never
        started."""
        self._running().send_signal(signal.SIGTERM)

    def wait(self, timeout_s: float) -> int:
        """The exit code, once the process has exited (subprocess.TimeoutExpired after
        `timeout_s`); LocalServerError if never started."""
        return self._running().wait(timeout=timeout_s)

    def stop(self, timeout_s: float) -> int:
        """SIGTERM, then the exit code; LocalServerError (the process killed) when it has
        not exited after `timeout_s`."""
        self.terminate()
        try:
            return self.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self._kill()
            raise self._failure(f"did not exit within {timeout_s:g} s of SIGTERM") from None

    def _kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)

    def close(self) -> None:
        """Kill the process if it still runs; remove the log unless it was `log_path`."""
        try:
            self._kill()
        finally:
            if not self.keep_log and self.log_path is not None:
                self.log_path.unlink(missing_ok=True)
