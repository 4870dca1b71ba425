"""Checkpoint → model repository entry: `<repo>/<name>/<version>/` with model.onnx and model.json.

Everything is built in a temporary folder inside the repository and renamed into place at the end,
so a failure at any step leaves the repository as it was. Layout (Triton's model repository):

    <repo>/<name>/config.pbtxt            Triton's config (copy of the newest version's)
    <repo>/<name>/<version>/model.onnx    fp32 graph: images uint8 [B,3,H,W] → score, logits, cam
    <repo>/<name>/<version>/model.json    the contract serving reads (sha256 of every file below)
    <repo>/<name>/<version>/config.pbtxt  the same config, kept with the version it describes
    <repo>/<name>/<version>/model.int8.onnx, model.plan   with --int8, --tensorrt
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from cyborg.errors import UserError
from serving import contract as c
from serving.images import ImageError, read_image, to_model_input

log = logging.getLogger(__name__)

PARITY_RANDOM_IMAGES = 4  # random images in the parity check, besides up to 8 validation images
PARITY_VALIDATION_IMAGES = 8


@dataclasses.dataclass
class ExportRequest:
    checkpoint: Path
    repository: Path
    name: str
    version: int
    int8: bool = False
    tensorrt: bool = False
    force: bool = False
    calibration_data: Path | None = None
    calibration_images: int = 64
    threshold: str = "eer"
    bench: bool = False

    def validate(self) -> None:
        if not self.name or self.name.startswith(".") or any(ch in self.name for ch in "/\\") or self.name in ("..",):
            raise UserError(f"--name {self.name!r}: use a plain folder name (no '/', not starting with '.')")
        if self.version < 1:
            raise UserError(f"--version {self.version}: must be a positive integer (Triton's version folders)")
        if self.calibration_data is not None and not self.int8:
            raise UserError("--calibration-data only applies with --int8")
        if self.calibration_images < 1:
            raise UserError(f"--calibration-images {self.calibration_images}: must be at least 1")
        if self.bench and not self.int8:
            raise UserError("--bench compares fp32 and int8: add --int8")
        if self.tensorrt:
            from training.tensorrt import require_tensorrt

            require_tensorrt()

    @property
    def target(self) -> Path:
        return self.repository / self.name / str(self.version)


# ---------------------------------------------------------------------------------------------
# The decision threshold, chosen on validation predictions


def choose_threshold(rule: str, state: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    """(threshold, description) from `rule`: "eer", "fpr:F" (largest TPR with FPR ≤ F) or a number."""
    rule = rule.strip().lower()
    try:
        value = float(rule)
    except ValueError:
        pass
    else:
        if not 0.0 <= value <= 1.0:
            raise UserError(f"--threshold {rule}: a fixed threshold must be in [0, 1]")
        return value, {"rule": "fixed", "value": value}
    if rule != "eer" and not rule.startswith("fpr:"):
        raise UserError(f"--threshold {rule!r}: use eer, fpr:RATE (e.g. fpr:0.05) or a number in [0, 1]")
    labels, scores = validation_scores(state)
    if labels is None or len(set(labels.tolist())) < 2:
        fallback = (state.get("val_metrics") or {}).get("eer_threshold")
        if rule == "eer" and fallback is not None:
            log.warning("checkpoint has no usable val_predictions; using its val_metrics eer_threshold")
            return float(fallback), {"rule": "eer", "source": "val_metrics"}
        raise UserError(f"--threshold {rule}: the checkpoint has no validation predictions with both classes")
    from sklearn.metrics import roc_curve

    from training.evaluate import equal_error_rate

    if rule == "eer":
        eer, threshold = equal_error_rate(labels, scores)
        called_fake = scores >= threshold
        info = {"rule": "eer", "eer": eer, "fpr": float(called_fake[labels == 0].mean()),
                "tpr": float(called_fake[labels == 1].mean()), "validation_images": int(len(labels))}
        return min(max(threshold, 0.0), 1.0), info
    try:
        target = float(rule.split(":", 1)[1])
    except ValueError:
        raise UserError(f"--threshold {rule!r}: fpr:RATE needs a number, e.g. fpr:0.05") from None
    if not 0.0 < target < 1.0:
        raise UserError(f"--threshold {rule}: the false positive rate must be in (0, 1)")
    fpr, tpr, thresholds = roc_curve(labels, scores, pos_label=c.FAKE_INDEX, drop_intermediate=False)
    index = int(np.nonzero(fpr <= target)[0][-1])  # the most fakes caught within the FPR budget
    info = {"rule": f"fpr:{target:g}"}
    info.update(fpr=float(fpr[index]), tpr=float(tpr[index]), validation_images=int(len(labels)))
    return float(min(max(thresholds[index], 0.0), 1.0)), info


def validation_scores(state: dict[str, Any]) -> tuple[np.ndarray | None, np.ndarray | None]:
    predictions = state.get("val_predictions") or {}
    labels, scores = predictions.get("labels"), predictions.get("scores")
    if not labels or not scores or len(labels) != len(scores):
        return None, None
    return np.asarray(labels, dtype=np.int64), np.asarray(scores, dtype=np.float64)


# ---------------------------------------------------------------------------------------------
# Images for parity checks, calibration and int8 evaluation


def validation_images(state: dict[str, Any], limit: int | None = None) -> tuple[list[str], list[int]]:
    """Paths and labels of the checkpoint's validation images that still exist."""
    predictions = state.get("val_predictions") or {}
    paths, labels = predictions.get("paths") or [], predictions.get("labels") or [None] * len(predictions.get("paths") or [])
    found = [(str(p), int(label) if label is not None else -1) for p, label in zip(paths, labels) if Path(p).is_file()]
    if limit is not None:
        found = spread(found, limit)
    return [p for p, _ in found], [label for _, label in found]


