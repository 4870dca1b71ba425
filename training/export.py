"""Checkpoint → model repository entry: `<repo>/<name>/<version>/` with model.onnx and model.json.

Everything is built in a temporary folder inside the repository and renamed into place at the end,
so a failure at any step leaves the repository as it was. Layout (Triton's model repository):

    <repo>/<name>/config.pbtxt            Triton's config (copy of the newest version's)
    <repo>/<name>/<version>/model.onnx    fp32 graph: images uint8 [B,3,H,W] → score, logits, cam
    <repo>/<name>/<version>/model.json    the contract serving reads (sha256 of every file below)
    <repo>/<name>/<version>/config.pbtxt  the same config, kept with the version it describes
    <repo>/<name>/<version>/model.int8.onnx, model.plan   with --int8, --tensorrt

With --precision int8, model.onnx is the statically quantised graph itself (training.quantize) and
the calibration and operating points are fitted on its own validation scores.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np

from core import contract as c
from core.errors import UserError
from core.images import load_images, spread
from core.thresholds import (
    CALIBRATION_CHOICES,
    DEFAULT_OPERATING_POINT,
    compare_calibrations,
    expected_calibration_error,
    fit_calibration,
    fit_operating_points,
    fit_pooled_operating_points,
    fixed_threshold,
    log_loss,
    operating_point,
    point_rule,
)
from training.checkpoint import Checkpoint, as_checkpoint, read_checkpoint
from training.perturb import Perturbation, parse_perturbations
from training.publish import make_readable, publish, replace_file
from training.quantize import STEM_PRECISIONS

log = logging.getLogger(__name__)

PARITY_RANDOM_IMAGES = 4  # random images in the parity check, besides up to 8 validation images
PARITY_VALIDATION_IMAGES = 8
POINTS_BATCH_SIZE = 32  # images per forward when --points-under scores the validation images again


@dataclasses.dataclass
class ExportRequest:
    checkpoint: Path
    repository: Path
    name: str
    version: int
    int8: bool = False  # also write model.int8.onnx beside the fp32 model.onnx
    precision: str = "fp32"  # what model.onnx computes in (core.contract.PRECISIONS)
    tensorrt: bool = False
    force: bool = False
    calibration_data: Path | None = None
    calibration_images: int = 64
    int8_weight_bits: int = 7  # core.contract.INT8_WEIGHT_BITS: 7 is exact on every CPU (engines.cpu)
    int8_stem: str = "fp32"  # training.quantize.STEM_PRECISIONS: each network's first convolutions
    threshold: str = DEFAULT_OPERATING_POINT  # the default operating point's rule
    calibrate: str = "auto"  # score calibration: auto | none | temperature | platt (not int8's calibration_data)
    bench: bool = False
    points_under: str = "clean"  # the everyday changes (training.perturb names, "all") the operating points are fitted under
    device: str = "auto"  # where --points-under scores the validation images: auto | cpu | cuda
    data: list[str] | None = None  # a version folder as the source: where its validation images are (training.requantize)

    @property
    def changes(self) -> list[Perturbation]:
        """The changes of --points-under, "clean" first (UserError naming the flag and the valid names)."""
        return parse_perturbations(self.points_under, "--points-under")

    def validate(self) -> None:
        if not self.name or self.name.startswith(".") or any(ch in self.name for ch in "/\\") or self.name in ("..",):
            raise UserError(f"--name {self.name!r}: use a plain folder name (no '/', not starting with '.')")
        if self.version < 1:
            raise UserError(f"--version {self.version}: must be a positive integer (Triton's version folders)")
        if self.precision not in c.PRECISIONS:
            raise UserError(f"--precision {self.precision!r}: one of {', '.join(c.PRECISIONS)}")
        quantised = self.int8 or self.precision == "int8"
        if self.int8 and self.precision == "int8":
            raise UserError("--int8 writes model.int8.onnx beside an fp32 model.onnx; --precision int8 makes model.onnx "
                            "the int8 graph: pass one of them")  # fmt: skip
        if self.tensorrt and self.precision == "int8":
            raise UserError("--tensorrt builds its engine from the fp32 graph: export with --precision fp32 (the default)")
        if self.calibration_data is not None and not quantised:
            raise UserError("--calibration-data only applies with --int8 or --precision int8")
        if self.calibrate not in CALIBRATION_CHOICES:
            raise UserError(f"--calibrate {self.calibrate!r}: one of {', '.join(CALIBRATION_CHOICES)}")
        fixed_threshold(point_rule(self.threshold))  # a bad rule is refused before any work
        if self.data and not (self.checkpoint / c.CONTRACT_FILE).is_file():
            raise UserError(f"--data: only for a published version folder as the source ({self.checkpoint} is not one: "
                            "a checkpoint knows its own validation images)")  # fmt: skip
        if self.int8_weight_bits not in c.INT8_WEIGHT_BITS:
            raise UserError(f"--int8-weight-bits {self.int8_weight_bits}: one of {', '.join(map(str, c.INT8_WEIGHT_BITS))}")
        if self.int8_stem not in STEM_PRECISIONS:
            raise UserError(f"--int8-stem {self.int8_stem!r}: one of {', '.join(STEM_PRECISIONS)}")
        if self.calibration_images < 1:
            raise UserError(f"--calibration-images {self.calibration_images}: must be at least 1")
        if self.bench and not quantised:
            raise UserError("--bench compares fp32 and int8: add --int8 or --precision int8")
        if len(self.changes) > 1:
            from training.distributed import resolve_device

            resolve_device(self.device)  # --device cuda without CUDA is refused before any work
        if self.tensorrt:
            from training.tensorrt import require_tensorrt

            require_tensorrt()

    @property
    def target(self) -> Path:
        return self.repository / self.name / str(self.version)


# ---------------------------------------------------------------------------------------------
# The decision threshold, chosen on validation predictions by a rule of core.thresholds


def choose_threshold(rule: str, state: Checkpoint | dict[str, Any]) -> tuple[float, dict[str, Any]]:
    """(threshold on the raw score, description) from `rule`: "eer", "fpr:F" / "fprN" (largest TPR
    with FPR ≤ F) or a number; without calibration (`choose_scoring` calibrates)."""
    rule = point_rule(rule)
    value = fixed_threshold(rule)
    if value is not None:
        return value, {"rule": "fixed", "value": value}
    checkpoint = as_checkpoint(state)
    labels, scores = checkpoint.val_predictions.labelled_scores()
    if labels is None or len(set(labels.tolist())) < 2:
        fallback = checkpoint.val_metrics.get("eer_threshold")
        if rule in ("eer", point_rule(DEFAULT_OPERATING_POINT)) and fallback is not None:
            log.warning("checkpoint has no usable val_predictions; using its val_metrics eer_threshold")
            return float(fallback), {"rule": "eer", "source": "val_metrics"}
        raise UserError(f"--threshold {rule}: the checkpoint has no validation predictions with both classes")
    return operating_point(rule, labels, scores)


@dataclasses.dataclass
class Scoring:
    """What model.json says about turning scores into decisions (`core.thresholds`)."""

    threshold: float  # model.json threshold: the default operating point's, on the raw score
    threshold_info: dict[str, Any]  # metrics["threshold"]
    calibration: dict[str, Any] | None = None  # model.json calibration
    operating_points: dict[str, Any] | None = None  # model.json operating_points
    metrics: dict[str, Any] = dataclasses.field(default_factory=dict)  # metrics["calibration"], metrics["operating_points"]


def choose_scoring(rule: str, method: str, state: Checkpoint | dict[str, Any],
                   under: dict[str, tuple[np.ndarray, np.ndarray]] | None = None) -> Scoring:  # fmt: skip
    """The calibration (`method`: auto | none | temperature | platt) and the operating points fitted on
    the checkpoint's validation predictions, `rule` naming the default point; a checkpoint without
    predictions of both classes gets the threshold alone, as model.json had before calibration.

    With `under` ({change: (labels, raw scores)} of the validation images, "clean" first:
    `validation_under_changes`, or the int8 graph's `quantize_as_model`), the calibration is fitted
    on under["clean"] and the operating points on all of `under` pooled (`fit_pooled_operating_points`)."""
    labels, scores = under["clean"] if under else as_checkpoint(state).val_predictions.labelled_scores()
    if labels is None or len(set(labels.tolist())) < 2:
        if method not in ("auto", "none"):
            raise UserError(f"--calibrate {method}: the checkpoint has no validation predictions with both classes")
        return Scoring(*choose_threshold(rule, state))
    calibration = fit_calibration(labels, scores, method)
    if under is not None and len(under) > 1:
        points, threshold, described = fit_pooled_operating_points(under, calibration, rule)
    else:
        points, threshold, described = fit_operating_points(labels, scores, calibration, rule)
    probabilities = calibration.apply(scores)
    report = {
        "method": calibration.method,
        "chosen_by": "lowest cross-validated log-loss" if method == "auto" else "--calibrate",
        "validation_images": int(labels.size),
        "log_loss_before": log_loss(labels, scores),
        "log_loss_after": log_loss(labels, probabilities),
        "ece_before": expected_calibration_error(labels, scores),
        "ece_after": expected_calibration_error(labels, probabilities),
        "compared": compare_calibrations(labels, scores),
    }
    info = described[points["default"]]
    if "fitted_under" in info:
        log.info("calibration %s: validation ECE %.4f -> %.4f; default operating point %s fitted under %s (%d validation "
                 "images): FPR %.3f, TPR %.3f; clean FPR %.3f, TPR %.3f", calibration.method, report["ece_before"],
                 report["ece_after"], points["default"], ", ".join(info["fitted_under"]), info["validation_images"],
                 info["fpr"], info["tpr"], info["clean_fpr"], info["clean_tpr"])  # fmt: skip
    else:
        log.info("calibration %s: validation ECE %.4f -> %.4f; default operating point %s (validation FPR %.3f, TPR %.3f)",
                 calibration.method, report["ece_before"], report["ece_after"], points["default"], info["fpr"], info["tpr"])  # fmt: skip
    metrics = {"calibration": report, "operating_points": described}
    return Scoring(threshold, info, calibration.to_dict(), points, metrics)


def validation_under_changes(state: Checkpoint, model, changes: list[Perturbation], device: str = "cpu",
                             batch_size: int = POINTS_BATCH_SIZE) -> dict[str, tuple[np.ndarray, np.ndarray]]:  # fmt: skip
    """{change name: (labels, raw scores)} of the checkpoint's validation images under each of `changes`
    (`--points-under`), in order: "clean" is the stored validation predictions (the ones calibration is
    fitted on), every other change is scored now by `model` on `device` (`training.evaluate.perturbed_scores`);
    `model` is back on the CPU afterwards. UserError naming the flag without usable validation images."""
    from training.data import FaceDataset
    from training.distributed import resolve_device
    from training.evaluate import perturbed_scores
    from training.model import cam_grid

    flag = "--points-under " + ",".join(change.name for change in changes)
    labels, scores = state.val_predictions.labelled_scores()
    if labels is None or len(set(labels.tolist())) < 2:
        raise UserError(f"{flag}: the checkpoint has no validation predictions with both classes to fit operating points on")
    samples = state.val_predictions.samples(f"{flag} scores the checkpoint's validation images under each change")
    size = int(state.image_size)
    dataset = FaceDataset(samples, size, tuple(state.cam_grid or cam_grid(model, size)), scale=state.input_scale)
    torch_device = resolve_device(device)
    clean = {"labels": labels, "scores": scores}
    try:
        model.to(torch_device)
        found = perturbed_scores(model, dataset, changes, clean, batch_size=batch_size, device=torch_device)
        return {change.name: (changed_labels, changed_scores) for change, changed_labels, changed_scores in found}
    finally:
        model.cpu()


# ---------------------------------------------------------------------------------------------
# The export


def load_model(path: Path) -> tuple[Checkpoint, Any, Any]:
    """(checkpoint, model in eval mode, config) with clear errors for bad checkpoints."""
    from training.checkpoint import model_from_checkpoint

    checkpoint = read_checkpoint(path).require(str(path))
    model, config = model_from_checkpoint(checkpoint)
    return checkpoint, model, config


def jsonable(value: Any) -> Any:
    """`value` with numpy/torch scalars and arrays, paths and tuples turned into plain JSON types."""

    def convert(item: Any) -> Any:
        if hasattr(item, "tolist"):
            return item.tolist()
        return str(item)

    return json.loads(json.dumps(value, default=convert))


def training_provenance(state: Checkpoint, config, checkpoint: Path) -> dict[str, Any]:
    saliency = state.saliency or ("none" if not config.heatmaps else "human")
    return {
        "checkpoint": str(checkpoint),
        "checkpoint_sha256": c.sha256_file(checkpoint),
        "data": state.data,
        "saliency": saliency,
        "guidance": config.guidance,
        "alpha": config.alpha,
        "cam_class": config.cam_class,
        "weights": config.weights,
        "epochs": state.epoch,
        "best": state.best,
        "seed": config.seed,
        "val_fraction": config.val_fraction,
        **({"ensemble": state.ensemble} if state.ensemble else {}),
        **({"norm_statistics": state.norm_statistics} if state.norm_statistics else {}),
        **({"teacher": teacher_record(config)} if config.teacher else {}),
    }


def teacher_record(config) -> dict[str, Any]:
    """What model.json says about the model a distilled network was taught by (training.distill)."""
    path = Path(config.teacher)
    return {
        "checkpoint": str(path),
        **({"checkpoint_sha256": c.sha256_file(path)} if path.is_file() else {}),
        "distill_weight": config.distill_weight,
        "distill_temperature": config.distill_temperature,
        "distill_view": config.distill_view,
    }


def export_checkpoint(request: ExportRequest) -> Path:
    """Run the whole export; return the published version folder."""
    request.validate()
    if request.target.exists() and not request.force:
        raise UserError(f"{request.target}: version exists; pass --force to replace it")
    state, model, config = load_model(request.checkpoint)
    changes = request.changes
    scoring = None  # --precision int8: fitted on the int8 graph's scores, once it exists (build_version)
    if request.precision == "fp32":
        under = validation_under_changes(state, model, changes, request.device) if len(changes) > 1 else None
        scoring = choose_scoring(request.threshold, request.calibrate, state, under)
    return stage_and_publish(request, lambda folder: build_version(
        request=request, state=state, model=model, config=config, scoring=scoring, folder=folder))  # fmt: skip


def stage_and_publish(request: ExportRequest, build: Callable[[Path], c.ModelContract]) -> Path:
    """`build` every file of the version into a staging folder inside the repository, then rename it
    into place (the repository is left as it was when anything fails); return the version folder."""
    model_dir = request.repository / request.name
    new_model_dir = not model_dir.exists()
    model_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=model_dir, prefix=f".export-{request.version}-"))
    try:
        contract = build(staging)
        make_readable(staging)
        publish(staging, request.target, request.force)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if new_model_dir and not any(model_dir.iterdir()):
            model_dir.rmdir()
        raise
    replace_file(request.target / c.TRITON_CONFIG_FILE, model_dir / c.TRITON_CONFIG_FILE)
    log.info("exported %s v%d (%s) to %s (threshold %.4f)", contract.name, contract.version, contract.precision,
             request.target, contract.threshold)  # fmt: skip
    return request.target


def build_version(
    *,
    request: ExportRequest,
    state: Checkpoint,
    model,
    config,
    scoring: Scoring | None,
    folder: Path,
) -> c.ModelContract:
    """Write every file of one version into `folder` and return its contract (`scoring` None: fitted
    here on the int8 graph's scores, --precision int8)."""
    size = int(state.image_size)
    paths, _ = state.val_predictions.existing_images()
    if not paths:
        log.warning("none of the checkpoint's validation images exist here; parity is checked on random images only")
    graph = export_graph(model, folder, size, paths, state.input_scale)
    if state.cam_grid and tuple(state.cam_grid) != graph.cam_grid:
        log.warning("checkpoint says CAM grid %s but the model gives %s; using the model's", state.cam_grid, graph.cam_grid)
    quantised: dict[str, Any] = {}
    if request.int8:
        from training.quantize import quantize_checkpoint_model

        quantised = quantize_checkpoint_model(request, state, folder, size, with_bench=request.bench)
    elif request.precision == "int8":
        from training.quantize import quantize_as_model

        quantised, under = quantize_as_model(request, state, folder, size)
        scoring = choose_scoring(request.threshold, request.calibrate, state, under)
    assert scoring is not None, "an fp32 export fits its scoring before the graph"
    contract = c.ModelContract(
        name=request.name,
        version=request.version,
        architecture=state.architecture,
        input_height=size,
        input_width=size,
        scale=state.input_scale,
        cam_height=graph.cam_grid[0],
        cam_width=graph.cam_grid[1],
        mean=tuple(float(v) for v in state.mean),
        std=tuple(float(v) for v in state.std),
        threshold=float(scoring.threshold),
        calibration=scoring.calibration,
        operating_points=scoring.operating_points,
        training=jsonable(training_provenance(state, config, request.checkpoint)),
        precision=request.precision,
        created=c.utc_now(),
    )
    metrics: dict[str, Any] = {"validation": state.val_metrics, "threshold": scoring.threshold_info, **scoring.metrics, "export": graph.figures}
    if quantised:
        metrics["int8"] = quantised
    if request.tensorrt:
        from training.tensorrt import build_and_check

        metrics["tensorrt"] = build_and_check(folder / c.ONNX_FILE, folder / c.TENSORRT_FILE, graph.parity_images, contract)
    return seal_version(folder, dataclasses.replace(contract, metrics=jsonable(metrics)))


@dataclasses.dataclass
class ExportedGraph:
    cam_grid: tuple[int, int]
    parity_images: np.ndarray  # uint8 [N, 3, H, W]: validation images, then random ones
    figures: dict[str, Any]  # model.json's metrics["export"]


def export_graph(model, folder: Path, size: int, validation_paths: list[str], scale: int) -> ExportedGraph:
    """`folder`/model.onnx from a trained CamClassifier, checked against torch on up to
    PARITY_VALIDATION_IMAGES of `validation_paths` and PARITY_RANDOM_IMAGES random images."""
    import torch

    from training.model import cam_grid
    from training.onnx_export import OPSET, ExportModule, check_parity, export_onnx

    grid = cam_grid(model, size)
    module = ExportModule(model).eval()
    exporter = export_onnx(module, folder / c.ONNX_FILE, size, size)
    rng = np.random.default_rng(0)
    parity_images = np.concatenate([
        load_images(spread(validation_paths, PARITY_VALIDATION_IMAGES), size, size, scale),
        rng.integers(0, 256, (PARITY_RANDOM_IMAGES, 3, size, size), dtype=np.uint8),
    ])
    parity = check_parity(module, folder / c.ONNX_FILE, parity_images)
    figures = {"exporter": exporter, "opset": OPSET, "torch": torch.__version__, "parity_max_abs_diff": parity,
               "parity_images": int(len(parity_images))}  # fmt: skip
    return ExportedGraph(cam_grid=(int(grid[0]), int(grid[1])), parity_images=parity_images, figures=figures)


def seal_version(folder: Path, contract: c.ModelContract) -> c.ModelContract:
    """Write config.pbtxt and model.json (with every file's sha256) into `folder`; read it back verified."""
    from training.triton import triton_config

    (folder / c.TRITON_CONFIG_FILE).write_text(triton_config(contract))
    files = {p.name: c.sha256_file(p) for p in sorted(folder.iterdir()) if p.is_file() and not p.name.startswith(".")}
    contract = dataclasses.replace(contract, files=files)
    c.write_contract(folder, contract)
    c.read_contract(folder, verify=True)
    return contract
