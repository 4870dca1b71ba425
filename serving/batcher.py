"""Dynamic batching: requests from many callers gathered into one model execution.

Each model version has one `Batcher`. `submit(images)` enqueues the caller's rows and awaits its
own future; a collector task takes requests until the batch holds `max_batch_size` rows or
`max_queue_delay_ms` has passed since the first one arrived, drops requests whose deadline has
passed (or whose caller went away), runs the batch on an executor thread (off the event loop) and
hands each caller exactly its own rows. A request is never split, so a request larger than the
batch size runs alone. The queue is bounded: `QueueFull` (RESOURCE_EXHAUSTED) when full.

Pieces of a bulk request (a raw-inference request split into engine-sized pieces, submitted with
`bulk=True`) never share a batch with ordinary requests. With a `bulk_run` engine (the server gives
one to ONNX Runtime on CPU: a second session of one intra-op thread) they run in a lane of their
own, one batch at a time on a low-priority thread (serving.workers), beside the ordinary batches:
an ordinary caller neither queues behind them nor loses the CPU to them. Without one they take the
engine only when no ordinary request waits, unless the oldest waited BULK_MAX_WAIT: a caller behind
someone's 200-row request waits for one small piece, not the whole request, and bulk work still
moves while ordinary traffic saturates the engine.
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
from serving.workers import low_priority_pool

log = logging.getLogger(__name__)

RunFn = Callable[[np.ndarray], dict[str, np.ndarray]]
BULK_MAX_WAIT = 1.0  # seconds a bulk piece may be passed over by ordinary requests
BULK_PIECE_DIVISOR = 8  # a raw request over max_batch_size rows runs in pieces of max_batch_size / 8 rows


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
        bulk_run: RunFn | None = None,
    ):
        self.run = run
        self.bulk_run = bulk_run
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
        self._last_bulk = False  # the last batch taken from the ordinary queue held bulk pieces
        loop = asyncio.get_running_loop()
        self._task = loop.create_task(self._collect(), name=f"batcher-{labels[0]}-{labels[1]}")
        self._task.add_done_callback(self._collector_ended)
        self._bulk_queue: collections.deque[_Pending] = collections.deque()
        self._bulk_wakeup = asyncio.Event()
        self._bulk_task = self._bulk_executor = None
        if bulk_run is not None:
            self._bulk_executor = low_priority_pool(1, f"bulk-{labels[0]}")
            self._bulk_task = loop.create_task(self._collect_bulk(), name=f"batcher-bulk-{labels[0]}-{labels[1]}")
            self._bulk_task.add_done_callback(self._collector_ended)

    @property
    def bulk_rows(self) -> int:
        """Rows of one bulk piece, and of one batch of the bulk lane."""
        return max(1, self.max_batch_size // BULK_PIECE_DIVISOR)

    @property
    def pending(self) -> int:
        return len(self._queue) + len(self._bulk_queue)

    def submit(self, images: np.ndarray, deadline: float | None = None, bulk: bool = False) -> asyncio.Future:
        """Enqueue uint8 [n,3,H,W]; the returned future resolves to this caller's `BatchResult`.

        Enqueuing happens now (not at the first await), so callers can rely on their request being
        in the queue once `submit` returns.
        """
        if self._closed:
            raise ShuttingDown("model is unloading")
        if self.pending >= self.max_queue_size:
            raise QueueFull(f"model {self.labels[0]} v{self.labels[1]}: queue is full ({self.max_queue_size} requests)")
        future = asyncio.get_running_loop().create_future()
        pending = _Pending(images, deadline, future, time.perf_counter(), bulk)
        if bulk and self.bulk_run is not None:
            self._bulk_queue.append(pending)
            self._bulk_wakeup.set()
        else:
            self._queue.append(pending)
            self._wakeup.set()
        self._gauge()
        return future

    async def close(self) -> None:
        """Finish every queued and running batch, then stop."""
        self._closed = True
        self._wakeup.set()
        self._bulk_wakeup.set()
        await self._task
        if self._bulk_task is not None:
            await self._bulk_task
        if self._inflight:
            await asyncio.gather(*self._inflight, return_exceptions=True)
        if self._own_executor:
            self._executor.shutdown(wait=False)
        if self._bulk_executor is not None:
            self._bulk_executor.shutdown(wait=False)

    # ---- internals -----------------------------------------------------------------------
    def _collector_ended(self, task: asyncio.Task) -> None:
        """If the collector ever dies, no caller may wait forever: fail the queue and refuse more."""
        if task.cancelled() or task.exception() is None:
            return
        log.error("batcher for %s v%s stopped", *self.labels, exc_info=task.exception())
        self._closed = True
        for queue in (self._queue, self._bulk_queue):
            while queue:
                pending = queue.popleft()
                if not pending.future.done():
                    pending.future.set_exception(ShuttingDown(f"model {self.labels[0]} v{self.labels[1]}: batcher stopped"))

    def _gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.labels(*self.labels).set(self.pending)

    async def _collect(self) -> None:
        loop = asyncio.get_running_loop()
        while await self._work_waiting(lambda: self._queue, self._wakeup):
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
            batch, self._queue = take(self._queue, self.max_batch_size, self.bulk_rows, self._last_bulk)
            self._last_bulk = bool(batch) and batch[0].bulk
            self._gauge()
            if not batch:
                self._slots.release()
                continue
            task = loop.create_task(self._execute(batch, self.run, self._executor, self._slots))
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)

    async def _collect_bulk(self) -> None:
        """The bulk lane: pieces waiting now, up to `bulk_rows` (a small batch holds little engine
        memory), one batch at a time."""
        while await self._work_waiting(lambda: self._bulk_queue, self._bulk_wakeup):
            batch, self._bulk_queue = take(self._bulk_queue, self.bulk_rows, self.bulk_rows)
            self._gauge()
            if batch:
                await self._execute(batch, self.bulk_run, self._bulk_executor)

    async def _work_waiting(self, queue, wakeup: asyncio.Event) -> bool:
        """Wait until `queue()` holds work (True), or the batcher is closed with none left (False)."""
        while not queue():
            if self._closed:
                return False
            wakeup.clear()
            await wakeup.wait()
        return True

    def _rows_queued(self) -> int:
        rows = 0
        for pending in self._queue:
            rows += len(pending.images)
            if rows >= self.max_batch_size:
                break
        return rows

    async def _execute(self, batch: list[_Pending], run: RunFn, executor: Executor, slots: asyncio.Semaphore | None = None) -> None:
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        try:
            images = batch[0].images if len(batch) == 1 else np.concatenate([p.images for p in batch])
            outputs = await loop.run_in_executor(executor, run, images)
        except Exception as error:  # noqa: BLE001 - every caller of the batch gets the error
            log.exception("batch of %d failed for %s v%s", len(batch), *self.labels)
            for pending in batch:
                if not pending.future.done():
                    pending.future.set_exception(error)
            return
        finally:
            if slots is not None:
                slots.release()
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


def take(queue: collections.deque[_Pending], max_rows: int, bulk_rows: int, after_bulk: bool = False) -> tuple[list[_Pending], collections.deque[_Pending]]:
    """(one batch, the queue left) from `queue`: the expired fail (DEADLINE_EXCEEDED, never
    computed) and the abandoned are dropped; requests are taken in order up to `max_rows` rows, bulk
    pieces up to `bulk_rows` (a lone larger one runs alone). Bulk pieces never join ordinary
    requests: a bulk piece that waited BULK_MAX_WAIT goes first unless the last batch (`after_bulk`)
    was bulk, else ordinary requests, and bulk pieces only when no ordinary request waits; so an
    ordinary request waits for at most one small batch of pieces."""
    now = time.monotonic()
    live: list[_Pending] = []
    for pending in queue:
        if pending.future.done():  # the caller was cancelled
            continue
        if pending.deadline is not None and pending.deadline <= now:
            pending.future.set_exception(DeadlineExceeded("deadline passed while queued; not computed"))
            continue
        live.append(pending)
    overdue = time.perf_counter() - BULK_MAX_WAIT
    stale = [p for p in live if p.bulk and p.enqueued <= overdue]
    ordinary = [p for p in live if not p.bulk]
    candidates = stale[:1] if stale and ordinary and not after_bulk else ordinary or live
    batch: list[_Pending] = []
    rows = 0
    for pending in candidates:
        size = len(pending.images)
        if batch and (rows + size > (bulk_rows if batch[0].bulk else max_rows) or pending.bulk != batch[0].bulk):
            break
        batch.append(pending)
        rows += size
    taken = {id(p) for p in batch}
    return batch, collections.deque(p for p in live if id(p) not in taken)
