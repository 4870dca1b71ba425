"""Serving under attack and at the edges: bounded work per request, no INTERNAL for bad input,
cancelled work dropped, short error messages, guarded surfaces, shutdown with open streams, and the
Open Inference Protocol's streaming, repository index and reflection (issue 12)."""

from __future__ import annotations

import io
import threading
import time
from urllib.error import HTTPError
from urllib.request import Request, urlopen

import grpc
import numpy as np
import pytest
from PIL import Image

from core import heatmaps
from core.errors import ImageError
from core.images import decode_image
from serving.dataplane import PixelBudget
from serving.errors import ServerBusy, status_of
from serving.proto.cyborg.v1 import detector_pb2 as pb
from serving.proto.cyborg.v1 import detector_pb2_grpc as pb_grpc
from tests.serving_fixtures import RunningServer, build_model_repository, random_images, reference_outputs


@pytest.fixture(scope="module")
def repository(tmp_path_factory):
    return build_model_repository(tmp_path_factory.mktemp("repo"), versions=(1,))


@pytest.fixture(scope="module")
def server(repository):
    with RunningServer(repository, max_heatmap_side=256, max_batch_items=16) as running:
        yield running


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.address, options=[("grpc.max_receive_message_length", 64 << 20)]) as channel:
        yield pb_grpc.DetectorStub(channel)


def encoded(array: np.ndarray, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt, **options)
    return buffer.getvalue()


def code_of(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as raised:
        call()
    return raised.value.code(), raised.value.details()


def counter(server, name: str, **labels) -> float:
    registry = server.server.metrics.registry
    return sum(
        sample.value
        for family in registry.collect()
        for sample in family.samples
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
    )


# ---- 1. memory and time per request -------------------------------------------------------------
def test_large_images_decode_at_a_reduced_scale():
    gradient = np.linspace(0, 255, 4000, dtype=np.float32).astype(np.uint8)
    big = np.stack([np.tile(gradient, (3000, 1))] * 3, axis=-1)  # 4000 x 3000
    for fmt in ("JPEG", "PNG"):
        image = decode_image(encoded(big, fmt), reduce_to=512)
        assert 512 <= min(image.size) < 1500, (fmt, image.size)
        assert abs(image.size[0] / image.size[1] - 4 / 3) < 0.01
    assert decode_image(encoded(big[:1000, :1000], "PNG"), reduce_to=512).size == (1000, 1000)  # under 2x: untouched


def test_heatmaps_are_bounded_and_stay_on_the_region_the_model_saw():
    size, region = heatmaps.bounded((8000, 4000), (2000, 0, 6000, 4000), 1000)
    assert size == (1000, 500) and region == (250, 0, 750, 500)
    assert heatmaps.bounded((640, 480), None, 1024) == ((640, 480), (0, 0, 640, 480))
    picture = np.full((500, 1000, 3), 100, np.uint8)
    overlay = np.asarray(Image.open(io.BytesIO(heatmaps.render("overlay", np.ones((3, 3), np.float32), picture, region))))
    assert np.array_equal(overlay[:, :250], picture[:, :250]) and not np.array_equal(overlay[:, 250:750], picture[:, 250:750])


def test_overlay_of_a_huge_image_is_drawn_at_the_bounded_size(stub):
    big = np.zeros((2400, 3200, 3), np.uint8)  # cheap to send, 7.7 Mpixels decoded
    answer = stub.Detect(pb.DetectRequest(image=encoded(big), heatmap=pb.HEATMAP_OVERLAY), timeout=60)
    assert Image.open(io.BytesIO(answer.heatmap.png)).size == (256, 192)  # --max-heatmap-side 256 in this module
    answer = stub.Detect(pb.DetectRequest(image=encoded(big), heatmap=pb.HEATMAP_PNG), timeout=60)
    assert Image.open(io.BytesIO(answer.heatmap.png)).size == (256, 192)


def test_pixel_budget_admits_one_large_image_and_refuses_more():
    budget = PixelBudget(100)
    with budget.hold(90):
        with budget.hold(10):
            with pytest.raises(ServerBusy, match="--max-decode-pixels"):
                with budget.hold(1):
                    pass
    with budget.hold(500):  # alone, an image over the budget still gets its turn
        assert budget.held == 500
    assert budget.held == 0
    assert status_of(ServerBusy("x"))[0] == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_detect_batch_item_limit(stub):
    image = random_images(1)[0]
    item = pb.DetectRequest(tensor=pb.Tensor(shape=image.shape, data=image.tobytes()))
    code, message = code_of(lambda: stub.DetectBatch(pb.DetectBatchRequest(requests=[item] * 17), timeout=10))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "--max-batch-items" in message and "16" in message
    assert len(stub.DetectBatch(pb.DetectBatchRequest(requests=[item] * 16), timeout=10).responses) == 16


def test_large_model_infer_runs_in_engine_sized_chunks(repository):
    tc = pytest.importorskip("tritonclient.grpc")
    images = random_images(100, seed=3)
    with RunningServer(repository, max_batch_size=8) as running:
        client = tc.InferenceServerClient(running.address)
        tensor = tc.InferInput("images", list(images.shape), "UINT8")
        tensor.set_data_from_numpy(images)
        scores = client.infer("tiny", [tensor]).as_numpy("score")
        client.close()
        rows = counter(running, "cyborg_inference_count_total")
        executions = counter(running, "cyborg_inference_exec_count_total")
        largest = min(
            (s.labels["le"] for f in running.server.metrics.registry.collect() for s in f.samples
             if s.name == "cyborg_inference_batch_size_bucket" and s.value == executions),
            key=float,
        )  # fmt: skip
    expected = reference_outputs(repository / "tiny" / "1", images)["score"]
    assert scores == pytest.approx(expected, abs=1e-6)
    assert rows >= 100 and executions >= 13  # 100 rows in pieces of at most 8
    assert float(largest) <= 8


def test_model_infer_tensors_stay_views_of_the_received_bytes():
    from google.protobuf.message import DecodeError

    from serving.inference_servicer import infer_request_parser, messages

    m = messages()
    request = m.ModelInferRequest(model_name="tiny", model_version="1", id="x")
    request.inputs.add(name="images", datatype="UINT8", shape=[2, 3, 4, 4])
    request.outputs.add(name="score")
    request.parameters["priority"].int64_param = 5
    payload = np.arange(96, dtype=np.uint8).tobytes()
    request.raw_input_contents.extend([payload, b"second"])
    data = request.SerializeToString()
    parse = infer_request_parser(m.ModelInferRequest)
    parsed = parse(data)
    assert [bytes(view) for view in parsed.raw] == [payload, b"second"]
    assert all(view.obj is data for view in parsed.raw)  # not copies
    expected = m.ModelInferRequest()
    expected.CopyFrom(request)
    expected.ClearField("raw_input_contents")
    assert parsed.message == expected
    with pytest.raises(DecodeError):  # broken bytes: protobuf's own verdict, as before
        parse(data[:-3])


def test_large_blocks_are_given_back_to_the_system(monkeypatch):
    import platform

    from serving.server import return_large_blocks

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("mallopt is glibc's")
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    assert return_large_blocks()
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "131072")  # the operator's own setting wins
    assert not return_large_blocks()