def spread(items: list, limit: int) -> list:
    """Up to `limit` items taken evenly across the list (validation lists are often sorted by class)."""
    if len(items) <= limit:
        return list(items)
    return [items[i] for i in np.linspace(0, len(items) - 1, limit).round().astype(int)]


def image_files(source: Path) -> list[str]:
    """Image paths from a folder (recursively) or a text file with one path per line."""
    if source.is_dir():
        suffixes = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
        return sorted(str(p) for p in source.rglob("*") if p.suffix.lower() in suffixes)
    if source.is_file():
        lines = [line.strip() for line in source.read_text().splitlines()]
        return [line for line in lines if line and not line.startswith("#")]
    raise UserError(f"--calibration-data {source}: no such folder or list file")


def load_images(paths: list[str], height: int, width: int) -> np.ndarray:
    """uint8 [N, 3, H, W], preprocessed by serving.images exactly as in training and serving."""
    return load_labelled_images(paths, [-1] * len(paths), height, width)[0]


def load_labelled_images(paths: list[str], labels: list[int], height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """(images, labels) for the readable images among `paths`; unreadable ones are skipped with a warning."""
    arrays, kept = [], []
    for path, label in zip(paths, labels):
        try:
            arrays.append(to_model_input(read_image(path), height, width))
            kept.append(label)
        except ImageError as error:
            log.warning("skipping %s", error)
    images = np.stack(arrays) if arrays else np.zeros((0, 3, height, width), dtype=np.uint8)
    return images, np.asarray(kept, dtype=np.int64)


# ---------------------------------------------------------------------------------------------
# Atomic publishing


def exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    result = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    return result == 0


def publish(staging: Path, target: Path, force: bool) -> None:
    """Rename the finished `staging` folder to `target`; with `force`, replace an existing target."""
    if not target.exists():
        os.rename(staging, target)
        return
    if not force:
        raise UserError(f"{target}: version exists; pass --force to replace it")
    if exchange(staging, target):  # staging now holds the old version
        shutil.rmtree(staging)
        return
    retired = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".retired-{target.name}-"))
    os.rename(target, retired / "old")
    try:
        os.rename(staging, target)
    except BaseException:
        os.rename(retired / "old", target)
        raise
    finally:
        shutil.rmtree(retired, ignore_errors=True)


def make_readable(folder: Path) -> None:
    """mkdtemp/mkstemp create owner-only entries; a model server (e.g. Triton) may run as another user."""
    folder.chmod(0o755)
    for path in folder.iterdir():
        path.chmod(0o644)


