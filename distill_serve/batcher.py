"""Dynamic batching: concurrent requests share one `generate` call, on one model thread.

Requests are queued (an asyncio.Queue, on the server's event loop). One collector task takes
the first waiting request, then keeps taking arrivals until `max_batch`, until no request has
arrived for `wait_s`, or until MAX_WAIT_GAPS x `wait_s` after the first, and runs `model.generate(prompts, per-request settings)` on the single worker thread: PyTorch and
onnxruntime sessions are not meant to be driven from several threads at once, and one batch at
a time is what makes batching pay. While a batch runs, new requests queue up and form the next
one. Each request's future gets its own Generation plus the batch's size and timings. A
greedy request gets the tokens it would get alone (left padding, position ids from the mask)
on every backend but ONNX INT8, whose per-tensor activation scales let batch mates move its
logits slightly (logitstore.toolkit.inference, InferenceModel.generate). A batch's rows all
wait for its longest generation: there is no continuous batching.

The model is loaded on the same worker thread (`run_in_worker`), so every call into the model
comes from one thread.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

from distill_serve.metrics import ServeMetrics

log = logging.getLogger(__name__)

# A batch closes after a quiet gap of wait_s, not a fixed wait_s after its first request:
# clients answered together resubmit together, but their requests reach the server spread over
# a few milliseconds (the event loop is sending the previous batch's answers meanwhile), and a
# fixed window cut such a burst into a big batch and a small one that costs nearly as much.
# The cap keeps a steady trickle of requests from holding a batch open indefinitely.
MAX_WAIT_GAPS = 8


class ServerClosing(RuntimeError):
    """A request that was still queued when the batcher was stopped."""


@dataclass(frozen=True)
class JobResult:
    generation: Any  # logitstore.toolkit.inference.Generation
    batch_size: int  # requests in the generate call, this one included
    queue_s: float  # from submit to the start of its batch
    generate_s: float  # the batch's generate call


@dataclass
class _Job:
    prompt_ids: list[int]
    settings: Any  # GenerationSettings
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)


class Batcher:
    """Queue + collector task + one worker thread; see the module docstring."""

    def __init__(self, *, max_batch: int, wait_s: float, metrics: ServeMetrics):
        self.max_batch = max_batch
        self.wait_s = wait_s
        self.metrics = metrics
        self.model = None
        self._queue: asyncio.Queue[_Job] = asyncio.Queue()
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model-worker")
        self._collector: asyncio.Task | None = None
        self._running = 0  # requests in the generate call now

    async def run_in_worker(self, function: Callable[..., Any], *args: Any) -> Any:
        """`function(*args)` on the model thread (loading, closing)."""
        return await asyncio.get_running_loop().run_in_executor(self._worker, function, *args)

    def start(self, model) -> None:
        """Serve `model` (an InferenceModel): queued requests start being generated."""
        self.model = model
        self._collector = asyncio.create_task(self._serve_forever(), name="batch-collector")

    @property
    def pending(self) -> int:
        """Requests queued or being generated."""
        return self._queue.qsize() + self._running

    async def submit(self, prompt_ids: list[int], settings) -> JobResult:
        """Queue one request; its result once its batch is generated. Raises what generate
        raised, or ServerClosing when the batcher stops before it ran."""
        job = _Job(prompt_ids, settings, asyncio.get_running_loop().create_future())
        self._queue.put_nowait(job)
        self.metrics.queue_depth.set(self._queue.qsize())
        self.metrics.in_progress.inc()
        try:
            return await job.future
        finally:
            self.metrics.in_progress.dec()

    async def _serve_forever(self) -> None:
        while True:
            batch = await self._collect()
            self._running = len(batch)
            try:
                await self._generate(batch)
            finally:
                self._running = 0

    async def _collect(self) -> list[_Job]:
        """The first queued request and those that follow it (see the module docstring)."""
        loop = asyncio.get_running_loop()
        batch = [await self._queue.get()]
        closes = loop.time() + MAX_WAIT_GAPS * self.wait_s
        while len(batch) < self.max_batch:
            if not self._queue.empty():
                batch.append(self._queue.get_nowait())
                continue
            remaining = min(self.wait_s, closes - loop.time())
            if remaining <= 0:
                break
            try:
                async with asyncio.timeout(remaining):
                    batch.append(await self._queue.get())
            except TimeoutError:
                break
        self.metrics.queue_depth.set(self._queue.qsize())
        return batch

    async def _generate(self, batch: list[_Job]) -> None:
        started = time.perf_counter()
        try:
            generations = await self.run_in_worker(
                self.model.generate, [job.prompt_ids for job in batch],
                [job.settings for job in batch])
        except Exception as exc:  # every request of the batch gets the failure (500)
            log.exception("generate failed for a batch of %d request(s)", len(batch))
            for job in batch:
                _resolve(job.future, exception=exc)
            return
        seconds = time.perf_counter() - started
        self.metrics.record_batch(len(batch), sum(len(j.prompt_ids) for j in batch),
                                  sum(len(g.token_ids) for g in generations), seconds)
        for job, generation in zip(batch, generations):
            _resolve(job.future, JobResult(generation, len(batch), started - job.enqueued,
                                           seconds))

    async def stop(self) -> None:
        """Finish what is queued and running, then stop the collector and the worker thread.

        uvicorn calls this (through the lifespan) after the in-flight HTTP requests were
        answered, so normally nothing is left; a request still queued gets ServerClosing.
        """
        while self._collector is not None and self.pending and not self._collector.done():
            await asyncio.sleep(0.01)
        if self._collector is not None:
            self._collector.cancel()
        while not self._queue.empty():
            _resolve(self._queue.get_nowait().future, exception=ServerClosing(
                "the server is shutting down; send the request again to another replica"))
        self.metrics.queue_depth.set(0)
        self._worker.shutdown(wait=False, cancel_futures=True)


def _resolve(future: asyncio.Future, result: Any = None, *,
             exception: BaseException | None = None) -> None:
    """Set a request's outcome unless it is already settled (its handler was cancelled)."""
    if future.done():
        return
    if exception is not None:
        future.set_exception(exception)
    else:
        future.set_result(result)
