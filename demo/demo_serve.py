"""The demo's last stage, serving half: the INT8 ONNX export behind a real `distill-serve`
process on a free loopback port, asked one question over HTTP, then stopped with SIGTERM.

The server runs as its own process (its console script, else `python -m distill_serve`) with
its log in OUT/logs/serve.log, through logitstore.toolkit.local_server.LocalServer: every
wait is bounded and the process is killed if anything goes wrong, so the demo never leaves a
server behind. OUT/serve/answer.json keeps the request, the response and the server's exit
status.
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Any

from demo_context import REPO, Context, DemoError

from logitstore.toolkit.local_server import LocalServer, LocalServerError, free_port

READY_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 60.0
MAX_NEW_TOKENS = 32


def demo_question(corpus: Path) -> str:
    """The first knowledge-base question, in the form distill-eval asks it."""
    first = (corpus / "medmcq_kb.jsonl").read_text(encoding="utf-8").splitlines()[0]
    return f"Question: {json.loads(first)['question']}\nAnswer:"


def _serve_command() -> list[str]:
    script = Path(sys.executable).parent / "distill-serve"
    return [str(script)] if script.exists() else [sys.executable, "-m", "distill_serve"]


def serve_one_answer(ctx: Context, export_dir: Path, prompt: str) -> dict[str, Any]:
    """Start distill-serve on the export, POST one /invocations, SIGTERM it; the record
    written to OUT/serve/answer.json. DemoError (naming the log) when any step fails."""
    import httpx

    port = free_port()
    argv = [str(export_dir), "--host", "127.0.0.1", "--port", str(port), "--max-batch", "4"]
    body = {"prompt": prompt, "max_new_tokens": MAX_NEW_TOKENS}
    shown = ctx.runner.shown("distill-serve", argv)
    print(f"    $ {shown} &", flush=True)
    # commands.sh runs its lines in order: the server goes to the background, is asked once
    # and stopped, as here.
    ctx.runner.commands += [
        ctx.runner.shell("distill-serve", argv) + " & SERVER=$!",
        f"until curl -sf http://127.0.0.1:{port}/ping >/dev/null; do sleep 1; done",
        f"curl -s http://127.0.0.1:{port}/invocations -H 'Content-Type: application/json' "
        f"-d {shlex.quote(json.dumps(body))}", "kill -TERM $SERVER; wait $SERVER"]
    log = ctx.out / "logs" / "serve.log"
    url = f"http://127.0.0.1:{port}"
    with LocalServer(_serve_command() + argv, health_url=f"{url}/ping", cwd=REPO,
                     env={"TQDM_DISABLE": "1"}, log_path=log, name="distill-serve") as server:
        try:
            ready = server.wait_ready(READY_TIMEOUT_S, interval_s=0.2)
            response = httpx.post(f"{url}/invocations", json=body, timeout=120)
            if response.status_code != 200:
                raise DemoError(f"stage serve: POST /invocations answered "
                                f"{response.status_code}: {response.text[:300]}; log: {log}")
            code = server.stop(STOP_TIMEOUT_S)
        except LocalServerError as exc:
            raise DemoError(f"stage serve: {exc}") from None
    if code != 0:
        raise DemoError(f"stage serve: distill-serve exited {code} after SIGTERM (expected 0 "
                        f"once drained); log: {log}")
    return {"command": shown, "ready_seconds": ready, "request": body,
            "response": response.json(), "exit_code": code}
