"""TensorRT: build `model.plan` (FP16, dynamic batch) from the exported ONNX and check it against ONNX Runtime.

Written against TensorRT 10's Python API (trt.Builder, OnnxParser, optimisation profiles,
set_input_shape / set_tensor_address / execute_async_v3), with CUDA memory from torch. TensorRT
is imported only inside these functions: nothing else in cyborg needs it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from cyborg.errors import UserError
from serving.contract import CAM_OUTPUT, INPUT_NAME, LOGITS_OUTPUT, OUTPUT_NAMES, SCORE_OUTPUT, Batching

log = logging.getLogger(__name__)

# FP16 against ONNX Runtime's fp32 (CAMs compared where both pick the same class).
FP16_TOLERANCES = {SCORE_OUTPUT: 1e-2, LOGITS_OUTPUT: 5e-2, CAM_OUTPUT: 5e-2}
WORKSPACE_BYTES = 2 << 30


def require_tensorrt():
    """The tensorrt module, or a UserError saying why --tensorrt cannot run here."""
    try:
        import tensorrt as trt
    except ImportError as error:
        raise UserError(
            f"--tensorrt: TensorRT's Python package does not import here ({error}); install it "
            "(pip install tensorrt) on a machine with an NVIDIA GPU, or export without --tensorrt"
        ) from error
    import torch

    if not torch.cuda.is_available():
        raise UserError("--tensorrt: no CUDA device visible to torch; TensorRT engines are built on the GPU they run on")
    return trt


def build_engine(onnx_path: Path, plan_path: Path, max_batch: int = Batching().max_batch_size, fp16: bool = True) -> None:
    """Parse `onnx_path`, build an engine with a batch profile 1 / max_batch//2 / max_batch, write `plan_path`."""
    trt = require_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise UserError(f"--tensorrt: TensorRT cannot parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    shape = tuple(network.get_input(0).shape)[1:]
    profile = builder.create_optimization_profile()
    profile.set_shape(INPUT_NAME, (1, *shape), (max(1, max_batch // 2), *shape), (max_batch, *shape))
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise UserError(f"--tensorrt: TensorRT failed to build an engine from {onnx_path} (see its log above)")
    plan_path.write_bytes(bytes(serialized))


def run_engine(plan_path: Path, images: np.ndarray) -> dict[str, np.ndarray]:
    """Run a serialized engine on uint8 images [B, 3, H, W]; outputs by name, as numpy."""
    trt = require_tensorrt()
    import torch

    logger = trt.Logger(trt.Logger.WARNING)
    engine = trt.Runtime(logger).deserialize_cuda_engine(plan_path.read_bytes())
    if engine is None:
        raise UserError(f"{plan_path}: TensorRT cannot deserialize this engine (built by another TensorRT or GPU?)")
    context = engine.create_execution_context()
    device_input = torch.from_numpy(np.ascontiguousarray(images)).cuda()
    context.set_input_shape(INPUT_NAME, tuple(device_input.shape))
    context.set_tensor_address(INPUT_NAME, device_input.data_ptr())
    outputs = {}
    for name in OUTPUT_NAMES:
        dtype = torch.from_numpy(np.empty(0, dtype=trt.nptype(engine.get_tensor_dtype(name)))).dtype
        outputs[name] = torch.empty(tuple(context.get_tensor_shape(name)), dtype=dtype, device="cuda")
        context.set_tensor_address(name, outputs[name].data_ptr())
    stream = torch.cuda.Stream()
    if not context.execute_async_v3(stream.cuda_stream):
        raise UserError(f"{plan_path}: TensorRT execution failed")
    stream.synchronize()
    return {name: tensor.float().cpu().numpy() for name, tensor in outputs.items()}


def check_engine(onnx_path: Path, plan_path: Path, images: np.ndarray) -> dict[str, float]:
    """Compare the engine with ONNX Runtime (CPU) on `images`; raise UserError beyond FP16_TOLERANCES."""
    from training.onnx_export import compare, ort_session, run_onnx

    diffs = compare(run_onnx(ort_session(onnx_path), images), run_engine(plan_path, images))
    bad = [f"{name} differs by {diffs[name]:.2e} (limit {limit:.0e})" for name, limit in FP16_TOLERANCES.items() if diffs[name] > limit]
    if bad:
        raise UserError(f"--tensorrt: {plan_path.name} does not match ONNX Runtime: " + "; ".join(bad))
    return diffs


def build_and_check(onnx_path: Path, plan_path: Path, images: np.ndarray, max_batch: int = Batching().max_batch_size) -> dict[str, Any]:
    """Build model.plan and check it; the figures for model.json."""
    build_engine(onnx_path, plan_path, max_batch=max_batch)
    trt = require_tensorrt()
    diffs = check_engine(onnx_path, plan_path, images)
    import torch

    return {
        "file": plan_path.name,
        "precision": "fp16",
        "profile_batch": [1, max(1, max_batch // 2), max_batch],
        "tensorrt": trt.__version__,
        "gpu": torch.cuda.get_device_name(),
        "max_abs_diff_vs_onnxruntime": diffs,
        "note": "a TensorRT plan runs only on the GPU model and TensorRT version it was built with",
    }
