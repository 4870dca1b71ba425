"""The export graph: CamClassifier → ONNX with the contract's tensor names, checked against ONNX Runtime."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from core.errors import UserError
from core.contract import CAM_OUTPUT, INPUT_NAME, LOGITS_OUTPUT, OUTPUT_NAMES, SCORE_OUTPUT
from training.model import CamClassifier, fake_probability, select_cam

log = logging.getLogger(__name__)

OPSET = 18  # the dynamo exporter's minimum
# Parity with torch in fp32 (measured on ResNet-50: logits within 3e-5, CAM within 1.3e-4).
TOLERANCES = {SCORE_OUTPUT: 1e-4, LOGITS_OUTPUT: 1e-4, CAM_OUTPUT: 5e-4}


class ExportError(UserError):
    """An export step that failed in a way the user should know about (e.g. a parity mismatch)."""


class ExportModule(nn.Module):
    """uint8 images [B, 3, H, W] → (score [B], logits [B, classes], cam [B, h, w] of the predicted class):
    the outputs `core.contract.output_shapes` describes."""

    def __init__(self, model: CamClassifier):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out = self.model(images)
        predicted = out.logits.argmax(dim=1)
        return fake_probability(out.logits), out.logits.float(), select_cam(out.class_maps.float(), predicted)


def export_onnx(module: ExportModule, path: str | os.PathLike[str], height: int, width: int) -> str:
    """Write `module` to `path` as one ONNX file with a dynamic batch; return the exporter used.

    The dynamo exporter (`torch.export`, opset 18) is tried first; the TorchScript exporter only if
    it fails. The written model passes `onnx.checker`.
    """
    import onnx

    module = module.eval()
    example = (torch.randint(0, 256, (2, 3, height, width), dtype=torch.uint8),)
    names = dict(input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES), opset_version=OPSET)
    try:
        batch = torch.export.Dim("batch", min=1)
        torch.onnx.export(
            module, example, str(path), dynamo=True, external_data=False, verbose=False,
            dynamic_shapes={INPUT_NAME: {0: batch}}, **names,
        )
        exporter = "dynamo"
    except Exception as error:  # the dynamo exporter raises many types; fall back once, loudly
        log.warning("dynamo ONNX exporter failed (%s: %s); using the TorchScript exporter", type(error).__name__, error)
        Path(path).unlink(missing_ok=True)
        axes = {INPUT_NAME: {0: "batch"}, **{name: {0: "batch"} for name in OUTPUT_NAMES}}
        torch.onnx.export(module, example, str(path), dynamo=False, dynamic_axes=axes, **names)
        exporter = "torchscript"
    onnx.checker.check_model(str(path), full_check=True)
    return exporter


def ort_session(path: str | os.PathLike[str], threads: int | None = None, config_entries: dict[str, str] | None = None):
    """An ONNX Runtime session on the CPU provider (`config_entries`: session config, e.g. `engines.cpu.exact_int8_entries`)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    for key, value in (config_entries or {}).items():
        options.add_session_config_entry(key, value)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_onnx(session, images: np.ndarray) -> dict[str, np.ndarray]:
    return dict(zip(OUTPUT_NAMES, session.run(list(OUTPUT_NAMES), {INPUT_NAME: images})))


def run_torch(module: ExportModule, images: np.ndarray) -> dict[str, np.ndarray]:
    with torch.no_grad():
        outputs = module.eval()(torch.from_numpy(images))
    return dict(zip(OUTPUT_NAMES, (tensor.numpy() for tensor in outputs)))


def compare(reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray]) -> dict[str, float]:
    """Largest absolute difference per output; CAMs compared only where both pick the same class."""
    diffs = {name: float(np.abs(reference[name] - candidate[name]).max()) for name in (SCORE_OUTPUT, LOGITS_OUTPUT)}
    same = reference[LOGITS_OUTPUT].argmax(1) == candidate[LOGITS_OUTPUT].argmax(1)
    cams = np.abs(reference[CAM_OUTPUT][same] - candidate[CAM_OUTPUT][same])
    diffs[CAM_OUTPUT] = float(cams.max()) if cams.size else 0.0
    diffs["class_agreement"] = float(same.mean())
    return diffs


def check_parity(module: ExportModule, onnx_path: str | os.PathLike[str], images: np.ndarray) -> dict[str, float]:
    """Compare ONNX Runtime (CPU) with torch on `images`; raise ExportError beyond TOLERANCES."""
    session = ort_session(onnx_path)
    reference, candidate = run_torch(module, images), run_onnx(session, images)
    for name in OUTPUT_NAMES:
        if candidate[name].shape != reference[name].shape:
            raise ExportError(f"ONNX output {name!r} has shape {candidate[name].shape}, torch gives {reference[name].shape}")
    diffs = compare(reference, candidate)
    bad = [f"{name} differs by {diffs[name]:.2e} (limit {limit:.0e})" for name, limit in TOLERANCES.items() if diffs[name] > limit]
    if bad:
        raise ExportError("ONNX Runtime does not match torch: " + "; ".join(bad) + "; nothing written")
    return diffs
