"""TensorRT export: a clear error where it cannot run, an FP16 plan matching ONNX Runtime where it can."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import numpy as np
import pytest

from cyborg.cli import main
from core import contract as c

ROOT = Path(__file__).resolve().parents[1]


def tensorrt_unavailable() -> str | None:
    """Why the TensorRT tests cannot run here, or None."""
    if importlib.util.find_spec("tensorrt") is None:
        return "TensorRT's Python package (tensorrt) is not installed: it needs an NVIDIA GPU machine"
    try:
        import tensorrt  # noqa: F401
    except Exception as error:  # a broken install (missing libnvinfer) also means "cannot run here"
        return f"tensorrt does not import: {error}"
    import torch

    return None if torch.cuda.is_available() else "no CUDA device for TensorRT"


def test_module_level_code_never_imports_tensorrt():
    """Only functions may import tensorrt, so everything else works where it is missing."""
    offenders = []
    for path in [p for package in ("cyborg", "core", "engines", "training", "serving", "benchmarks") for p in ROOT.glob(f"{package}/**/*.py")]:
        for node in ast.parse(path.read_text()).body:  # module-level statements only
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            if any(name.split(".")[0] == "tensorrt" for name in names):
                offenders.append(str(path.relative_to(ROOT)))
    assert offenders == []


def test_tensorrt_flag_without_tensorrt_is_a_clear_error(tmp_path, capsys):
    if tensorrt_unavailable() is None:
        pytest.skip("TensorRT and CUDA are available here")
    code = main(["export", str(tmp_path / "missing.pt"), "--repository", str(tmp_path / "models"),
                 "--name", "det", "--version", "1", "--tensorrt"])
    assert code == 2
    err = capsys.readouterr().err
    assert "--tensorrt" in err and ("TensorRT" in err or "CUDA" in err)
    assert not (tmp_path / "models").exists()


def test_fp16_plan_matches_onnx_runtime(tmp_path):
    reason = tensorrt_unavailable()
    if reason:
        pytest.skip(reason)
    from tests.test_export import SIZE, make_checkpoint
    from training.onnx_export import compare, ort_session, run_onnx
    from training.tensorrt import FP16_TOLERANCES, run_engine

    checkpoint = make_checkpoint(tmp_path)
    repo = tmp_path / "models"
    assert main(["export", str(checkpoint), "--repository", str(repo), "--name", "det", "--version", "1", "--tensorrt"]) == 0
    version = repo / "det" / "1"
    contract = c.read_contract(version)
    assert c.TENSORRT_FILE in contract.files
    assert contract.metrics["tensorrt"]["precision"] == "fp16"
    session = ort_session(version / c.ONNX_FILE)
    for batch in (1, 3, 32):  # the profile's min, a middle size and its max
        images = np.random.default_rng(batch).integers(0, 256, (batch, 3, SIZE, SIZE), dtype=np.uint8)
        engine = run_engine(version / c.TENSORRT_FILE, images)
        assert engine[c.CAM_OUTPUT].shape == (batch, *contract.cam_shape)
        diffs = compare(run_onnx(session, images), engine)
        assert all(diffs[name] <= limit for name, limit in FP16_TOLERANCES.items()), diffs
