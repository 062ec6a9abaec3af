"""The serving half of bench/serve_bench.py: a real `distill-serve` process on a free loopback
port (logitstore.toolkit.local_server), driven by concurrent HTTP clients (httpx, asyncio).

A load phase at concurrency c sends `requests` POST /invocations (greedy, `max_new_tokens`
each), c at a time: c client coroutines take the next prompt as soon as their previous answer
arrives. Per phase: every request's latency (send to full answer), the completion tokens, the
batch sizes the server reports, and the throughput = completion tokens / phase wall time.
The server's peak RSS is the kernel's high-water mark of its resident set (VmHWM in
/proc/PID/status: exact, no sampling), read before it is stopped with SIGTERM.
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

import httpx

from logitstore.toolkit.local_server import LocalServer, free_port

ROOT = Path(__file__).resolve().parent.parent
READY_TIMEOUT_S = 300.0
STOP_TIMEOUT_S = 120.0


def serve_process(model: str, *, max_batch: int, threads: int | None,
                  max_new_tokens: int) -> tuple[LocalServer, str]:
    """(server, its URL): `python -m distill_serve MODEL --port P ...` on a free loopback
    port, started by entering it as a context manager (killed on exit if still running)."""
    port = free_port()
    args = [sys.executable, "-m", "distill_serve", model, "--port", str(port),
            "--max-batch", str(max_batch), "--max-new-tokens", str(max_new_tokens)]
    if threads:
        args += ["--threads", str(threads)]
    server = LocalServer(args, health_url=f"http://127.0.0.1:{port}/ping", cwd=ROOT,
                         env={"TQDM_DISABLE": "1"}, name="distill-serve")
    return server, f"http://127.0.0.1:{port}"


def peak_rss_bytes(pid: int) -> int | None:
    """The process's peak resident set so far (VmHWM), None when it cannot be read."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return None


async def _phase(url: str, prompts: list[str], concurrency: int, requests: int,
                 max_new_tokens: int) -> dict:
    queue = list(range(requests))
    records: list[dict] = []
    limits = httpx.Limits(max_connections=concurrency + 2, max_keepalive_connections=concurrency)

    async def client_loop(client: httpx.AsyncClient) -> None:
        while queue:
            index = queue.pop(0)
            body = {"prompt": prompts[index % len(prompts)], "max_new_tokens": max_new_tokens}
            sent = time.perf_counter()
            response = await client.post("/invocations", json=body)
            latency = time.perf_counter() - sent
            if response.status_code != 200:
                raise RuntimeError(f"POST /invocations answered {response.status_code}: "
                                   f"{response.text[:300]}")
            answer = response.json()
            records.append({"latency_s": latency, "tokens": answer["completion_tokens"],
                            "batch_size": answer["batch_size"]})

    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        started = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
        wall = time.perf_counter() - started
    tokens = sum(r["tokens"] for r in records)
    return {"concurrency": concurrency, "requests": len(records), "wall_s": wall,
            "completion_tokens": tokens, "throughput_tokens_per_s": tokens / wall,
            "latencies_s": [r["latency_s"] for r in records],
            "mean_batch_size": sum(r["batch_size"] for r in records) / len(records)}


def run_phase(url: str, prompts: list[str], concurrency: int, requests: int,
              max_new_tokens: int) -> dict:
    """One load phase (module docstring) against a ready server."""
    return asyncio.run(_phase(url, prompts, concurrency, requests, max_new_tokens))


def measure_server(model: str, prompts: list[str], *, concurrencies: list[int], repeats: int,
                   requests_per_client: int, max_new_tokens: int, max_batch: int,
                   threads: int | None) -> dict:
    """Start the server, warm it up, then `repeats` rounds of one phase per concurrency (in
    order within a round, so the concurrencies of a round are paired); SIGTERM at the end."""
    server, url = serve_process(model, max_batch=max_batch, threads=threads,
                                max_new_tokens=max_new_tokens)
    with server:
        ready_s = server.wait_ready(READY_TIMEOUT_S)
        # Warm-up: the first calls at each batch shape pay for allocations and kernel choice.
        run_phase(url, prompts, max(concurrencies), max(concurrencies), max_new_tokens)
        run_phase(url, prompts, 1, 1, max_new_tokens)
        rounds = []
        for _ in range(repeats):
            rounds.append({str(c): run_phase(url, prompts, c,
                                             max(c * requests_per_client, 2), max_new_tokens)
                           for c in concurrencies})
        peak = peak_rss_bytes(server.process.pid)
        code = server.stop(STOP_TIMEOUT_S)
    if code != 0:
        raise RuntimeError(f"distill-serve exited {code} after SIGTERM (expected 0)")
    return {"ready_s": ready_s, "peak_rss_bytes": peak, "exit_code": code, "rounds": rounds}
