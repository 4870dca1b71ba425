"""The Detector API on a real server over loopback: answers, heatmaps, bad input, concurrency, metrics."""

import asyncio
import io

import grpc
import numpy as np
import pytest
from PIL import Image

from core import contract as c
from core.images import to_model_input
from serving.proto.cyborg.v1 import detector_pb2 as pb
from serving.proto.cyborg.v1 import detector_pb2_grpc as pb_grpc
from tests.serving_fixtures import RunningServer, build_model_repository, random_images, reference_outputs
from tests.test_images import animated_gif, encode, png_claiming


@pytest.fixture(scope="module")
def repository(tmp_path_factory):
    return build_model_repository(tmp_path_factory.mktemp("repo"), versions=(1,))


@pytest.fixture(scope="module")
def server(repository):
    with RunningServer(repository, max_message_mb=1) as running:
        yield running


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.address) as channel:
        yield pb_grpc.DetectorStub(channel)


def png_bytes(chw: np.ndarray) -> bytes:
    return encode(Image.fromarray(chw.transpose(1, 2, 0)), "PNG")


def tensor_message(array: np.ndarray, dtype: str = "uint8") -> pb.Tensor:
    return pb.Tensor(shape=array.shape, data=array.tobytes(), dtype=dtype)


def scrape(server) -> dict:
    from urllib.request import urlopen

    from prometheus_client.parser import text_string_to_metric_families

    text = urlopen(f"http://127.0.0.1:{server.server.metrics_port}/metrics", timeout=5).read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def test_detect_image_and_tensor_match_onnxruntime(stub, repository):
    images = random_images(2, seed=1)
    expected = reference_outputs(repository / "tiny" / "1", images)
    by_image = stub.Detect(pb.DetectRequest(image=png_bytes(images[0]), id="a"))
    by_tensor = stub.Detect(pb.DetectRequest(tensor=tensor_message(images[1].transpose(1, 2, 0).copy())))  # HWC
    assert by_image.id == "a" and (by_image.model, by_image.version) == ("tiny", 1)
    assert by_image.score == pytest.approx(expected["score"][0], abs=1e-6)
    assert by_tensor.score == pytest.approx(expected["score"][1], abs=1e-6)
    assert by_image.label == ("fake" if by_image.score >= 0.5 else "real") and by_image.threshold == 0.5
    # A model.json without calibration or operating points serves as it always did: probability = score.
    assert by_image.probability == by_image.score and by_image.probability_threshold == 0.5
    assert by_image.operating_point == "default"
    assert by_image.timings.total_ms >= by_image.timings.compute_ms > 0 and not by_image.HasField("heatmap")


def test_every_heatmap_form(stub, repository):
    picture = np.full((40, 56, 3), 128, np.uint8)  # not the model's size: resized in the server
    picture[:20, :28] = 30
    model_input = to_model_input(Image.fromarray(picture), 32, 32)[None]
    cam = reference_outputs(repository / "tiny" / "1", model_input)["cam"][0]
    data = encode(Image.fromarray(picture), "PNG")
    answers = {kind: stub.Detect(pb.DetectRequest(image=data, heatmap=kind)) for kind in (pb.HEATMAP_GRID, pb.HEATMAP_PNG, pb.HEATMAP_OVERLAY)}

    grid = answers[pb.HEATMAP_GRID].heatmap.grid
    assert list(grid.shape) == [4, 4]
    np.testing.assert_allclose(np.array(grid.values, np.float32).reshape(4, 4), cam, atol=1e-6)

    gray = Image.open(io.BytesIO(answers[pb.HEATMAP_PNG].heatmap.png))
    assert gray.size == (56, 40) and gray.mode == "L"
    cells = np.asarray(gray, np.float32).reshape(4, 10, 4, 14).mean(axis=(1, 3)) / 255  # back to the 4x4 grid
    assert np.corrcoef(cells.ravel(), cam.ravel())[0, 1] > 0.9

    overlay = np.asarray(Image.open(io.BytesIO(answers[pb.HEATMAP_OVERLAY].heatmap.png)))
    assert overlay.shape == (40, 56, 3)
    hot = np.unravel_index(cam.argmax(), cam.shape)
    cold = np.unravel_index(cam.argmin(), cam.shape)
    centre = lambda cell: overlay[cell[0] * 10 + 5, cell[1] * 14 + 7].astype(int)  # noqa: E731
    assert centre(hot)[0] > centre(hot)[2] and centre(cold)[2] > centre(cold)[0]  # jet: red hot, blue cold


