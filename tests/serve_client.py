"""A real `distill-serve` process on a free loopback port, for tests (tests/test_serve.py).

    with ServeProcess.start(model_dir, "--max-batch", "8") as server:
        server.ping_statuses()
        server.client.post("/invocations", json={"prompt": "..."})

The process runs `python -m distill_serve` from the checkout through
logitstore.toolkit.local_server.LocalServer: its log goes to a temporary file, every wait is
bounded, and the process is killed on exit from the `with` block whatever happened.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import httpx

from logitstore.toolkit.local_server import LocalServer, free_port

ROOT = Path(__file__).resolve().parent.parent


class ServeProcess:
    """A started LocalServer (`.server`) plus an httpx client on its URL (`.client`)."""

    def __init__(self, server: LocalServer, port: int):
        self.server = server
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.client = httpx.Client(base_url=self.url, timeout=60)

    @classmethod
    def start(cls, model: str | Path, *args: str, env: dict[str, str] | None = None,
              serve_entry: bool = False) -> ServeProcess:
        """`python -m distill_serve MODEL --port P ARGS`, or with `serve_entry` the container
        entry point `serve ARGS` given the model and the port through its environment."""
        port = free_port()
        env = {"TQDM_DISABLE": "1", **(env or {})}
        if serve_entry:
            command = ["-c", "from distill_serve.cli import serve_main; serve_main()", *args]
            env.update(MODEL_DIR=str(model), SAGEMAKER_BIND_TO_PORT=str(port),
                       DISTILL_SERVE_HOST="127.0.0.1")
        else:
            command = ["-m", "distill_serve", str(model), "--port", str(port), *args]
        server = LocalServer([sys.executable, *command],
                             health_url=f"http://127.0.0.1:{port}/ping", env=env, cwd=ROOT,
                             name="distill-serve")
        return cls(server.start(), port)

    def log(self) -> str:
        """Everything the server wrote so far."""
        return self.server.log_tail(chars=10**8)

    def ping_statuses(self, timeout: float = 90.0) -> list[tuple[int, dict]]:
        """(status, JSON body) of /ping every 50 ms (connection refused not counted) until
        it is 200; LocalServerError with the log's tail when the process exits or time is up."""
        seen: list[tuple[int, dict]] = []
        self.server.wait_ready(timeout, interval_s=0.05, on_answer=lambda status, body:
                               seen.append((status, json.loads(body))))
        return seen

    def invoke(self, body, **kwargs) -> httpx.Response:
        """POST /invocations: a dict or list as JSON; bytes, str or an iterator of bytes
        (sent chunked) as the raw body."""
        if not isinstance(body, (dict, list)):
            return self.client.post("/invocations", content=body, **kwargs)
        return self.client.post("/invocations", json=body, **kwargs)

    def terminate(self) -> None:
        self.server.terminate()

    def wait(self, timeout: float = 60.0) -> int:
        return self.server.wait(timeout)

    def close(self) -> None:
        try:
            self.client.close()
        finally:
            self.server.close()

    def __enter__(self) -> ServeProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
