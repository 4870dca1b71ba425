"""Dynamic batching: gathering, row ownership, bounded queue, deadlines, failures, draining."""

import asyncio
import threading
import time

import numpy as np
import pytest

from serving.batcher import Batcher
from serving.errors import DeadlineExceeded, QueueFull, ShuttingDown


class Recorder:
    """A fake engine: output row i is a function of input row i; records batch sizes."""

    def __init__(self, delay: float = 0.0, fail: bool = False):
        self.batches: list[int] = []
        self.delay = delay
        self.fail = fail
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        self.gate.wait(10)
        self.batches.append(len(images))
        if self.delay:
            time.sleep(self.delay)
        if self.fail:
            raise RuntimeError("engine exploded")
        flat = images.reshape(len(images), -1).astype(np.float32)
        return {"score": flat.sum(axis=1), "first": flat[:, 0].copy()}


def rows(value: int, count: int = 1) -> np.ndarray:
    return np.full((count, 3, 2, 2), value, np.uint8)


def test_concurrent_requests_share_batches_and_get_their_own_rows():
    engine = Recorder()

    async def main():
        batcher = Batcher(engine, max_batch_size=8, max_queue_delay_ms=20)
        futures = [batcher.submit(rows(i, count=1 + i % 3)) for i in range(20)]
        results = await asyncio.gather(*futures)
        await batcher.close()
        return results

    results = asyncio.run(main())
    for i, result in enumerate(results):
        count = 1 + i % 3
        assert result.outputs["first"].tolist() == [float(i)] * count  # exactly this caller's rows
        assert result.outputs["score"].shape == (count,)
        assert result.batch_rows <= 8
    assert sum(engine.batches) == sum(1 + i % 3 for i in range(20))
    assert max(engine.batches) > 3 and len(engine.batches) < 20  # batching happened
    assert all(size <= 8 for size in engine.batches)


def test_a_lone_request_waits_at_most_the_queue_delay():
    async def main():
        batcher = Batcher(Recorder(), max_batch_size=64, max_queue_delay_ms=30)
        started = time.perf_counter()
        result = await batcher.submit(rows(1))
        elapsed = time.perf_counter() - started
        await batcher.close()
        return result, elapsed

    result, elapsed = asyncio.run(main())
    assert 0.025 <= elapsed < 0.5 and result.queue_ms >= 25


def test_request_larger_than_the_batch_runs_alone():
    engine = Recorder()

    async def main():
        batcher = Batcher(engine, max_batch_size=4, max_queue_delay_ms=1)
        big, small = batcher.submit(rows(7, 10)), batcher.submit(rows(3, 2))
        results = await asyncio.gather(big, small)
        await batcher.close()
        return results

    big, small = asyncio.run(main())
    assert big.outputs["first"].tolist() == [7.0] * 10 and small.outputs["first"].tolist() == [3.0] * 2
    assert sorted(engine.batches) == [2, 10]


def test_full_queue_is_refused_and_expired_requests_are_not_computed():
    engine = Recorder()
    engine.gate.clear()  # hold the engine so the queue fills

    async def main():
        batcher = Batcher(engine, max_batch_size=2, max_queue_delay_ms=0, max_queue_size=3)
        running = batcher.submit(rows(1, 2))  # taken into the (blocked) engine
        await asyncio.sleep(0.05)
        expired = batcher.submit(rows(2), deadline=time.monotonic() + 0.01)
        kept = [batcher.submit(rows(3)), batcher.submit(rows(4))]
        with pytest.raises(QueueFull, match="queue is full"):
            batcher.submit(rows(5))
        await asyncio.sleep(0.05)  # the deadline passes while queued
        engine.gate.set()
        with pytest.raises(DeadlineExceeded):
            await expired
        results = await asyncio.gather(running, *kept)
        await batcher.close()
        return results

    results = asyncio.run(main())
    assert [r.outputs["first"][0] for r in results] == [1.0, 3.0, 4.0]
    assert engine.batches == [2, 2]  # the expired request never reached the engine


def test_engine_failure_reaches_every_caller_of_that_batch_only():
    async def main():
        failing = Batcher(Recorder(fail=True), max_batch_size=4, max_queue_delay_ms=5)
        results = await asyncio.gather(failing.submit(rows(1)), failing.submit(rows(2)), return_exceptions=True)
        await failing.close()
        return results

    results = asyncio.run(main())
    assert all(isinstance(r, RuntimeError) and "exploded" in str(r) for r in results)


def test_close_drains_queued_work_then_refuses():
    engine = Recorder(delay=0.02)

    async def main():
        batcher = Batcher(engine, max_batch_size=2, max_queue_delay_ms=1)
        futures = [batcher.submit(rows(i)) for i in range(6)]
        await batcher.close()
        assert all(f.done() and not f.exception() for f in futures)
        with pytest.raises(ShuttingDown):
            batcher.submit(rows(9))

    asyncio.run(main())
    assert sum(engine.batches) == 6
