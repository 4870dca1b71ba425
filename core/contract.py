"""The model contract: what a deployable model takes and returns (`model.json`).

This module is the one home of the facts that training, export and serving must agree on: tensor
names, output shapes, class order, file names, the preprocessing recipe and the metadata schema.
It uses the standard library only, so the serving side reads it without torch, and export writes it.
How images are decoded and resized lives in `core.images`; how a threshold is chosen, in
`core.thresholds`.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from core.errors import ContractError

SCHEMA_VERSION = 1
CONTRACT_FILE = "model.json"
ONNX_FILE = "model.onnx"
INT8_ONNX_FILE = "model.int8.onnx"
TENSORRT_FILE = "model.plan"
TRITON_CONFIG_FILE = "config.pbtxt"
TRITON_PLATFORM = "onnxruntime_onnx"  # Triton's platform name for ONNX models (config.pbtxt, model metadata)

# Graph input: uint8 RGB images, NCHW, dynamic batch, the model's fixed height and width.
# Normalisation (mean/std) happens inside the graph.
INPUT_NAME = "images"
INPUT_DTYPE = "uint8"
INPUT_LAYOUT = "NCHW"
# Graph outputs.
SCORE_OUTPUT = "score"  # float32 [B]: probability that the image is fake
LOGITS_OUTPUT = "logits"  # float32 [B, 2]
CAM_OUTPUT = "cam"  # float32 [B, h, w] in [0, 1], CAM of the predicted class
OUTPUT_NAMES = (SCORE_OUTPUT, LOGITS_OUTPUT, CAM_OUTPUT)

# Class order of the logits. Index 1 is the "fake" (synthetic) class; score = softmax[:, 1].
CLASS_NAMES = ("real", "fake")
FAKE_INDEX = 1
REAL_INDEX = 1 - FAKE_INDEX
NUM_CLASSES = len(CLASS_NAMES)

# How images are brought to the input size, in training and in serving alike (`core.images.prepare`):
# with a `scale` (the face's recorded scale in pixels), the image is resized, keeping its aspect
# ratio, so that its shorter side is `scale` (not resampled at all when it already is), then
# centre-cropped to H x W; training takes random crops of the same scaled image. Without one
# (scale 0: model.json files written before the field existed) it is resized straight to H x W.
RESIZE_METHOD = "bilinear"  # PIL.Image.Resampling.BILINEAR (antialiased)
LEGACY_SCALE = 0  # "resize straight to H x W, no crop"

# The numbers model.onnx computes in: "fp32", or "int8" (`cyborg export --precision int8`: a static
# QDQ graph for CPUs, its calibration and operating points fitted on its own scores).
PRECISIONS = ("fp32", "int8")
# How many bits an int8 graph's weights use: 7 ([-64, 63], the default: exact on every CPU) or 8
# ([-127, 127]: saturates in the int8 kernels of x86 CPUs without VNNI, `engines.cpu`).
INT8_WEIGHT_BITS = (7, 8)

SALIENCY_SOURCES = ("human", "proxy", "none")

# Calibration and operating points (optional; the math is `core.thresholds`'). `calibration` maps the
# score to the calibrated fake probability, sigmoid(a * logit(score) + b): "temperature" has a = 1 /
# temperature and b = 0; "platt" fits both; no `calibration` (or "none") means probability = score.
# `operating_points` names thresholds on that probability ({"eer": t, "fpr1": t, "fpr5": t} ...) and
# which of them is the model's "default"; `threshold` is then the default point's threshold carried
# back to the raw score, so `score >= threshold` and `probability >= operating_points[default]` agree.
CALIBRATION_PARAMETERS = {"none": (), "temperature": ("temperature",), "platt": ("a", "b")}
POSITIVE_PARAMETERS = ("temperature", "a")  # a calibration must keep the scores' order
DEFAULT_POINT_KEY = "default"  # the key of operating_points that names the default point


@dataclasses.dataclass(frozen=True)
class Batching:
    """Dynamic batching settings a server applies to this model."""

    max_batch_size: int = 32
    max_queue_delay_ms: float = 2.0
    max_queue_size: int = 1024


@dataclasses.dataclass(frozen=True)
class ModelContract:
    """Everything a server needs to know about one model version."""

    name: str
    version: int
    architecture: str
    input_height: int
    input_width: int
    cam_height: int
    cam_width: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    threshold: float
    metrics: dict[str, Any] = dataclasses.field(default_factory=dict)
    training: dict[str, Any] = dataclasses.field(default_factory=dict)
    files: dict[str, str] = dataclasses.field(default_factory=dict)
    batching: Batching = Batching()
    created: str = ""
    input_name: str = INPUT_NAME
    input_dtype: str = INPUT_DTYPE
    input_layout: str = INPUT_LAYOUT
    output_names: tuple[str, ...] = OUTPUT_NAMES
    class_names: tuple[str, ...] = CLASS_NAMES
    resize: str = RESIZE_METHOD
    scale: int = LEGACY_SCALE  # shorter side in pixels before the centre crop; 0: resize straight to H x W
    calibration: dict[str, Any] | None = None  # {"method": "platt", "a": .., "b": ..}; None: probability = score
    operating_points: dict[str, Any] | None = None  # {"eer": t, "fpr1": t, "fpr5": t, "default": "fpr1"}; t on the probability
    precision: str = "fp32"  # one of PRECISIONS: what model.onnx computes in
    schema_version: int = SCHEMA_VERSION

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of one image."""
        return (3, self.input_height, self.input_width)

    @property
    def cam_shape(self) -> tuple[int, int]:
        return (self.cam_height, self.cam_width)

    @property
    def fp32_source(self) -> str:
        """For an int8 version, the sha256 of the fp32 model.onnx it was quantised from (as written
        by `cyborg export --precision int8` under metrics.int8); "" for fp32 versions or when unrecorded."""
        if self.precision != "int8":
            return ""
        record = self.metrics.get("int8")
        return str(record.get("fp32_sha256", "")) if isinstance(record, dict) else ""

    @property
    def int8_weight_bits(self) -> int:
        """For an int8 version, how many bits its weights use (metrics.int8.weight_bits: 7 by default
        since `cyborg export` recorded it, 8 before, when it was not recorded); 0 for fp32 versions."""
        if self.precision != "int8":
            return 0
        record = self.metrics.get("int8")
        bits = record.get("weight_bits", 8) if isinstance(record, dict) else 8
        return int(bits) if isinstance(bits, int) and not isinstance(bits, bool) and bits in INT8_WEIGHT_BITS else 8

    def output_shapes(self, batch: int = -1) -> dict[str, tuple[int, ...]]:
        """Each output's shape for `batch` images (-1: a dynamic batch dimension)."""
        return output_shapes(batch, self.cam_shape)

    def label(self, score: float) -> str:
        """The class name for a fake score under this model's threshold."""
        return label_for(score, self.threshold)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelContract:
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ContractError(f"unknown keys in {CONTRACT_FILE}: {', '.join(unknown)}")
        values = dict(data)
        try:
            values["batching"] = Batching(**values.get("batching", {}))
            for key in ("mean", "std", "output_names", "class_names"):
                if key in values:
                    values[key] = tuple(values[key])
            contract = cls(**values)
        except TypeError as error:
            raise ContractError(f"invalid {CONTRACT_FILE}: {error}") from error
        contract.validate()
        return contract

    def validate(self) -> None:
        """Raise ContractError naming the first field that breaks the contract."""
        problems = []
        if self.schema_version != SCHEMA_VERSION:
            problems.append(f"schema_version {self.schema_version} (this cyborg reads {SCHEMA_VERSION})")
        if not self.name or "/" in self.name:
            problems.append(f"name {self.name!r}")
        if not isinstance(self.version, int) or self.version < 1:
            problems.append(f"version {self.version!r} (a positive integer)")
        for field in ("input_height", "input_width", "cam_height", "cam_width"):
            value = getattr(self, field)
            if not isinstance(value, int) or value < 1:
                problems.append(f"{field} {value!r}")
        if len(self.mean) != 3 or len(self.std) != 3 or any(s <= 0 for s in self.std):
            problems.append(f"mean/std {self.mean}/{self.std}")
        if not 0.0 <= float(self.threshold) <= 1.0:
            problems.append(f"threshold {self.threshold} (outside [0, 1])")
        if not isinstance(self.scale, int) or (self.scale != LEGACY_SCALE and self.scale < max(self.input_height, self.input_width)):
            problems.append(f"scale {self.scale!r} (0, or at least the input's larger side)")
        if self.input_name != INPUT_NAME or tuple(self.output_names) != OUTPUT_NAMES:
            problems.append(f"tensor names {self.input_name}/{self.output_names} (expected {INPUT_NAME}/{OUTPUT_NAMES})")
        if self.input_dtype != INPUT_DTYPE or self.input_layout != INPUT_LAYOUT:
            problems.append(f"input {self.input_dtype} {self.input_layout} (expected {INPUT_DTYPE} {INPUT_LAYOUT})")
        if self.precision not in PRECISIONS:
            problems.append(f"precision {self.precision!r} (one of {', '.join(PRECISIONS)})")
        if self.calibration is not None:
            problems += calibration_problems(self.calibration)
        if self.operating_points is not None:
            problems += operating_points_problems(self.operating_points)
        saliency = self.training.get("saliency", "none")
        if saliency not in SALIENCY_SOURCES:
            problems.append(f"training.saliency {saliency!r} (one of {', '.join(SALIENCY_SOURCES)})")
        if self.batching.max_batch_size < 1 or self.batching.max_queue_delay_ms < 0 or self.batching.max_queue_size < 1:
            problems.append(f"batching {self.batching}")
        if problems:
            raise ContractError(f"invalid {CONTRACT_FILE} for {self.name!r} v{self.version}: " + "; ".join(problems))