# ---- 2. bad input is never INTERNAL -------------------------------------------------------------
@pytest.mark.parametrize("exception", [RuntimeError("avif decoder failed"), TypeError("bad tile"), KeyError("x"), IndexError("y")])
def test_whatever_a_codec_raises_is_an_image_error(monkeypatch, exception):
    data = encoded(np.zeros((16, 16, 3), np.uint8))

    def broken(self):
        raise exception

    monkeypatch.setattr(Image.Image, "load", broken)
    monkeypatch.setattr("PIL.ImageFile.ImageFile.load", broken)
    with pytest.raises(ImageError, match="corrupt or truncated"):
        decode_image(data)


def test_corrupt_jpeg_in_tiff_is_invalid_argument(stub):
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(buffer, format="TIFF", compression="jpeg")
    data = bytearray(buffer.getvalue())
    for offset in range(200, len(data) - 16, 7):
        data[offset] ^= 0xFF
    code, message = code_of(lambda: stub.Detect(pb.DetectRequest(image=bytes(data)), timeout=10))
    assert code == grpc.StatusCode.INVALID_ARGUMENT, message


def test_overflowing_tensor_shape_is_invalid_argument(stub):
    for shape in ([3, 2**62, 4], [2**31, 2**31, 3], [3, 2**63 - 1, 2]):
        code, message = code_of(lambda shape=shape: stub.Detect(pb.DetectRequest(tensor=pb.Tensor(shape=shape, data=b"\0" * 48)), timeout=10))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "bytes" in message


