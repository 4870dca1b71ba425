"""Ordinary requests keep the CPU under attack (issue 12): huge images are decoded and drawn on
low-priority threads, and large ModelInfer requests run in a bulk lane of their own, at low
priority, never in a batch with ordinary requests."""

from __future__ import annotations

import asyncio
import io
import os
import sys
import threading
import time

import numpy as np
import pytest
from PIL import Image

from serving.batcher import Batcher
from serving.workers import LOW_PRIORITY_NICE, low_priority_pool, thread_nice
from tests.serving_fixtures import RunningServer, build_model_repository, random_images, reference_outputs

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice values are Linux's")
PROCESS_NICE = os.getpriority(os.PRIO_PROCESS, 0) if hasattr(os, "getpriority") else 0
LOW = max(PROCESS_NICE, LOW_PRIORITY_NICE)  # (a suite run at nice 19 tells the pools apart by thread name)


def where() -> tuple[str, int]:
    """The calling thread's pool (its name without the worker number) and nice value."""
    return threading.current_thread().name.rsplit("_", 1)[0], thread_nice()


@pytest.fixture(scope="module")
def repository(tmp_path_factory):
    return build_model_repository(tmp_path_factory.mktemp("repo"), versions=(1,))


def png(side: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(random_images(1, seed=side)[0].transpose(1, 2, 0)).resize((side, side)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_low_priority_threads_run_at_nice_19_and_leave_the_rest_alone():
    pool = low_priority_pool(2, "test-low")
    try:
        nices = [future.result(10) for future in [pool.submit(lambda: (time.sleep(0.05), thread_nice())[1]) for _ in range(4)]]
    finally:
        pool.shutdown()
    assert nices == [LOW_PRIORITY_NICE] * 4
    assert thread_nice() == PROCESS_NICE  # the caller's thread is untouched
    assert os.getpriority(os.PRIO_PROCESS, 0) == PROCESS_NICE


def test_images_over_the_limit_are_decoded_and_drawn_at_low_priority(repository, monkeypatch):
    import grpc

    from core import heatmaps
    from serving.dataplane import DataPlane
    from serving.proto.cyborg.v1 import detector_pb2 as pb
    from serving.proto.cyborg.v1 import detector_pb2_grpc as pb_grpc

    seen = []
    decode, render = DataPlane._decode, heatmaps.render
    monkeypatch.setattr(DataPlane, "_decode", lambda self, *args: (seen.append(("decode", *where())), decode(self, *args))[1])
    monkeypatch.setattr(heatmaps, "render", lambda *args: (seen.append(("render", *where())), render(*args))[1])
    with RunningServer(repository, low_priority_pixels=100 * 100) as running, grpc.insecure_channel(running.address) as channel:
        stub = pb_grpc.DetectorStub(channel)
        for side in (64, 128):  # 4,096 pixels, then 16,384: over the limit
            stub.Detect(pb.DetectRequest(image=png(side), heatmap=pb.HEATMAP_OVERLAY), timeout=30)
    normal, low = ("decode", PROCESS_NICE), ("decode-low", LOW)
    assert seen == [("decode", *normal), ("render", *normal), ("decode", *low), ("render", *low)]


async def entered(event: threading.Event) -> None:
    """Wait (without blocking the loop) until an engine thread has set `event`."""
    assert await asyncio.get_running_loop().run_in_executor(None, event.wait, 10)


def test_a_huge_photo_is_decoded_at_low_priority_and_searched_for_faces_at_normal_priority(repository, monkeypatch):
    import grpc

    from serving import dataplane
    from serving.faces import Detectors, Found
    from serving.proto.cyborg.v1 import detector_pb2 as pb
    from serving.proto.cyborg.v1 import detector_pb2_grpc as pb_grpc

    seen = []
    decode = dataplane.DataPlane._decode

    def no_faces(detector, image, original, contract, *args):  # the search holds the detector's lock
        seen.append(("search", *where()))
        return Found(False, [], [], np.zeros((0, *contract.input_shape), np.uint8), [])

    monkeypatch.setattr(dataplane.DataPlane, "_decode", lambda self, *args: (seen.append(("decode", *where())), decode(self, *args))[1])
    monkeypatch.setattr(dataplane, "find_faces", no_faces)
    monkeypatch.setattr(Detectors, "get", lambda self: None)
    with RunningServer(repository, low_priority_pixels=100 * 100) as running, grpc.insecure_channel(running.address) as channel:
        stub = pb_grpc.DetectorStub(channel)
        for side in (64, 128):
            answer = stub.Detect(pb.DetectRequest(image=png(side), input_kind=pb.INPUT_KIND_PHOTO), timeout=30)
            assert answer.status == pb.IMAGE_STATUS_NO_FACE
    normal, low = ("decode", PROCESS_NICE), ("decode-low", LOW)
    assert seen == [("decode", *normal), ("search", *normal), ("decode", *low), ("search", *normal)]


def test_ordinary_requests_run_beside_a_bulk_piece_that_runs_at_low_priority():
    release, running = threading.Event(), threading.Event()
    calls = []

    def engine(name):
        def run(images):
            calls.append((name, len(images), *where()))
            if name == "bulk":
                running.set()
                release.wait(10)
            return {"score": images[:, 0, 0, 0].astype(np.float32)}

        return run

    async def main():
        batcher = Batcher(engine("ordinary"), max_batch_size=8, max_queue_delay_ms=1, bulk_run=engine("bulk"))
        bulk = batcher.submit(np.full((1, 3, 1, 1), 7, np.uint8), bulk=True)
        await entered(running)  # the bulk piece is running (and blocked)
        ordinary = await asyncio.wait_for(batcher.submit(np.full((2, 3, 1, 1), 3, np.uint8)), 5)
        assert not bulk.done()
        release.set()
        bulk = await asyncio.wait_for(bulk, 5)
        await batcher.close()
        return ordinary, bulk

    ordinary, bulk = asyncio.run(main())
    assert ordinary.outputs["score"].tolist() == [3.0, 3.0] and bulk.outputs["score"].tolist() == [7.0]
    assert calls == [("bulk", 1, "bulk-", LOW), ("ordinary", 2, "infer-", PROCESS_NICE)]


def test_without_a_bulk_lane_bulk_pieces_never_join_a_batch_of_ordinary_requests():
    gate, running = threading.Event(), threading.Event()
    batches = []

    def run(images):
        running.set()
        gate.wait(10)
        batches.append(images[:, 0, 0, 0].tolist())
        return {"score": images[:, 0, 0, 0].astype(np.float32)}

    async def main():
        batcher = Batcher(run, max_batch_size=8, max_queue_delay_ms=1)
        first = batcher.submit(np.full((1, 3, 1, 1), 1, np.uint8))
        await entered(running)  # running, held at the gate
        queued = [batcher.submit(np.full((1, 3, 1, 1), 9, np.uint8), bulk=True), batcher.submit(np.full((1, 3, 1, 1), 8, np.uint8), bulk=True),
                  batcher.submit(np.full((1, 3, 1, 1), 2, np.uint8)), batcher.submit(np.full((1, 3, 1, 1), 3, np.uint8))]  # fmt: skip
        gate.set()
        await asyncio.gather(first, *queued)
        await batcher.close()

    asyncio.run(main())
    # The 8-row batch had room for the pieces, and they still waited; then one piece a batch
    # (max_batch_size / 8 rows), so an ordinary request arriving meanwhile waits for one piece only.
    assert batches == [[1], [2, 3], [9], [8]]


def test_large_model_infer_runs_in_the_bulk_lane_at_low_priority(repository):
    tc = pytest.importorskip("tritonclient.grpc")
    images = random_images(24, seed=5)
    with RunningServer(repository, max_batch_size=8) as running:
        model = running.server.repository.get("tiny", 0)
        assert model.bulk_backend is not None and model.bulk_backend.session.get_session_options().intra_op_num_threads == 1
        pieces = []
        bulk_run = model.batcher.bulk_run
        model.batcher.bulk_run = lambda rows: (pieces.append((len(rows), *where())), bulk_run(rows))[1]
        client = tc.InferenceServerClient(running.address)
        tensor = tc.InferInput("images", list(images.shape), "UINT8")
        tensor.set_data_from_numpy(images)
        scores = client.infer("tiny", [tensor]).as_numpy("score")
        client.close()
    assert scores == pytest.approx(reference_outputs(repository / "tiny" / "1", images)["score"], abs=1e-6)
    assert pieces == [(1, "bulk-tiny", LOW)] * 24  # pieces of max_batch_size / 8 rows, on the bulk lane's thread
    with RunningServer(repository, bulk_lane=False) as running:
        assert running.server.repository.get("tiny", 0).bulk_backend is None


def test_a_bulk_piece_that_waited_goes_first_but_never_twice_in_a_row():
    import collections

    from serving.batcher import BULK_MAX_WAIT, _Pending, take

    loop = asyncio.new_event_loop()
    try:
        def pending(value: int, bulk: bool, age: float) -> _Pending:
            return _Pending(np.full((1, 3, 1, 1), value, np.uint8), None, loop.create_future(), time.perf_counter() - age, bulk)

        queue = collections.deque([pending(9, True, 2 * BULK_MAX_WAIT), pending(8, True, 2 * BULK_MAX_WAIT), pending(1, False, 0), pending(2, False, 0)])
        order = []
        last_bulk = False
        while queue:
            batch, queue = take(queue, 8, 1, last_bulk)
            last_bulk = batch[0].bulk
            order.append([int(p.images[0, 0, 0, 0]) for p in batch])
    finally:
        loop.close()
    assert order == [[9], [1, 2], [8]]
