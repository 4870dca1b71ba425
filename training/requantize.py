"""A published fp32 version → an int8 version of the same network, without its checkpoint.

`cyborg export models/NAME/9 --precision int8 --repository models --name NAME --version 12` quantises
version 9's model.onnx as an export from the checkpoint would (`training.quantize`), and fits the new
version's calibration and operating points on the int8 graph's own validation scores. The validation
images are re-drawn from the data folders the version's model.json records (or `--data`, when they
moved) with its recorded seed and fraction, and checked against its recorded counts, so the new
version is measured on the images its source was. Everything else (preprocessing, CAM grid,
training record) is the source's, plus `training.quantised_from` naming it.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path
from typing import Any

from core import contract as c
from core.errors import UserError
from training.checkpoint import Checkpoint, ValPredictions
from training.export import ExportRequest, choose_scoring, jsonable, seal_version, stage_and_publish

log = logging.getLogger(__name__)

SPLIT_AUC_TOLERANCE = 0.002  # the fp32 graph re-scoring its own validation split: equal up to kernel noise


def is_version_folder(path: Path) -> bool:
    """True when `path` is a model version folder (it holds model.json), not a checkpoint file."""
    return path.is_dir() and (path / c.CONTRACT_FILE).is_file()


def validation_split(source: c.ModelContract, data: list[str] | None) -> list:
    """The source's validation images (`training.data.Sample`s) from `data` or the folders model.json
    records, split with its recorded seed and fraction; UserError when they cannot be found or the
    split does not match the recorded counts."""
    from training.data import discover, split_samples

    record = source.training.get("data") or {}
    roots = data or record.get("root")
    if not roots or "seed" not in source.training or "val_fraction" not in source.training:
        raise UserError(f"{source.name} v{source.version}: model.json records no training data folders, seed or "
                        "validation fraction to re-draw its validation split from")  # fmt: skip
    folders = [roots] if isinstance(roots, str) else list(roots)
    missing = [folder for folder in folders if not Path(folder).is_dir()]
    if missing:
        raise UserError(f"the validation images of {source.name} v{source.version} come from {', '.join(folders)}; "
                        f"not found here: {', '.join(missing)} (pass --data FOLDER... where they are now)")  # fmt: skip
    samples = split_samples(discover(folders if len(folders) > 1 else folders[0]), source.training["val_fraction"],
                            source.training["seed"])["val"]  # fmt: skip
    found = {name: sum(s.label == label for s in samples) for label, name in enumerate(c.CLASS_NAMES)}
    recorded = (record.get("counts") or {}).get("val")
    if isinstance(recorded, dict) and any(recorded.get(name, found[name]) != found[name] for name in found):
        validated = " and ".join(f"{recorded.get(name, '?')} {name}" for name in c.CLASS_NAMES)
        raise UserError(f"{', '.join(folders)}: the validation split holds {found['real']} real and {found['fake']} fake "
                        f"images, but {source.name} v{source.version} was validated on {validated}: not the data it "
                        "was trained on")  # fmt: skip
    return samples


def warn_if_split_differs(source: c.ModelContract, auc: float | None) -> None:
    """Log a warning when the source's fp32 AUC on the re-drawn validation split is not the AUC its
    model.json records: the counts matched, but the images are probably not the ones it was validated
    on (a split drawn by an older `cyborg train`, its training images among them)."""
    recorded = (source.metrics.get("validation") or {}).get("auc")
    if auc is not None and recorded is not None and abs(auc - recorded) > SPLIT_AUC_TOLERANCE:
        log.warning("%s v%s scores AUC %.4f on the re-drawn validation split, but model.json records %.4f: the split is "
                    "probably not the one it was validated on (its training images may be in it), so figures measured "
                    "on it are not comparable", source.name, source.version, auc, recorded)  # fmt: skip


def stand_in_checkpoint(source: c.ModelContract, samples: list) -> Checkpoint:
    """What `training.quantize` reads from a checkpoint, taken from the source's contract."""
    return Checkpoint(
        mean=tuple(source.mean),
        std=tuple(source.std),
        image_size=source.input_height,
        scale=source.scale or source.input_height,
        cam_grid=source.cam_shape,
        data=source.training.get("data") or {},
        val_metrics=source.metrics.get("validation") or {},
        val_predictions=ValPredictions(paths=[str(s.path) for s in samples], labels=[int(s.label) for s in samples],
                                       sources=[s.source for s in samples]),  # fmt: skip
    )


def check_request(request: ExportRequest, source: c.ModelContract) -> None:
    where = f"{request.checkpoint} ({source.name} v{source.version}, {source.precision})"
    if source.precision != "fp32":
        raise UserError(f"{where}: only an fp32 version can be quantised; export its own source instead")
    if request.precision != "int8" or request.int8 or request.tensorrt:
        raise UserError(f"{where}: a published version is re-exported as an int8 version only (--precision int8); "
                        "--int8 and --tensorrt need the checkpoint it was exported from")  # fmt: skip
    if source.input_height != source.input_width:
        raise UserError(f"{where}: a non-square input ({source.input_height} x {source.input_width}) is not supported here")


def export_version(request: ExportRequest) -> Path:
    """Quantise the fp32 version folder `request.checkpoint` into a new int8 version; return its folder."""
    from training.quantize import quantize_as_model

    request.validate()
    source = c.read_contract(request.checkpoint, verify=True)
    check_request(request, source)
    if request.target.exists() and not request.force:
        raise UserError(f"{request.target}: version exists; pass --force to replace it")
    state = stand_in_checkpoint(source, validation_split(source, request.data))

    def build(folder: Path) -> c.ModelContract:
        shutil.copyfile(request.checkpoint / c.ONNX_FILE, folder / c.ONNX_FILE)
        quantised, under = quantize_as_model(request, state, folder, source.input_height)
        warn_if_split_differs(source, quantised.get("fp32_auc"))
        scoring = choose_scoring(request.threshold, request.calibrate, state, under)
        quantised_from = {"name": source.name, "version": source.version, "model.onnx": source.files.get(c.ONNX_FILE, "")}
        metrics: dict[str, Any] = {"validation": state.val_metrics, "threshold": scoring.threshold_info, **scoring.metrics,
                                   "export": source.metrics.get("export") or {}, "int8": quantised}  # fmt: skip
        contract = dataclasses.replace(
            source,
            name=request.name,
            version=request.version,
            threshold=float(scoring.threshold),
            calibration=scoring.calibration,
            operating_points=scoring.operating_points,
            precision="int8",
            training={**source.training, "quantised_from": quantised_from},
            metrics=jsonable(metrics),
            files={},
            created=c.utc_now(),
        )
        return seal_version(folder, contract)

    return stage_and_publish(request, build)