def test_server_faults_do_not_leak_their_text():
    code, message = status_of(KeyError("/secret/path"))
    assert code == grpc.StatusCode.INTERNAL and "secret" not in message


def test_version_strings_are_parsed_strictly(server):
    tc = pytest.importorskip("tritonclient.grpc")
    from tritonclient.utils import InferenceServerException

    client = tc.InferenceServerClient(server.address)
    try:
        for version in ("²", "٣", "1" * 5000, "-1", "1.0", "0"):
            with pytest.raises(InferenceServerException) as raised:
                client.get_model_metadata("tiny", version)
            assert raised.value.status() == "StatusCode.INVALID_ARGUMENT" and len(raised.value.message()) < 300
            with pytest.raises(InferenceServerException) as raised:
                client.is_model_ready("tiny", version)
            assert raised.value.status() == "StatusCode.INVALID_ARGUMENT"
    finally:
        client.close()


# ---- 3. cancelled work leaves the queue ----------------------------------------------------------
def test_cancelled_stream_stops_its_queued_work(server):
    picture = encoded((np.indices((512, 512)).sum(0) % 256).astype(np.uint8))
    before = counter(server, "cyborg_inference_request_success_total")
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.DetectorStub(channel)
        requests = (pb.DetectRequest(id=str(i), image=picture, heatmap=pb.HEATMAP_OVERLAY) for i in range(300))
        call = stub.DetectStream(requests, timeout=60)
        for _ in range(5):
            next(call)
        call.cancel()
    time.sleep(1.5)
    answered = counter(server, "cyborg_inference_request_success_total") - before
    assert answered < 150, answered  # before: 266 of 300 computed after the cancel
    assert counter(server, "cyborg_inference_request_failure_total", reason="cancelled") > 0


# ---- 4. errors quote client input briefly --------------------------------------------------------
def test_a_huge_model_name_gets_a_short_not_found(stub):
    image = random_images(1)[0]
    tensor = pb.Tensor(shape=image.shape, data=image.tobytes())
    code, message = code_of(lambda: stub.Detect(pb.DetectRequest(tensor=tensor, model="m" * 100_000), timeout=10))
    assert code == grpc.StatusCode.NOT_FOUND and len(message) < 300 and "unknown model" in message


# ---- 5. exposed surfaces ------------------------------------------------------------------------
def test_metrics_are_on_loopback_and_can_need_a_token(repository, tmp_path):
    from serving.server import ServerConfig, metrics_host

    assert metrics_host(ServerConfig(host="0.0.0.0", auth_token_file="t")) == "127.0.0.1"
    assert metrics_host(ServerConfig(host="0.0.0.0", tls_cert="c", tls_key="k")) == "127.0.0.1"
    assert metrics_host(ServerConfig(host="0.0.0.0")) == "0.0.0.0"
    assert metrics_host(ServerConfig(host="0.0.0.0", auth_token_file="t", metrics_host="10.0.0.1")) == "10.0.0.1"
    tokens = tmp_path / "tokens"
    tokens.write_text("s3cret\n")
    with RunningServer(repository, auth_token_file=str(tokens), metrics_auth=True) as running:
        url = f"http://127.0.0.1:{running.server.metrics_port}/metrics"
        with pytest.raises(HTTPError) as refused:
            urlopen(url, timeout=5)
        assert refused.value.code == 401
        assert b"cyborg_model_ready" in urlopen(Request(url, headers={"Authorization": "Bearer s3cret"}), timeout=5).read()
        with grpc.insecure_channel(running.address) as channel:  # unknown methods: refused before saying they do not exist
            unknown = channel.unary_unary("/no.Such/Method")
            code, _ = code_of(lambda: unknown(b"", timeout=5))
            assert code == grpc.StatusCode.UNAUTHENTICATED
            code, _ = code_of(lambda: unknown(b"", timeout=5, metadata=[("authorization", "Bearer s3cret")]))
            assert code == grpc.StatusCode.UNIMPLEMENTED


def test_bomb_errors_name_the_servers_limit(stub):
    from tests.test_images import png_claiming

    code, message = code_of(lambda: stub.Detect(pb.DetectRequest(image=png_claiming(60000, 60000)), timeout=10))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "64000000-pixel limit" in message and "179" not in message


