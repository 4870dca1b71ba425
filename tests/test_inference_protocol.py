"""The Open Inference Protocol (KServe v2) on a real server, called with tritonclient unchanged."""

from __future__ import annotations

import numpy as np
import pytest

tc = pytest.importorskip("tritonclient.grpc")
from tritonclient.grpc import service_pb2  # noqa: E402  (tritonclient's own generated messages)
from tritonclient.utils import InferenceServerException  # noqa: E402

from core import contract as c  # noqa: E402
from tests.serving_fixtures import RunningServer, build_model_repository, random_images, reference_outputs  # noqa: E402

SIZE = 32


@pytest.fixture(scope="module")
def repository(tmp_path_factory):
    return build_model_repository(tmp_path_factory.mktemp("repo"), name="tiny", versions=(1, 2), size=SIZE)


@pytest.fixture(scope="module")
def client(repository):
    with RunningServer(repository) as server:
        triton = tc.InferenceServerClient(server.address)
        yield triton
        triton.close()


def images_input(images: np.ndarray, datatype: str = "UINT8"):
    tensor = tc.InferInput(c.INPUT_NAME, list(images.shape), datatype)
    tensor.set_data_from_numpy(images)
    return tensor


def rejection(call) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as caught:
        call()
    return caught.value


def test_health_and_server_metadata(client):
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("tiny")
    assert client.is_model_ready("tiny", "2")
    assert not client.is_model_ready("tiny", "7")
    assert not client.is_model_ready("no-such-model")
    metadata = client.get_server_metadata()
    assert metadata.name == "cyborg" and metadata.version


