"""Engine backends, shared by the server and by export: ONNX Runtime (TensorRT -> CUDA -> CPU providers) and native TensorRT plans.

A backend runs uint8 [B,3,H,W] through a model and returns {"score", "logits", "cam"} as numpy
arrays. `load_backend` picks one for a model version folder: `auto` uses a TensorRT plan
(`model.plan`) when the `tensorrt` package imports and a GPU is asked for or present, and ONNX
Runtime otherwise. ONNX Runtime gets only the providers that are actually available, so it never
logs a noisy fallback.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Protocol

import numpy as np

from core.contract import INPUT_NAME, ONNX_FILE, OUTPUT_NAMES, TENSORRT_FILE, ModelContract
from core.errors import ContractError
from engines.cpu import exact_int8_entries

log = logging.getLogger(__name__)

BACKENDS = ("auto", "onnxruntime", "tensorrt")
DEVICES = ("auto", "cpu", "cuda")
GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")


class Backend(Protocol):
    name: str
    device: str

    def run(self, images: np.ndarray) -> dict[str, np.ndarray]: ...


def cuda_device_count() -> int:
    """Number of CUDA devices visible (0 where there is no driver); no torch needed."""
    import ctypes

    for library in ("libcuda.so.1", "libcuda.so"):
        try:
            cuda = ctypes.CDLL(library)
        except OSError:
            continue
        count = ctypes.c_int(0)
        if cuda.cuInit(0) == 0 and cuda.cuDeviceGetCount(ctypes.byref(count)) == 0:
            return count.value
        return 0
    return 0


def onnxruntime_providers(device: str = "auto") -> list[str]:
    """ONNX Runtime providers to ask for, best first, limited to those that can work here."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    wanted: list[str] = []
    if device in ("auto", "cuda") and cuda_device_count() > 0:
        wanted += [p for p in GPU_PROVIDERS if p in available]
    if device == "cuda" and not wanted:
        raise ContractError("--device cuda: no CUDA device or no CUDA provider in onnxruntime")
    return wanted + ["CPUExecutionProvider"]


class OnnxRuntimeBackend:
    """An ONNX Runtime session for one model version."""

    name = "onnxruntime"

    def __init__(self, path: str | Path, device: str = "auto", intra_op_threads: int = 0, memory_arena: bool = True,
                 config_entries: dict[str, str] | None = None):  # fmt: skip
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        options.enable_cpu_mem_arena = memory_arena  # off: activations freed after each run (small batches only)
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Idle intra-op threads otherwise spin between batches and take CPU from decoding and gRPC
        # (docs/benchmarks.md, "Serving throughput": 20.6-23.2 -> 14.1-14.8 ms of server CPU per image).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.config_entries = dict(config_entries or {})
        for key, value in self.config_entries.items():
            options.add_session_config_entry(key, value)
        providers = onnxruntime_providers(device)
        try:
            self.session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as error:  # noqa: BLE001 - ORT raises its own Fail/InvalidGraph types
            raise ContractError(f"{path}: ONNX Runtime cannot load it ({str(error).splitlines()[0]})") from error
        used = self.session.get_providers()
        self.device = "cuda" if used[0] in GPU_PROVIDERS else "cpu"
        self.providers = used
        inputs = [i.name for i in self.session.get_inputs()]
        outputs = [o.name for o in self.session.get_outputs()]
        if inputs != [INPUT_NAME] or sorted(outputs) != sorted(OUTPUT_NAMES):
            raise ContractError(f"{path}: graph has inputs {inputs} and outputs {outputs}; expected [{INPUT_NAME}] -> {list(OUTPUT_NAMES)}")

    def run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        values = self.session.run(list(OUTPUT_NAMES), {INPUT_NAME: images})
        return dict(zip(OUTPUT_NAMES, values))