def replace_file(source: Path, target: Path) -> None:
    """Copy `source` over `target` through a temporary file and a rename."""
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    os.close(fd)
    try:
        shutil.copyfile(source, tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------------------------------------
# The export


def load_model(path: Path):
    """(state, model in eval mode, config) with clear errors for bad checkpoints."""
    from training.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint

    state = load_checkpoint(path)
    missing = [key for key in ("config", "model", "mean", "std", "image_size") if key not in state]
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks {', '.join(missing)}")
    model, config = model_from_checkpoint(state)
    return state, model, config


def jsonable(value: Any) -> Any:
    """`value` with numpy/torch scalars and arrays, paths and tuples turned into plain JSON types."""

    def convert(item: Any) -> Any:
        if hasattr(item, "tolist"):
            return item.tolist()
        return str(item)

    return json.loads(json.dumps(value, default=convert))


def training_provenance(state: dict[str, Any], config, checkpoint: Path) -> dict[str, Any]:
    saliency = state.get("saliency") or ("none" if not config.heatmaps else "human")
    return {
        "checkpoint": str(checkpoint),
        "checkpoint_sha256": c.sha256_file(checkpoint),
        "data": state.get("data", {}),
        "saliency": saliency,
        "guidance": config.guidance,
        "alpha": config.alpha,
        "cam_class": config.cam_class,
        "weights": config.weights,
        "epochs": state.get("epoch"),
        "best": state.get("best"),
        "seed": config.seed,
        "val_fraction": config.val_fraction,
    }


def export_checkpoint(request: ExportRequest) -> Path:
    """Run the whole export; return the published version folder."""
    request.validate()
    if request.target.exists() and not request.force:
        raise UserError(f"{request.target}: version exists; pass --force to replace it")
    state, model, config = load_model(request.checkpoint)
    threshold, threshold_info = choose_threshold(request.threshold, state)
    model_dir = request.repository / request.name
    new_model_dir = not model_dir.exists()
    model_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=model_dir, prefix=f".export-{request.version}-"))
    try:
        contract = build_version(request, state, model, config, threshold, threshold_info, staging)
        make_readable(staging)
        publish(staging, request.target, request.force)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if new_model_dir and not any(model_dir.iterdir()):
            model_dir.rmdir()
        raise
    replace_file(request.target / c.TRITON_CONFIG_FILE, model_dir / c.TRITON_CONFIG_FILE)
    log.info("exported %s v%d to %s (threshold %.4f)", contract.name, contract.version, request.target, threshold)
    return request.target


def build_version(request, state, model, config, threshold, threshold_info, folder: Path) -> c.ModelContract:
    """Write every file of one version into `folder` and return its contract."""
    import torch

    from training.model import cam_grid
    from training.onnx_export import OPSET, ExportModule, check_parity, export_onnx
    from training.triton import triton_config

    size = int(state["image_size"])
    grid = cam_grid(model, size)
    if state.get("cam_grid") and tuple(state["cam_grid"]) != tuple(grid):
        log.warning("checkpoint says CAM grid %s but the model gives %s; using the model's", state["cam_grid"], grid)
    module = ExportModule(model).eval()
    exporter = export_onnx(module, folder / c.ONNX_FILE, size, size)

    paths, _ = validation_images(state)
    if not paths:
        log.warning("none of the checkpoint's validation images exist here; parity is checked on random images only")
    rng = np.random.default_rng(0)
    parity_images = np.concatenate([
        load_images(spread(paths, PARITY_VALIDATION_IMAGES), size, size),
        rng.integers(0, 256, (PARITY_RANDOM_IMAGES, 3, size, size), dtype=np.uint8),
    ])
    parity = check_parity(module, folder / c.ONNX_FILE, parity_images)
    metrics: dict[str, Any] = {
        "validation": state.get("val_metrics", {}),
        "threshold": threshold_info,
        "export": {"exporter": exporter, "opset": OPSET, "torch": torch.__version__, "parity_max_abs_diff": parity,
                   "parity_images": int(len(parity_images))},
    }
    if request.int8:
        from training.quantize import quantize_checkpoint_model

        metrics["int8"] = quantize_checkpoint_model(request, state, folder, size, with_bench=request.bench)
    if request.tensorrt:
        from training.tensorrt import build_and_check

        metrics["tensorrt"] = build_and_check(folder / c.ONNX_FILE, folder / c.TENSORRT_FILE, parity_images)

    contract = c.ModelContract(
        name=request.name,
        version=request.version,
        architecture=config.arch,
        input_height=size,
        input_width=size,
        cam_height=int(grid[0]),
        cam_width=int(grid[1]),
        mean=tuple(float(v) for v in state["mean"]),
        std=tuple(float(v) for v in state["std"]),
        threshold=float(threshold),
        metrics=jsonable(metrics),
        training=jsonable(training_provenance(state, config, request.checkpoint)),
        created=c.utc_now(),
    )
    (folder / c.TRITON_CONFIG_FILE).write_text(triton_config(contract))
    files = {p.name: c.sha256_file(p) for p in sorted(folder.iterdir()) if p.is_file() and not p.name.startswith(".")}
    contract = dataclasses.replace(contract, files=files)
    c.write_contract(folder, contract)
    c.read_contract(folder, verify=True)
    return contract