# ---- 6. shutdown --------------------------------------------------------------------------------
def test_idle_stream_ends_at_shutdown_and_cut_off_calls_are_counted(repository):
    running = RunningServer(repository, grace_seconds=20).start()
    outcome = {}
    channel = grpc.insecure_channel(running.address)
    stub = pb_grpc.DetectorStub(channel)
    gate = threading.Event()
    image = random_images(1)[0]

    def requests():
        yield pb.DetectRequest(id="a", tensor=pb.Tensor(shape=image.shape, data=image.tobytes()))
        gate.wait(30)  # then idle: the client sends nothing more

    def watch():
        try:
            outcome["answers"] = [answer.id for answer in stub.DetectStream(requests(), timeout=30)]
        except grpc.RpcError as error:
            outcome["code"] = error.code()

    thread = threading.Thread(target=watch)
    thread.start()
    time.sleep(1.0)
    started = time.monotonic()
    running.stop(20)
    took = time.monotonic() - started
    gate.set()
    thread.join(10)
    channel.close()
    assert took < 10, took  # not the whole 20 s grace
    assert outcome.get("code") == grpc.StatusCode.UNAVAILABLE
    assert running.server.cancelled_calls == 0


def test_calls_cut_off_by_shutdown_are_counted(repository):
    running = RunningServer(repository).start()
    model = running.server.repository.loaded()[0]
    slow = model.batcher.run

    def run(images):
        time.sleep(3)
        return slow(images)

    model.batcher.run = run
    image = random_images(1)[0]
    channel = grpc.insecure_channel(running.address)
    future = pb_grpc.DetectorStub(channel).Detect.future(pb.DetectRequest(tensor=pb.Tensor(shape=image.shape, data=image.tobytes())), timeout=30)
    time.sleep(0.5)
    running.stop(0.5)
    with pytest.raises(grpc.RpcError):
        future.result()
    channel.close()
    assert running.server.cancelled_calls == 1


# ---- 7. the Open Inference Protocol for its own clients -----------------------------------------
def test_repository_index_stream_infer_and_reflection(server, repository):
    tc = pytest.importorskip("tritonclient.grpc")
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    client = tc.InferenceServerClient(server.address)
    try:
        index = client.get_model_repository_index(as_json=True)
        assert [(m["name"], m["version"], m["state"]) for m in index["models"]] == [("tiny", "1", "READY")]
        images = random_images(3, seed=9)
        answers, done = [], threading.Event()

        def callback(result, error):
            answers.append((result, error))
            if len(answers) == 4:
                done.set()

        client.start_stream(callback)
        for i, image in enumerate(images):
            tensor = tc.InferInput("images", [1, *image.shape], "UINT8")
            tensor.set_data_from_numpy(image[None])
            client.async_stream_infer("tiny", [tensor], request_id=str(i))
        bad = tc.InferInput("images", [1, 3, 2, 2], "UINT8")
        bad.set_data_from_numpy(np.zeros((1, 3, 2, 2), np.uint8))
        client.async_stream_infer("tiny", [bad], request_id="bad")
        assert done.wait(30)
        client.stop_stream()
    finally:
        client.close()
    expected = reference_outputs(repository / "tiny" / "1", images)["score"]
    good = [result for result, error in answers[:3]]
    assert [r.get_response().id for r in good] == ["0", "1", "2"]
    assert [float(r.as_numpy("score")[0]) for r in good] == pytest.approx(expected.tolist(), abs=1e-6)
    assert answers[3][0] is None and "INVALID_ARGUMENT" in str(answers[3][1])
    with grpc.insecure_channel(server.address) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        assert "inference.GRPCInferenceService" in database.get_services()
        assert database.FindFileContainingSymbol("inference.GRPCInferenceService").name.endswith("grpc_service.proto")


def test_bulk_pieces_go_after_ordinary_requests():
    import asyncio

    from serving.batcher import Batcher

    order = []

    def run(images):
        order.append(int(images[0, 0, 0, 0]))
        time.sleep(0.05)
        return {"score": images[:, 0, 0, 0].astype(np.float32)}

    async def main():
        batcher = Batcher(run, max_batch_size=2, max_queue_delay_ms=20)
        first = batcher.submit(np.full((2, 3, 1, 1), 1, np.uint8), bulk=True)  # runs at once
        await asyncio.sleep(0.01)
        second = batcher.submit(np.full((2, 3, 1, 1), 2, np.uint8), bulk=True)
        third = batcher.submit(np.full((1, 3, 1, 1), 3, np.uint8))  # ordinary: passes the bulk piece
        await asyncio.gather(first, second, third)
        await batcher.close()

    asyncio.run(main())
    assert order == [1, 3, 2]
