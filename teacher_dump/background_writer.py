"""The writer thread: compression and I/O of captured batches off the main thread, so the
accelerator never waits for them; its errors are re-raised in the main thread."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from logitstore.sample import Sample


class BackgroundWriter:
    """Feeds a StoreWriter from a bounded queue in a thread; `put` re-raises its errors."""

    _CLOSE = object()  # flush, mark the part complete
    _ABORT = object()  # drop what is buffered; the part stays resumable

    def __init__(self, writer, max_batches: int):
        self.writer = writer
        self.queue: queue.Queue = queue.Queue(maxsize=max_batches)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="store-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            while True:
                item = self.queue.get()
                if item is self._CLOSE:
                    self.writer.close()
                    return
                if item is self._ABORT:
                    self.writer.abort()
                    return
                for sample in item:
                    self.writer.add(sample)
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            self.error = exc
            self.writer.abort()

    def _check(self) -> None:
        if self.error is not None:
            raise self.error

    def put(self, samples: list[Sample]) -> None:
        while True:  # a dead writer never drains the queue: look at it between tries
            self._check()
            try:
                self.queue.put(samples, timeout=0.5)
                return
            except queue.Full:
                continue

    def finish(self) -> None:
        """Flush, close the part (marks it complete) and re-raise any writer error."""
        self.put(self._CLOSE)  # type: ignore[arg-type]
        self.thread.join()
        self._check()

    def abandon(self) -> None:
        """After an error in the main thread: drop the queued batches and stop without
        closing the part, which stays resumable after its last committed segment."""
        if not self.thread.is_alive():
            return
        while True:
            try:
                self.queue.get_nowait()
            except queue.Empty:
                break
        self.queue.put(self._ABORT)  # only this thread puts: there is room now
        self.thread.join()


@contextmanager
def writing_in_background(writer, max_batches: int) -> Iterator[BackgroundWriter]:
    """A BackgroundWriter over `writer` for the body of a `with`: finished (flushed, part
    closed, writer errors re-raised) when the body ends, abandoned when it raises (the part
    stays resumable after its last committed segment)."""
    background = BackgroundWriter(writer, max_batches)
    try:
        yield background
    except BaseException:
        background.abandon()
        raise
    background.finish()