def test_batch_reports_errors_per_item(stub, repository):
    images = random_images(3, seed=2)
    expected = reference_outputs(repository / "tiny" / "1", images)["score"]
    request = pb.DetectBatchRequest(
        requests=[
            pb.DetectRequest(image=png_bytes(images[0]), id="0"),
            pb.DetectRequest(image=b"garbage", id="bad"),
            pb.DetectRequest(tensor=tensor_message(images[1]), id="1"),
            pb.DetectRequest(tensor=tensor_message(images[2]), model="missing", id="nomodel"),
            pb.DetectRequest(tensor=tensor_message(images[2]), heatmap=pb.HEATMAP_GRID, id="2"),
        ]
    )
    responses = stub.DetectBatch(request).responses
    assert [r.id for r in responses] == ["0", "bad", "1", "nomodel", "2"]
    assert [r.score for r in responses if not r.HasField("error")] == pytest.approx(expected.tolist(), abs=1e-6)
    assert responses[1].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and "image" in responses[1].error.message
    assert responses[3].error.code == grpc.StatusCode.NOT_FOUND.value[0] and "missing" in responses[3].error.message
    assert list(responses[4].heatmap.grid.shape) == [4, 4]


def test_stream_answers_in_order_and_survives_bad_items(stub, repository):
    images = random_images(30, seed=3)
    expected = reference_outputs(repository / "tiny" / "1", images)["score"]
    messages = [pb.DetectRequest(tensor=tensor_message(image), id=str(i)) for i, image in enumerate(images)]
    messages.insert(10, pb.DetectRequest(image=b"\x89PNG broken", id="bad"))
    responses = list(stub.DetectStream(iter(messages)))
    assert [r.id for r in responses] == [m.id for m in messages]
    bad = responses.pop(10)
    assert bad.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert [r.score for r in responses] == pytest.approx(expected.tolist(), abs=1e-6)


def cmyk_jpeg() -> bytes:
    return encode(Image.new("CMYK", (40, 40), (10, 200, 30, 0)), "JPEG")


def png16() -> bytes:
    return encode(Image.fromarray(np.arange(40 * 40, dtype=np.uint16).reshape(40, 40) * 40), "PNG")


BAD = [
    (dict(image=b""), grpc.StatusCode.INVALID_ARGUMENT, "empty"),
    (dict(image=encode(Image.new("RGB", (64, 64), "teal"), "JPEG")[:200]), grpc.StatusCode.INVALID_ARGUMENT, "truncated"),
    (dict(image=b"GET / HTTP/1.1\r\n"), grpc.StatusCode.INVALID_ARGUMENT, "not a recognised image"),
    (dict(image=encode(Image.new("RGB", (1, 1)), "PNG")), grpc.StatusCode.INVALID_ARGUMENT, "too small"),
    (dict(image=png_claiming(60000, 60000)), grpc.StatusCode.RESOURCE_EXHAUSTED, "pixels"),
    (dict(image=animated_gif()), grpc.StatusCode.INVALID_ARGUMENT, "animated"),
    (dict(tensor=pb.Tensor(shape=[1, 3, 32, 32], data=bytes(3072))), grpc.StatusCode.INVALID_ARGUMENT, "tensor shape"),
    (dict(tensor=pb.Tensor(shape=[3, 32, 32], data=bytes(100))), grpc.StatusCode.INVALID_ARGUMENT, "needs 3072 bytes"),
    (dict(tensor=pb.Tensor(shape=[3, 32, 32], data=bytes(4 * 3072), dtype="float32")), grpc.StatusCode.INVALID_ARGUMENT, "dtype"),
    (dict(tensor=pb.Tensor(shape=[32, 32, 4], data=bytes(4096))), grpc.StatusCode.INVALID_ARGUMENT, "tensor shape"),
    (dict(tensor=pb.Tensor(shape=[3, 32, 32], data=bytes(3072)), model="nope"), grpc.StatusCode.NOT_FOUND, "unknown model 'nope'"),
    (dict(tensor=pb.Tensor(shape=[3, 32, 32], data=bytes(3072)), version=7), grpc.StatusCode.NOT_FOUND, "version 7"),
    (dict(), grpc.StatusCode.INVALID_ARGUMENT, "neither an image nor a tensor"),
    (dict(image=bytes(1536 * 1024)), grpc.StatusCode.RESOURCE_EXHAUSTED, "larger than max"),  # over the 1 MiB limit
]


@pytest.mark.parametrize("fields, code, message", BAD, ids=[
    "empty", "truncated-jpeg", "text", "1x1", "60000x60000", "animated-gif", "4d-tensor", "short-tensor",
    "float-tensor", "4-channels", "unknown-model", "unknown-version", "no-input", "oversized-message",
])  # fmt: skip
def test_bad_input_is_refused_and_the_server_keeps_serving(stub, fields, code, message):
    with pytest.raises(grpc.RpcError) as raised:
        stub.Detect(pb.DetectRequest(**fields), timeout=10)
    assert raised.value.code() == code
    assert message in raised.value.details()
    good = stub.Detect(pb.DetectRequest(image=png_bytes(random_images(1)[0])), timeout=10)
    assert 0.0 <= good.score <= 1.0


@pytest.mark.parametrize("data", [cmyk_jpeg(), png16()], ids=["cmyk-jpeg", "16-bit-png"])
def test_cmyk_and_16_bit_images_work(stub, data):
    answer = stub.Detect(pb.DetectRequest(image=data, heatmap=pb.HEATMAP_OVERLAY))
    assert 0.0 <= answer.score <= 1.0
    assert Image.open(io.BytesIO(answer.heatmap.png)).size == (40, 40)