def called_fake(scores, threshold: float):
    """The decision rule model.json's threshold stands for: a score at or above it is called fake.

    Works on one score or on a numpy array of them (then an array of bools).
    """
    return scores >= threshold


def label_for(value: float, threshold: float) -> str:
    """The class name `called_fake` gives a score (or calibrated probability) at `threshold`."""
    return CLASS_NAMES[FAKE_INDEX] if called_fake(value, threshold) else CLASS_NAMES[REAL_INDEX]


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def calibration_problems(calibration: Any) -> list[str]:
    """What is wrong with a model.json `calibration` object (empty when nothing is)."""
    if not isinstance(calibration, dict) or calibration.get("method") not in CALIBRATION_PARAMETERS:
        return [f"calibration {calibration!r} (an object with method one of {', '.join(CALIBRATION_PARAMETERS)})"]
    method = calibration["method"]
    expected = {"method", *CALIBRATION_PARAMETERS[method]}
    if set(calibration) != expected:
        return [f"calibration {calibration!r} (method {method} takes {', '.join(sorted(expected - {'method'})) or 'no parameters'})"]
    bad = [key for key in CALIBRATION_PARAMETERS[method] if not _number(calibration[key]) or (key in POSITIVE_PARAMETERS and calibration[key] <= 0)]
    return [f"calibration {key} {calibration[key]!r} (a finite number{', above 0' if key in POSITIVE_PARAMETERS else ''})" for key in bad]


