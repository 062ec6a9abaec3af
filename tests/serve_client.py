"""A real `distill-serve` process on a free loopback port, for tests (tests/test_serve.py).

    with ServeProcess.start(model_dir, "--max-batch", "8") as server:
        server.wait_ready()
        server.client.post("/invocations", json={"prompt": "..."})

The process runs `python -m distill_serve` from the checkout; its log goes to a file (a pipe
nobody reads could fill up and block it). Every wait is bounded, and the process is killed on
exit from the `with` block whatever happened.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A loopback port nothing listens on now (the server binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServeProcess:
    def __init__(self, process: subprocess.Popen, port: int, log_path: Path):
        self.process = process
        self.port = port
        self.log_path = log_path
        self.url = f"http://127.0.0.1:{port}"
        self.client = httpx.Client(base_url=self.url, timeout=60)

    @classmethod
    def start(cls, model: str | Path, *args: str, env: dict[str, str] | None = None,
              serve_entry: bool = False) -> ServeProcess:
        """`python -m distill_serve MODEL --port P ARGS`, or with `serve_entry` the container
        entry point `serve ARGS` given the model and the port through its environment."""
        port = free_port()
        env = {**os.environ, "TQDM_DISABLE": "1", **(env or {})}
        if serve_entry:
            command = ["-c", "from distill_serve.cli import serve_main; serve_main()", *args]
            env.update(MODEL_DIR=str(model), SAGEMAKER_BIND_TO_PORT=str(port),
                       DISTILL_SERVE_HOST="127.0.0.1")
        else:
            command = ["-m", "distill_serve", str(model), "--port", str(port), *args]
        log_file = tempfile.NamedTemporaryFile("wb", prefix="distill-serve-", suffix=".log",
                                               delete=False)
        process = subprocess.Popen([sys.executable, *command], cwd=ROOT, stdout=log_file,
                                   stderr=subprocess.STDOUT, env=env)
        log_file.close()
        return cls(process, port, Path(log_file.name))

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def ping_statuses(self, timeout: float = 90.0) -> list[tuple[int, dict]]:
        """(status, JSON body) of /ping every 50 ms (connection refused not counted) until
        it is 200; AssertionError with the log when the process exits or time is up."""
        seen: list[tuple[int, dict]] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"server exited {self.process.returncode}:\n{self.log()}")
            try:
                response = self.client.get("/ping", timeout=5)
            except httpx.TransportError:
                response = None
            if response is not None:
                seen.append((response.status_code, response.json()))
                if response.status_code == 200:
                    return seen
            time.sleep(0.05)
        raise AssertionError(f"/ping not 200 within {timeout} s (saw {seen[-3:]}):\n"
                             f"{self.log()}")

    def invoke(self, body, **kwargs) -> httpx.Response:
        """POST /invocations: a dict or list as JSON; bytes, str or an iterator of bytes
        (sent chunked) as the raw body."""
        if not isinstance(body, (dict, list)):
            return self.client.post("/invocations", content=body, **kwargs)
        return self.client.post("/invocations", json=body, **kwargs)

    def terminate(self) -> None:
        self.process.send_signal(signal.SIGTERM)

    def wait(self, timeout: float = 60.0) -> int:
        return self.process.wait(timeout=timeout)

    def close(self) -> None:
        self.client.close()
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)
        self.log_path.unlink(missing_ok=True)

    def __enter__(self) -> ServeProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
