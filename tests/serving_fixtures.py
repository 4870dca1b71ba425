"""A tiny, real model repository for serving tests, built without torch.

`build_model_repository` writes `<root>/<name>/<version>/model.onnx + model.json` that satisfy
the model contract (uint8 `images` [B,3,H,W] -> `score` [B], `logits` [B,2], `cam` [B,h,w]) with a
small CAM network made of ONNX operators: normalise, a strided conv, ReLU, a 1x1 conv giving
class maps, global average pooling (+ bias) for the logits, softmax for the score, and the
min-max normalised class map of the predicted class as the CAM. Weights are deterministic per seed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from core import contract as c

MEAN = (0.5, 0.5, 0.5)
STD = (0.25, 0.25, 0.25)


def build_onnx(size: int = 32, stride: int = 8, seed: int = 0, channels: int = 8) -> bytes:
    """Serialized ONNX model of the tiny CAM network for `size` x `size` inputs."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    grid = size // stride
    inits = {
        "mean": np.array(MEAN, np.float32).reshape(1, 3, 1, 1) * 255,
        "std": np.array(STD, np.float32).reshape(1, 3, 1, 1) * 255,
        "w1": rng.normal(0, 0.5 / stride, (channels, 3, stride, stride)).astype(np.float32),
        "b1": rng.normal(0, 0.1, channels).astype(np.float32),
        "w2": rng.normal(0, 1.0, (2, channels, 1, 1)).astype(np.float32),
        "bias": rng.normal(0, 0.1, (1, 2)).astype(np.float32),
        "fake": np.array([c.FAKE_INDEX], np.int64),
        "zero": np.array([0], np.int64),
        "one": np.array([1], np.int64),
        "col4": np.array([-1, 1, 1, 1], np.int64),
        "hw": np.array([grid, grid], np.int64),
        "eps": np.array(1e-6, np.float32),
    }
    node = helper.make_node
    nodes = [
        node("Cast", ["images"], ["x"], to=TensorProto.FLOAT),
        node("Sub", ["x", "mean"], ["x1"]),
        node("Div", ["x1", "std"], ["x2"]),
        node("Conv", ["x2", "w1", "b1"], ["f"], strides=[stride, stride]),
        node("Relu", ["f"], ["features"]),
        node("Conv", ["features", "w2"], ["class_maps"]),  # [B, 2, h, w]
        node("GlobalAveragePool", ["class_maps"], ["pooled"]),
        node("Flatten", ["pooled"], ["pooled2"]),
        node("Add", ["pooled2", "bias"], [c.LOGITS_OUTPUT]),  # logits = class-map mean + bias
        node("Softmax", [c.LOGITS_OUTPUT], ["probs"], axis=1),
        node("Gather", ["probs", "fake"], ["fake_prob"], axis=1),  # [B, 1]
        node("Squeeze", ["fake_prob", "one"], [c.SCORE_OUTPUT]),
        # The class map of the predicted class: index [B,1,1,1] expanded to [B,1,h,w].
        node("ArgMax", [c.LOGITS_OUTPUT], ["predicted"], axis=1, keepdims=1),
        node("Reshape", ["predicted", "col4"], ["predicted4"]),
        node("Shape", ["images"], ["in_shape"]),
        node("Slice", ["in_shape", "zero", "one"], ["batch"]),
        node("Concat", ["batch", "one", "hw"], ["index_shape"], axis=0),
        node("Expand", ["predicted4", "index_shape"], ["index"]),
        node("GatherElements", ["class_maps", "index"], ["chosen"], axis=1),
        node("Squeeze", ["chosen", "one"], ["raw_cam"]),  # [B, h, w]
        # Per-image min-max normalisation.
        node("ReduceMin", ["raw_cam"], ["low"], axes=[1, 2], keepdims=1),
        node("ReduceMax", ["raw_cam"], ["high"], axes=[1, 2], keepdims=1),
        node("Sub", ["raw_cam", "low"], ["shifted"]),
        node("Sub", ["high", "low"], ["span"]),
        node("Max", ["span", "eps"], ["span1"]),
        node("Div", ["shifted", "span1"], [c.CAM_OUTPUT]),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_cam",
        [helper.make_tensor_value_info(c.INPUT_NAME, TensorProto.UINT8, ["batch", 3, size, size])],
        [
            helper.make_tensor_value_info(c.SCORE_OUTPUT, TensorProto.FLOAT, ["batch"]),
            helper.make_tensor_value_info(c.LOGITS_OUTPUT, TensorProto.FLOAT, ["batch", 2]),
            helper.make_tensor_value_info(c.CAM_OUTPUT, TensorProto.FLOAT, ["batch", grid, grid]),
        ],
        [numpy_helper.from_array(value, name) for name, value in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="cyborg-tests")
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model.SerializeToString()


def write_model_version(
    root: str | Path,
    name: str = "tiny",
    version: int = 1,
    size: int = 32,
    stride: int = 8,
    seed: int | None = None,
    threshold: float = 0.5,
    batching: c.Batching = c.Batching(max_batch_size=16, max_queue_delay_ms=2.0, max_queue_size=256),
    calibration: dict | None = None,
    operating_points: dict | None = None,
) -> Path:
    """Write one version folder (model.onnx then model.json, the order export uses); returns it."""
    folder = Path(root) / name / str(version)
    folder.mkdir(parents=True, exist_ok=True)
    onnx_path = folder / c.ONNX_FILE
    onnx_path.write_bytes(build_onnx(size, stride, seed=version if seed is None else seed))
    contract = c.ModelContract(
        name=name,
        version=version,
        architecture="tiny_cam",
        input_height=size,
        input_width=size,
        cam_height=size // stride,
        cam_width=size // stride,
        mean=MEAN,
        std=STD,
        threshold=threshold,
        training={"saliency": "none"},
        files={c.ONNX_FILE: c.sha256_file(onnx_path)},
        batching=batching,
        created=c.utc_now(),
        calibration=calibration,
        operating_points=operating_points,
    )
    c.write_contract(folder, contract)
    return folder


def build_model_repository(root: str | Path, name: str = "tiny", versions=(1,), size: int = 32, **options) -> Path:
    """A model repository at `root` holding `name` at each of `versions`; returns `root`."""
    for version in versions:
        write_model_version(root, name, version, size=size, **options)
    return Path(root)


def reference_outputs(version_dir: str | Path, images: np.ndarray) -> dict[str, np.ndarray]:
    """The model's outputs for uint8 [B,3,H,W] computed in-process with ONNX Runtime."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(Path(version_dir) / c.ONNX_FILE), options, providers=["CPUExecutionProvider"])
    values = session.run(list(c.OUTPUT_NAMES), {c.INPUT_NAME: images})
    return dict(zip(c.OUTPUT_NAMES, values))


def random_images(count: int, size: int = 32, seed: int = 0) -> np.ndarray:
    """Distinct uint8 [count,3,size,size] images (smooth random patterns)."""
    rng = np.random.default_rng(seed)
    low = rng.integers(0, 256, (count, 3, 4, 4)).astype(np.uint8)
    return np.ascontiguousarray(low.repeat(size // 4, axis=2).repeat(size // 4, axis=3))


class RunningServer:
    """A real server on a loopback port, run by an event loop on a background thread.

    Tests talk to it over gRPC like any client; `call(coroutine_function)` runs something on the
    server's loop (a reload, a look at its state). Use as a context manager, or `start()`/`stop()`.
    """

    def __init__(self, repository: str | Path, **config):
        import asyncio
        import threading

        from serving.server import ServerConfig

        config.setdefault("host", "127.0.0.1")
        config.setdefault("port", 0)
        config.setdefault("metrics_port", 0)
        config.setdefault("intra_op_threads", 1)
        config.setdefault("decode_workers", 2)
        config.setdefault("grace_seconds", 5.0)
        self.config = ServerConfig(model_repository=str(repository), **config)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="test-server", daemon=True)
        self.server = None
        self.port = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def call(self, function, *args, timeout: float = 60):
        """Run `await function(*args)` on the server's loop and return its result."""
        import asyncio

        return asyncio.run_coroutine_threadsafe(function(*args), self.loop).result(timeout)

    def start(self) -> RunningServer:
        from serving.server import create_server

        self.thread.start()

        async def launch():
            self.server, self.port = await create_server(self.config)
            await self.server.start()

        self.call(launch)
        return self

    def stop(self, grace: float | None = None) -> None:
        if self.server is not None:
            self.call(self.server.stop, grace)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    def __enter__(self) -> RunningServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop(0)