def operating_points_problems(points: Any) -> list[str]:
    """What is wrong with a model.json `operating_points` object (empty when nothing is)."""
    if not isinstance(points, dict):
        return [f"operating_points {points!r} (an object of name: threshold and a default)"]
    named = {name: value for name, value in points.items() if name != DEFAULT_POINT_KEY}
    problems = []
    for name, value in named.items():
        try:
            float(name)
            problems.append(f"operating point name {name!r} (a number is read as a threshold, not a name)")
        except ValueError:
            pass
        if not name or not _number(value) or not 0.0 <= value <= 1.0:
            problems.append(f"operating point {name!r}: {value!r} (a threshold in [0, 1])")
    if points.get(DEFAULT_POINT_KEY) not in named:
        problems.append(f"operating_points.default {points.get(DEFAULT_POINT_KEY)!r} (one of {', '.join(named) or 'no named points'})")
    return problems


def output_shapes(batch: int, cam_shape: tuple[int, int]) -> dict[str, tuple[int, ...]]:
    """The graph's output shapes for `batch` images: score [B], logits [B, classes], cam [B, h, w]."""
    return {SCORE_OUTPUT: (batch,), LOGITS_OUTPUT: (batch, NUM_CLASSES), CAM_OUTPUT: (batch, *cam_shape)}


def sha256_file(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def read_contract(model_dir: str | os.PathLike[str], verify: bool = True) -> ModelContract:
    """Read and validate `<model_dir>/model.json`; with `verify`, check every file's sha256."""
    path = Path(model_dir) / CONTRACT_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as error:
        raise ContractError(f"{path}: no {CONTRACT_FILE}") from error
    except (OSError, ValueError) as error:
        raise ContractError(f"{path}: unreadable {CONTRACT_FILE}: {error}") from error
    if not isinstance(data, dict):
        raise ContractError(f"{path}: {CONTRACT_FILE} must hold a JSON object")
    contract = ModelContract.from_dict(data)
    if verify:
        verify_files(model_dir, contract)
    return contract


def verify_files(model_dir: str | os.PathLike[str], contract: ModelContract) -> None:
    """Raise ContractError if a listed file is missing or its sha256 differs from model.json."""
    if ONNX_FILE not in contract.files:
        raise ContractError(f"{model_dir}: {CONTRACT_FILE} lists no {ONNX_FILE}")
    for name, expected in contract.files.items():
        path = Path(model_dir) / name
        if not path.is_file():
            raise ContractError(f"{path}: listed in {CONTRACT_FILE} but missing")
        actual = sha256_file(path)
        if actual != expected:
            raise ContractError(f"{path}: sha256 {actual[:12]}… does not match {CONTRACT_FILE} ({expected[:12]}…)")


def write_contract(model_dir: str | os.PathLike[str], contract: ModelContract) -> Path:
    """Validate and write `<model_dir>/model.json` atomically."""
    contract.validate()
    path = Path(model_dir) / CONTRACT_FILE
    fd, tmp = tempfile.mkstemp(dir=model_dir, prefix=".model.json.")
    with os.fdopen(fd, "w") as handle:
        json.dump(contract.to_dict(), handle, indent=2, sort_keys=False)
        handle.write("\n")
    os.chmod(tmp, 0o644)  # mkstemp makes 0600; model files are meant to be read by a server's user
    os.replace(tmp, path)
    return path