def test_model_metadata_names_tensors_with_a_variable_batch(client):
    metadata = client.get_model_metadata("tiny")
    assert metadata.name == "tiny" and list(metadata.versions) == ["2"]
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == [(c.INPUT_NAME, "UINT8", [-1, 3, SIZE, SIZE])]
    outputs = {t.name: (t.datatype, list(t.shape)) for t in metadata.outputs}
    assert outputs == {
        c.SCORE_OUTPUT: ("FP32", [-1]),
        c.LOGITS_OUTPUT: ("FP32", [-1, 2]),
        c.CAM_OUTPUT: ("FP32", [-1, SIZE // 8, SIZE // 8]),
    }
    assert "NOT_FOUND" in rejection(lambda: client.get_model_metadata("no-such-model")).status()


def test_infer_matches_onnxruntime_in_process(client, repository):
    images = random_images(5, SIZE, seed=3)
    outputs = [tc.InferRequestedOutput(name) for name in c.OUTPUT_NAMES]
    result = client.infer("tiny", [images_input(images)], outputs=outputs, request_id="req-7")
    expected = reference_outputs(repository / "tiny" / "2", images)
    response = result.get_response()
    assert (response.model_name, response.model_version, response.id) == ("tiny", "2", "req-7")
    for name in c.OUTPUT_NAMES:
        np.testing.assert_allclose(result.as_numpy(name), expected[name], rtol=1e-5, atol=1e-6)
    assert result.as_numpy(c.CAM_OUTPUT).shape == (5, SIZE // 8, SIZE // 8)


def test_infer_returns_only_requested_outputs(client, repository):
    images = random_images(2, SIZE, seed=4)
    result = client.infer("tiny", [images_input(images)], model_version="2", outputs=[tc.InferRequestedOutput(c.SCORE_OUTPUT)])
    assert [o.name for o in result.get_response().outputs] == [c.SCORE_OUTPUT]
    assert result.as_numpy(c.CAM_OUTPUT) is None
    np.testing.assert_allclose(result.as_numpy(c.SCORE_OUTPUT), reference_outputs(repository / "tiny" / "2", images)[c.SCORE_OUTPUT], rtol=1e-5)


def test_typed_contents_are_accepted_like_raw_bytes(client, repository):
    images = random_images(2, SIZE, seed=5)
    request = service_pb2.ModelInferRequest(model_name="tiny")
    tensor = request.inputs.add(name=c.INPUT_NAME, datatype="UINT8", shape=list(images.shape))
    tensor.contents.uint_contents.extend(images.ravel().tolist())
    response = client._client_stub.ModelInfer(request)
    scores = np.frombuffer(response.raw_output_contents[[o.name for o in response.outputs].index(c.SCORE_OUTPUT)], "<f4")
    np.testing.assert_allclose(scores, reference_outputs(repository / "tiny" / "2", images)[c.SCORE_OUTPUT], rtol=1e-5)


@pytest.mark.parametrize(
    ("make_input", "words"),
    [
        (lambda x: images_input(x.astype(np.float32), "FP32"), ["datatype FP32", "UINT8"]),
        (lambda x: images_input(x[:, :, :16, :16].copy()), ["shape [2, 3, 16, 16]", f"[-1, 3, {SIZE}, {SIZE}]"]),
        (lambda x: images_input(x[:, 0].copy()), ["shape [2, 32, 32]"]),
        (lambda x: images_input(x.transpose(0, 2, 3, 1).copy()), ["shape [2, 32, 32, 3]"]),
    ],
    ids=["fp32", "small", "three-dims", "nhwc"],
)
def test_wrong_dtype_or_shape_is_invalid_argument_naming_it(client, make_input, words):
    error = rejection(lambda: client.infer("tiny", [make_input(random_images(2, SIZE))]))
    assert "INVALID_ARGUMENT" in error.status()
    for word in words:
        assert word in error.message()


def test_other_bad_requests_then_a_good_one(client, repository):
    images = random_images(1, SIZE, seed=6)
    wrong_name = tc.InferInput("pixels", list(images.shape), "UINT8")
    wrong_name.set_data_from_numpy(images)
    assert "'pixels'" in rejection(lambda: client.infer("tiny", [wrong_name])).message()
    unknown_output = [tc.InferRequestedOutput("probabilities")]
    assert "probabilities" in rejection(lambda: client.infer("tiny", [images_input(images)], outputs=unknown_output)).message()
    assert "NOT_FOUND" in rejection(lambda: client.infer("no-such-model", [images_input(images)])).status()
    assert "NOT_FOUND" in rejection(lambda: client.infer("tiny", [images_input(images)], model_version="9")).status()
    assert "INVALID_ARGUMENT" in rejection(lambda: client.infer("tiny", [images_input(images)], model_version="latest")).status()

    short = service_pb2.ModelInferRequest(model_name="tiny")
    short.inputs.add(name=c.INPUT_NAME, datatype="UINT8", shape=list(images.shape))
    short.raw_input_contents.append(images.tobytes()[:-1])
    with pytest.raises(Exception) as caught:
        client._client_stub.ModelInfer(short)
    assert "3071 bytes" in caught.value.details()

    result = client.infer("tiny", [images_input(images)])
    np.testing.assert_allclose(result.as_numpy(c.SCORE_OUTPUT), reference_outputs(repository / "tiny" / "2", images)[c.SCORE_OUTPUT], rtol=1e-5)


def test_model_load_and_unload_behind_a_flag(repository):
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    images = random_images(1, seed=4, size=SIZE)
    with RunningServer(repository, model_load_api=True) as running:
        client = tc.InferenceServerClient(running.address)
        try:
            client.unload_model("tiny")
            assert not client.is_model_ready("tiny")
            assert [(m.name, m.state) for m in client.get_model_repository_index().models] == [("tiny", "UNLOADED")] * 2
            with pytest.raises(InferenceServerException, match="unloaded on request"):
                client.infer("tiny", [images_input(images)])
            running.call(running.server.repository.reload)  # a rescan (SIGHUP, polling) leaves it unloaded
            assert not client.is_model_ready("tiny")
            with grpc.insecure_channel(running.address) as channel:
                health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="tiny"))
            assert health.status == health_pb2.HealthCheckResponse.NOT_SERVING
            client.load_model("tiny")
            assert client.is_model_ready("tiny")
            scores = client.infer("tiny", [images_input(images)]).as_numpy("score")
            assert scores == pytest.approx(reference_outputs(repository / "tiny" / "2", images)["score"], abs=1e-6)
            for call, code in [(lambda: client.load_model("nope"), "NOT_FOUND"), (lambda: client.unload_model("nope"), "NOT_FOUND"),
                               (lambda: client.load_model("tiny", config='{"max_batch_size": 4}'), "INVALID_ARGUMENT")]:  # fmt: skip
                with pytest.raises(InferenceServerException) as raised:
                    call()
                assert raised.value.status() == f"StatusCode.{code}"
        finally:
            client.close()
    with RunningServer(repository) as running:  # off by default
        client = tc.InferenceServerClient(running.address)
        try:
            with pytest.raises(InferenceServerException, match="--model-load-api") as raised:
                client.unload_model("tiny")
            assert raised.value.status() == "StatusCode.UNIMPLEMENTED" and client.is_model_ready("tiny")
        finally:
            client.close()
