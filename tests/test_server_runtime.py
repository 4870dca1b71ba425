"""Engine backends: provider choice, clear errors, and the TensorRT plan backend where it can run."""

import numpy as np
import pytest

from core import contract as c
from core.errors import ContractError
from engines.runtime import OnnxRuntimeBackend, cuda_device_count, load_backend, onnxruntime_providers, tensorrt_available
from tests.serving_fixtures import random_images, reference_outputs, write_model_version

NO_GPU = cuda_device_count() == 0


def test_cpu_only_providers_without_a_gpu(tmp_path, capfd):
    assert onnxruntime_providers("cpu") == ["CPUExecutionProvider"]
    if NO_GPU:
        assert onnxruntime_providers("auto") == ["CPUExecutionProvider"]
        with pytest.raises(ContractError, match="--device cuda"):
            onnxruntime_providers("cuda")
    folder = write_model_version(tmp_path, "tiny", 1)
    backend = load_backend(folder, c.read_contract(folder), device="auto", intra_op_threads=1)
    assert isinstance(backend, OnnxRuntimeBackend) and backend.providers[-1] == "CPUExecutionProvider"
    images = random_images(4)
    outputs = backend.run(images)
    expected = reference_outputs(folder, images)
    for name in c.OUTPUT_NAMES:
        np.testing.assert_allclose(outputs[name], expected[name], atol=1e-5)
    if NO_GPU:
        assert backend.device == "cpu"
        assert "CUDAExecutionProvider" not in capfd.readouterr().err  # no noisy provider fallback


def test_wrong_graph_and_unavailable_tensorrt_are_refused(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    folder = write_model_version(tmp_path, "tiny", 1)
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "wrong",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, folder / "wrong.onnx")
    with pytest.raises(ContractError, match="expected \\[images\\]"):
        OnnxRuntimeBackend(folder / "wrong.onnx")
    with pytest.raises(ContractError, match="backend 'torch'"):
        load_backend(folder, c.read_contract(folder), backend="torch")
    with pytest.raises(ContractError, match="model.plan"):
        load_backend(folder, c.read_contract(folder), backend="tensorrt")


def test_an_int8_version_on_cuda_is_served_with_a_warning(tmp_path, monkeypatch, caplog):
    """An int8 graph (cyborg export --precision int8) runs slower than fp32 on ONNX Runtime's CUDA
    provider: loading one on a GPU warns and names the fix; on the CPU, or fp32 on CUDA, nothing."""
    import dataclasses
    import logging

    folder = write_model_version(tmp_path, "tiny", 1)
    fp32 = c.read_contract(folder)
    int8 = dataclasses.replace(fp32, precision="int8", metrics={"int8": {"weight_bits": 7}})  # as exported today (tests/test_int8_kernels.py: 8-bit)
    caplog.set_level(logging.WARNING, logger="engines.runtime")
    load_backend(folder, int8, device="cpu", intra_op_threads=1)
    assert caplog.records == []
    monkeypatch.setattr(OnnxRuntimeBackend, "__init__", lambda self, *args, **kwargs: setattr(self, "device", "cuda"))
    load_backend(folder, fp32, device="cuda")
    assert caplog.records == []
    load_backend(folder, int8, device="cuda")
    assert [r.getMessage() for r in caplog.records] == [
        "tiny v1 is an int8 graph made for CPUs (cyborg export --precision int8); on CUDA it runs slower than fp32: "
        "serve the fp32 version it was quantised from beside it (requests naming no version then get that one)"
    ]


@pytest.mark.skipif(not tensorrt_available() or NO_GPU, reason="needs the tensorrt and cuda-python packages and a CUDA GPU")
def test_tensorrt_plan_matches_onnxruntime(tmp_path):  # pragma: no cover - no GPU in CI
    import tensorrt as trt

    folder = write_model_version(tmp_path, "tiny", 1)
    logger = trt.Logger(trt.Logger.ERROR)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    assert parser.parse((folder / c.ONNX_FILE).read_bytes()), parser.get_error(0)
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    profile.set_shape(c.INPUT_NAME, (1, 3, 32, 32), (8, 3, 32, 32), (16, 3, 32, 32))
    config.add_optimization_profile(profile)
    (folder / c.TENSORRT_FILE).write_bytes(bytes(builder.build_serialized_network(network, config)))
    contract = c.read_contract(folder, verify=False)
    files = {**contract.files, c.TENSORRT_FILE: c.sha256_file(folder / c.TENSORRT_FILE)}
    c.write_contract(folder, c.ModelContract.from_dict({**contract.to_dict(), "files": files}))
    backend = load_backend(folder, c.read_contract(folder), backend="tensorrt")
    images = random_images(20)  # more than the profile's largest batch: run in pieces
    outputs, expected = backend.run(images), reference_outputs(folder, images)
    for name in c.OUTPUT_NAMES:
        np.testing.assert_allclose(outputs[name], expected[name], atol=1e-3)