class TensorRTBackend:
    """A serialized TensorRT engine (`model.plan`) run with the TensorRT 10 tensor API.

    Input and outputs live in device buffers sized for the engine's largest profile batch;
    execution uses one CUDA stream. Needs the `tensorrt` and `cuda-python` packages and a GPU.
    """

    name = "tensorrt"
    device = "cuda"

    def __init__(self, path: str | Path, contract: ModelContract):
        import tensorrt as trt
        from cuda.bindings import runtime as cudart  # cuda-python

        self._trt, self._cudart = trt, cudart
        logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(logger)
        engine = runtime.deserialize_cuda_engine(Path(path).read_bytes())
        if engine is None:
            raise ContractError(f"{path}: TensorRT cannot deserialize this engine (built for another TensorRT or GPU?)")
        self.engine = engine
        self.context = engine.create_execution_context()
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        if sorted(names) != sorted((INPUT_NAME, *OUTPUT_NAMES)):
            raise ContractError(f"{path}: engine tensors {names}; expected {INPUT_NAME} and {list(OUTPUT_NAMES)}")
        self.max_batch = engine.get_tensor_profile_shape(INPUT_NAME, 0)[2][0]
        self.shapes = {INPUT_NAME: (self.max_batch, *contract.input_shape), **contract.output_shapes(self.max_batch)}
        self.dtypes = {name: np.dtype(trt.nptype(engine.get_tensor_dtype(name))) for name in names}
        self.buffers = {}
        for name, shape in self.shapes.items():
            nbytes = int(np.prod(shape)) * self.dtypes[name].itemsize
            self.buffers[name] = self._check(cudart.cudaMalloc(nbytes))
            self.context.set_tensor_address(name, self.buffers[name])
        self.stream = self._check(cudart.cudaStreamCreate())

    def _check(self, result):
        error, *values = result
        if error != self._cudart.cudaError_t.cudaSuccess:
            raise RuntimeError(f"CUDA error {error}")
        return values[0] if values else None

    def run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        if len(images) > self.max_batch:  # larger than the engine's profile: run in pieces
            parts = [self.run(images[i : i + self.max_batch]) for i in range(0, len(images), self.max_batch)]
            return {name: np.concatenate([p[name] for p in parts]) for name in OUTPUT_NAMES}
        cudart = self._cudart
        kind = cudart.cudaMemcpyKind
        batch = len(images)
        images = np.ascontiguousarray(images, dtype=self.dtypes[INPUT_NAME])
        self.context.set_input_shape(INPUT_NAME, images.shape)
        self._check(cudart.cudaMemcpyAsync(self.buffers[INPUT_NAME], images.ctypes.data, images.nbytes, kind.cudaMemcpyHostToDevice, self.stream))
        if not self.context.execute_async_v3(self.stream):
            raise RuntimeError("TensorRT execution failed")
        outputs = {}
        for name in OUTPUT_NAMES:
            host = np.empty((batch, *self.shapes[name][1:]), self.dtypes[name])
            self._check(cudart.cudaMemcpyAsync(host.ctypes.data, self.buffers[name], host.nbytes, kind.cudaMemcpyDeviceToHost, self.stream))
            outputs[name] = host
        self._check(cudart.cudaStreamSynchronize(self.stream))
        return outputs

    def __del__(self):
        for pointer in getattr(self, "buffers", {}).values():
            self._cudart.cudaFree(pointer)


def tensorrt_available() -> bool:
    try:
        import tensorrt  # noqa: F401
        from cuda.bindings import runtime  # noqa: F401
    except ImportError:
        return False
    return True


def load_backend(
    folder: str | Path,
    contract: ModelContract,
    backend: str = "auto",
    device: str = "auto",
    intra_op_threads: int = 0,
) -> Backend:
    """The engine for one model version folder, chosen by `backend` and `device`."""
    folder = Path(folder)
    plan = folder / TENSORRT_FILE
    if backend not in BACKENDS or device not in DEVICES:
        raise ContractError(f"backend {backend!r} / device {device!r}: choose from {BACKENDS} / {DEVICES}")
    if backend == "tensorrt" or (backend == "auto" and device != "cpu" and plan.is_file() and tensorrt_available() and cuda_device_count() > 0):
        if not plan.is_file():
            raise ContractError(f"{plan}: --backend tensorrt needs a TensorRT engine here")
        if not tensorrt_available():
            raise ContractError("--backend tensorrt: the tensorrt and cuda-python packages are not installed")
        if TENSORRT_FILE not in contract.files:
            raise ContractError(f"{plan}: not listed (with a checksum) in model.json")
        return TensorRTBackend(plan, contract)
    entries = exact_int8_entries(contract.int8_weight_bits) if device != "cuda" else {}
    if entries:
        log.warning("%s v%d is an int8 graph with 8-bit weights: this CPU (x86-64 without VNNI) adds int8 products in 16 "
                    "bits, which saturate and change its scores, so ONNX Runtime runs it with exact uint8 kernels "
                    "(session.x64quantprecision: the scores it was validated with, at about fp32 speed); re-export it "
                    "with 7-bit weights (cyborg export --precision int8, the default) for int8 speed here",
                    contract.name, contract.version)  # fmt: skip
    engine = OnnxRuntimeBackend(folder / ONNX_FILE, device=device, intra_op_threads=intra_op_threads, config_entries=entries)
    if contract.precision == "int8" and engine.device == "cuda":
        log.warning("%s v%d is an int8 graph made for CPUs (cyborg export --precision int8); on CUDA it runs slower than "
                    "fp32: serve the fp32 version it was quantised from beside it (requests naming no version then get that one)", contract.name, contract.version)  # fmt: skip
    return engine
