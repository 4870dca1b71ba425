"""Dynamic batching: requests from many callers gathered into one model execution.

Each model version has one `Batcher`. `submit(images)` enqueues the caller's rows and awaits its
own future; a collector task takes requests until the batch holds `max_batch_size` rows or
`max_queue_delay_ms` has passed since the first one arrived, drops requests whose deadline has
passed (or whose caller went away), runs the batch on an executor thread (off the event loop) and
hands each caller exactly its own rows. A request is never split, so a request larger than the
batch size runs alone. The queue is bounded: `QueueFull` (RESOURCE_EXHAUSTED) when full.

Pieces of a bulk request (a raw-inference request split into engine-sized pieces, submitted with
`bulk=True`) go into a batch after the ordinary requests waiting with them, unless the oldest has
waited BULK_MAX_WAIT: a caller behind someone's 200-row request waits for one batch, not for the
whole request, and bulk work still moves while ordinary traffic saturates the engine.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import time
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor

import numpy as np

from serving.errors import DeadlineExceeded, QueueFull, ShuttingDown
from serving.metrics import Metrics

log = logging.getLogger(__name__)

RunFn = Callable[[np.ndarray], dict[str, np.ndarray]]
BULK_MAX_WAIT = 1.0  # seconds a bulk piece may be passed over by ordinary requests


@dataclasses.dataclass
class BatchResult:
    outputs: dict[str, np.ndarray]  # this caller's rows only
    queue_ms: float
    compute_ms: float
    batch_rows: int  # rows in the executed batch (all callers)


@dataclasses.dataclass
class _Pending:
    images: np.ndarray
    deadline: float | None
    future: asyncio.Future
    enqueued: float
    bulk: bool = False


class Batcher:
    """Gathers requests for one model into batches and runs them with `run`."""

    def __init__(
        self,
        run: RunFn,
        max_batch_size: int = 32,
        max_queue_delay_ms: float = 2.0,
        max_queue_size: int = 1024,
        max_inflight: int = 1,
        executor: Executor | None = None,
        metrics: Metrics | None = None,
        labels: tuple[str, str] = ("", ""),
    ):
        self.run = run
        self.max_batch_size = max_batch_size
        self.max_queue_delay = max_queue_delay_ms / 1e3
        self.max_queue_size = max_queue_size
        self.metrics = metrics
        self.labels = labels
        self._own_executor = executor is None
        self._executor = executor or ThreadPoolExecutor(max_inflight, thread_name_prefix=f"infer-{labels[0]}")
        self._slots = asyncio.Semaphore(max_inflight)
        self._queue: collections.deque[_Pending] = collections.deque()
        self._wakeup = asyncio.Event()
        self._inflight: set[asyncio.Task] = set()
        self._closed = False
        self._task = asyncio.get_running_loop().create_task(self._collect(), name=f"batcher-{labels[0]}-{labels[1]}")
        self._task.add_done_callback(self._collector_ended)

    @property
    def pending(self) -> int:
        return len(self._queue)

    def submit(self, images: np.ndarray, deadline: float | None = None, bulk: bool = False) -> asyncio.Future:
        """Enqueue uint8 [n,3,H,W]; the returned future resolves to this caller's `BatchResult`.

        Enqueuing happens now (not at the first await), so callers can rely on their request being
        in the queue once `submit` returns.
        """
        if self._closed:
            raise ShuttingDown("model is unloading")
        if len(self._queue) >= self.max_queue_size:
            raise QueueFull(f"model {self.labels[0]} v{self.labels[1]}: queue is full ({self.max_queue_size} requests)")
        future = asyncio.get_running_loop().create_future()
        self._queue.append(_Pending(images, deadline, future, time.perf_counter(), bulk))
        self._gauge()
        self._wakeup.set()
        return future

    async def close(self) -> None:
        """Finish every queued and running batch, then stop."""
        self._closed = True
        self._wakeup.set()
        await self._task
        if self._inflight:
            await asyncio.gather(*self._inflight, return_exceptions=True)
        if self._own_executor:
            self._executor.shutdown(wait=False)

    # ---- internals -----------------------------------------------------------------------
    def _collector_ended(self, task: asyncio.Task) -> None:
        """If the collector ever dies, no caller may wait forever: fail the queue and refuse more."""
        if task.cancelled() or task.exception() is None:
            return
        log.error("batcher for %s v%s stopped", *self.labels, exc_info=task.exception())
        self._closed = True
        while self._queue:
            pending = self._queue.popleft()
            if not pending.future.done():
                pending.future.set_exception(ShuttingDown(f"model {self.labels[0]} v{self.labels[1]}: batcher stopped"))

    def _gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.labels(*self.labels).set(len(self._queue))

    async def _collect(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                if self._closed:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            await self._slots.acquire()  # wait for a free execution slot; the queue keeps filling
            first = self._queue[0].enqueued
            while self._rows_queued() < self.max_batch_size and not self._closed:
                remaining = first + self.max_queue_delay - time.perf_counter()
                if remaining <= 0:
                    break
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), remaining)
                except TimeoutError:
                    break
            batch = self._take()
            self._gauge()
            if not batch:
                self._slots.release()
                continue
            task = loop.create_task(self._execute(batch))
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)

    def _rows_queued(self) -> int:
        rows = 0
        for pending in self._queue:
            rows += len(pending.images)
            if rows >= self.max_batch_size:
                break
        return rows

    def _take(self) -> list[_Pending]:
        """Pop requests for one batch, failing the expired and skipping the abandoned; ordinary
        requests first, then bulk pieces (first of all a bulk piece that waited BULK_MAX_WAIT)."""
        now = time.monotonic()
        live: list[_Pending] = []
        for pending in self._queue:
            if pending.future.done():  # the caller was cancelled
                continue
            if pending.deadline is not None and pending.deadline <= now:
                pending.future.set_exception(DeadlineExceeded("deadline passed while queued; not computed"))
                continue
            live.append(pending)
        overdue = time.perf_counter() - BULK_MAX_WAIT
        order = sorted(range(len(live)), key=lambda i: (live[i].bulk and live[i].enqueued > overdue, i))
        batch: list[_Pending] = []
        taken: set[int] = set()
        rows = 0
        for i in order:
            size = len(live[i].images)
            if batch and rows + size > self.max_batch_size:
                break
            batch.append(live[i])
            taken.add(i)
            rows += size
        self._queue = collections.deque(pending for i, pending in enumerate(live) if i not in taken)
        return batch

    async def _execute(self, batch: list[_Pending]) -> None:
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        try:
            images = batch[0].images if len(batch) == 1 else np.concatenate([p.images for p in batch])
            outputs = await loop.run_in_executor(self._executor, self.run, images)
        except Exception as error:  # noqa: BLE001 - every caller of the batch gets the error
            log.exception("batch of %d failed for %s v%s", len(batch), *self.labels)
            for pending in batch:
                if not pending.future.done():
                    pending.future.set_exception(error)
            return
        finally:
            self._slots.release()
        finished = time.perf_counter()
        compute = finished - started
        rows = sum(len(p.images) for p in batch)
        if self.metrics is not None:
            self.metrics.batch_done(*self.labels, rows, compute)
        offset = 0
        for pending in batch:
            size = len(pending.images)
            mine = {name: value[offset : offset + size] for name, value in outputs.items()}
            offset += size
            queued = started - pending.enqueued
            if self.metrics is not None:
                self.metrics.queue_duration.labels(*self.labels).observe(queued)
            if not pending.future.done():
                pending.future.set_result(BatchResult(mine, queued * 1e3, compute * 1e3, rows))