def test_hundred_concurrent_clients_get_their_own_answers(server, repository):
    images = random_images(100, seed=4)
    expected = reference_outputs(repository / "tiny" / "1", images)["score"]
    assert len(set(np.round(expected, 6))) == 100  # distinct images, distinct scores
    before = scrape(server)

    async def client(index: int) -> float:
        async with grpc.aio.insecure_channel(server.address) as channel:
            answer = await pb_grpc.DetectorStub(channel).Detect(pb.DetectRequest(image=png_bytes(images[index])), timeout=30)
            return answer.score

    async def main():
        return await asyncio.gather(*(client(i) for i in range(100)))

    scores = asyncio.run(main())
    assert scores == pytest.approx(expected.tolist(), abs=1e-6)
    after = scrape(server)
    labels = (("model", "tiny"), ("version", "1"))
    rows = after[("cyborg_inference_count_total", labels)] - before[("cyborg_inference_count_total", labels)]
    batches = after[("cyborg_inference_exec_count_total", labels)] - before[("cyborg_inference_exec_count_total", labels)]
    assert rows == 100 and batches < 100  # dynamic batching gathered requests


def test_metrics_move(server, stub):
    labels = (("model", "tiny"), ("version", "1"))
    before = scrape(server)
    stub.Detect(pb.DetectRequest(image=png_bytes(random_images(1)[0])))
    with pytest.raises(grpc.RpcError):
        stub.Detect(pb.DetectRequest(image=b"junk"))
    with pytest.raises(grpc.RpcError):
        stub.Detect(pb.DetectRequest(image=b"junk", model="nope"))
    after = scrape(server)
    unknown = (("model", ""), ("reason", "not_found"), ("version", ""))
    assert after[("cyborg_inference_request_failure_total", unknown)] - before.get(("cyborg_inference_request_failure_total", unknown), 0) == 1
    moved = lambda name, extra=(): after[(name, tuple(sorted(labels + extra)))] - before.get((name, tuple(sorted(labels + extra))), 0)  # noqa: E731
    assert moved("cyborg_inference_request_success_total") == 1
    assert moved("cyborg_inference_request_failure_total", (("reason", "invalid_argument"),)) == 1
    assert moved("cyborg_inference_queue_duration_seconds_count") == 1
    assert moved("cyborg_inference_compute_infer_duration_seconds_count") == 1
    assert moved("cyborg_inference_batch_size_count") == 1
    assert after[("cyborg_model_ready", labels)] == 1


def test_list_and_get_model(stub):
    listed = stub.ListModels(pb.ListModelsRequest())
    assert listed.default_model == "tiny" and [(m.name, m.version) for m in listed.models] == [("tiny", 1)]
    info = stub.GetModel(pb.GetModelRequest(model="tiny"))
    contract = c.ModelContract.from_dict(__import__("json").loads(info.contract_json))
    assert (contract.input_height, info.cam_height, info.backend, info.device) == (32, 4, "onnxruntime", "cpu")
    with pytest.raises(grpc.RpcError) as raised:
        stub.GetModel(pb.GetModelRequest(model="tiny", version=2))
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND


def test_health_and_reflection(server):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    with grpc.insecure_channel(server.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "tiny", "cyborg.v1.Detector"):
            assert health.Check(health_pb2.HealthCheckRequest(service=service)).status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as raised:
            health.Check(health_pb2.HealthCheckRequest(service="no-such-model"))
        assert raised.value.code() == grpc.StatusCode.NOT_FOUND
        services = ProtoReflectionDescriptorDatabase(channel).get_services()
        assert "cyborg.v1.Detector" in services and "grpc.health.v1.Health" in services


def test_tensor_of_another_size_is_resized_like_an_image(stub, repository):
    picture = np.asarray(Image.fromarray(random_images(1, size=48, seed=6)[0].transpose(1, 2, 0)).resize((40, 48)))
    expected = reference_outputs(repository / "tiny" / "1", to_model_input(Image.fromarray(picture), 32, 32)[None])
    answer = stub.Detect(pb.DetectRequest(tensor=tensor_message(picture.transpose(2, 0, 1).copy()), heatmap=pb.HEATMAP_PNG))
    assert answer.score == pytest.approx(expected["score"][0], abs=1e-6)
    assert Image.open(io.BytesIO(answer.heatmap.png)).size == (40, 48)


def test_batch_larger_than_the_model_queue_still_succeeds(stub, repository):
    images = random_images(300, seed=7)  # the fixture's model queue holds 256 requests
    expected = reference_outputs(repository / "tiny" / "1", images)["score"]
    responses = stub.DetectBatch(pb.DetectBatchRequest(requests=[pb.DetectRequest(tensor=tensor_message(i)) for i in images])).responses
    assert not [r.error.message for r in responses if r.HasField("error")]
    assert [r.score for r in responses] == pytest.approx(expected.tolist(), abs=1e-6)
