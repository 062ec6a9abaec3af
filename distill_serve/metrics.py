"""Prometheus metrics of one server (`GET /metrics`), in a registry of its own.

    distill_serve_requests_total{code}            POST /invocations answered, by HTTP status
    distill_serve_prompt_tokens_total             prompt tokens of the requests generated
    distill_serve_generated_tokens_total          tokens generated (rate() of it = tokens/s)
    distill_serve_generation_tokens_per_second    tokens/s of the last batch (new tokens of
                                                  the batch / its generate time)
    distill_serve_request_latency_seconds         histogram: arrival to response, answered
                                                  requests (200)
    distill_serve_batch_size                      histogram: requests per generate call
    distill_serve_queue_depth                     requests waiting for the model now
    distill_serve_requests_in_progress            requests queued or being generated now
    distill_serve_model_loaded                    1 once the model answers, else 0

A registry per server (not prometheus_client's global one) lets one process, a test's, build
several apps.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

PREFIX = "distill_serve"
CONTENT_TYPE = CONTENT_TYPE_LATEST
# Seconds: a tiny model answers in milliseconds, a 1B model on a CPU in tens of seconds.
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class ServeMetrics:
    """The server's counters, gauges and histograms; `render()` is the /metrics body."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(f"{PREFIX}_requests", "POST /invocations answered, by HTTP "
                                "status code.", ["code"], registry=r)
        self.prompt_tokens = Counter(f"{PREFIX}_prompt_tokens", "Prompt tokens of the "
                                     "requests generated.", registry=r)
        self.generated_tokens = Counter(f"{PREFIX}_generated_tokens", "Tokens generated.",
                                        registry=r)
        self.tokens_per_second = Gauge(f"{PREFIX}_generation_tokens_per_second",
                                       "Tokens generated per second by the last batch.",
                                       registry=r)
        self.latency = Histogram(f"{PREFIX}_request_latency_seconds", "Arrival to response "
                                 "of answered requests.", buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram(f"{PREFIX}_batch_size", "Requests per generate call.",
                                    buckets=BATCH_BUCKETS, registry=r)
        self.queue_depth = Gauge(f"{PREFIX}_queue_depth", "Requests waiting for the model.",
                                 registry=r)
        self.in_progress = Gauge(f"{PREFIX}_requests_in_progress", "Requests queued or "
                                 "being generated.", registry=r)
        self.model_loaded = Gauge(f"{PREFIX}_model_loaded", "1 once the model is loaded.",
                                  registry=r)

    def record_batch(self, size: int, prompt_tokens: int, new_tokens: int,
                     seconds: float) -> None:
        """One generate call of `size` requests that made `new_tokens` in `seconds`."""
        self.batch_size.observe(size)
        self.prompt_tokens.inc(prompt_tokens)
        self.generated_tokens.inc(new_tokens)
        if seconds > 0:
            self.tokens_per_second.set(new_tokens / seconds)

    def record_response(self, code: int, seconds: float | None) -> None:
        """One answered request: its status, and its latency when it was generated."""
        self.requests.labels(code=str(code)).inc()
        if seconds is not None:
            self.latency.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
