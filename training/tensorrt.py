"""TensorRT: build `model.plan` (FP16, dynamic batch) from the exported ONNX and check it against ONNX Runtime.

Written against TensorRT 10's Python API (trt.Builder, OnnxParser, optimisation profiles). The
built engine is run by the server's own runner (`engines.runtime.TensorRTBackend`, cuda-python),
so export checks exactly what will be served. TensorRT is imported only inside these functions.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from core.contract import CAM_OUTPUT, INPUT_NAME, LOGITS_OUTPUT, SCORE_OUTPUT, Batching, ModelContract
from core.errors import UserError

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
    from engines.runtime import tensorrt_available

    if not tensorrt_available():
        raise UserError("--tensorrt: the cuda-python package does not import here (pip install cuda-python); "
                        "export checks the engine with the server's runner, which needs it")
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


def run_engine(plan_path: Path, images: np.ndarray, contract: ModelContract | None = None) -> dict[str, np.ndarray]:
    """Run a plan as the server runs it (`engines.runtime.TensorRTBackend`) on uint8 images [B, 3, H, W];
    float32 outputs by name. The contract defaults to the model.json next to the plan."""
    from core.contract import read_contract
    from engines.runtime import TensorRTBackend

    require_tensorrt()
    contract = contract or read_contract(plan_path.parent, verify=False)
    return {name: value.astype(np.float32) for name, value in TensorRTBackend(plan_path, contract).run(images).items()}


def check_engine(onnx_path: Path, plan_path: Path, images: np.ndarray, contract: ModelContract) -> dict[str, float]:
    """Compare the engine, run as the server runs it, with ONNX Runtime (CPU) on `images`;
    raise UserError beyond FP16_TOLERANCES."""
    from training.onnx_export import compare, ort_session, run_onnx

    diffs = compare(run_onnx(ort_session(onnx_path), images), run_engine(plan_path, images, contract))
    bad = [f"{name} differs by {diffs[name]:.2e} (limit {limit:.0e})" for name, limit in FP16_TOLERANCES.items() if diffs[name] > limit]
    if bad:
        raise UserError(f"--tensorrt: {plan_path.name} does not match ONNX Runtime: " + "; ".join(bad))
    return diffs


def build_and_check(onnx_path: Path, plan_path: Path, images: np.ndarray, contract: ModelContract) -> dict[str, Any]:
    """Build model.plan for `contract`'s batch size and check it; the figures for model.json."""
    max_batch = contract.batching.max_batch_size
    build_engine(onnx_path, plan_path, max_batch=max_batch)
    trt = require_tensorrt()
    diffs = check_engine(onnx_path, plan_path, images, contract)
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
