"""Evaluation: scores from a model, AUC / EER / accuracy overall and per source (AUC with its bootstrap
interval, `training.intervals`), CAM agreement, pictures.

Conventions: label 1 = fake (core.contract's class order), a score is the fake probability, and an
image is called fake when its score is >= the threshold (`core.contract.called_fake`). The EER and
the threshold rules are `core.thresholds`'; AUC comes from scikit-learn.
"""

from __future__ import annotations

import csv as csv_io
import datetime
import json
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from core import __version__
from core.errors import UserError
from core.contract import CLASS_NAMES, called_fake, sha256_file
from core.heatmaps import upsample
from core.images import read_image, to_model_input
from core.thresholds import CALIBRATION_CHOICES, FALLBACK_THRESHOLD, equal_error_rate, evaluation_threshold, roc_curve
from training.checkpoint import Checkpoint, ValPredictions, model_from_checkpoint, read_checkpoint
from training.config import TrainConfig
from training.data import FaceDataset, data_folders, discover, saliency_provenance, split_samples, summarise
from training.distributed import resolve_device
from training.intervals import CONFIDENCE, RESAMPLES, auc_difference_interval, auc_interval
from training.model import CamClassifier, cam_grid, default_image_size, fake_probability, select_cam
from training.perturb import Perturbation, parse_perturbations
from training.reliability import calibration_report

log = logging.getLogger(__name__)

def _as_arrays(labels: Sequence, scores: Sequence) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels).astype(np.int64).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if labels.shape != scores.shape:
        raise ValueError(f"{labels.size} labels but {scores.size} scores")
    if labels.size == 0:
        raise ValueError("no samples to evaluate")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError("labels must be 0 (real) or 1 (fake)")
    if not np.isfinite(scores).all():
        raise ValueError("scores contain NaN or infinity")
    return labels, scores


def binary_metrics(labels: np.ndarray, scores: np.ndarray, threshold: float | None = None) -> dict[str, Any]:
    """AUC, EER and its threshold, and accuracy / TPR / FPR at `threshold` (default: the EER threshold).

    With only one class present the AUC and EER are undefined (None); the threshold then falls back to
    the given one, else FALLBACK_THRESHOLD.
    """
    labels, scores = _as_arrays(labels, scores)
    n_fake = int(labels.sum())
    n_real = int(labels.size - n_fake)
    auc = eer = eer_threshold = None
    if n_fake and n_real:
        auc = float(roc_auc_score(labels, scores))
        eer, eer_threshold = equal_error_rate(labels, scores)
    if threshold is None:
        threshold = eer_threshold if eer_threshold is not None else FALLBACK_THRESHOLD
    fake = called_fake(scores, threshold)
    return {
        "auc": auc,
        "eer": eer,
        "eer_threshold": eer_threshold,
        "threshold": float(threshold),
        "accuracy": float((fake == labels.astype(bool)).mean()),
        "tpr": float(fake[labels == 1].mean()) if n_fake else None,
        "fpr": float(fake[labels == 0].mean()) if n_real else None,
        "n_real": n_real,
        "n_fake": n_fake,
    }


def source_masks(labels: np.ndarray, sources: np.ndarray, source: str) -> tuple[np.ndarray, np.ndarray]:
    """(fakes, reals) compared for one source: its fakes against ALL reals when it has fakes (how well
    this generator is caught), else ALL fakes against its reals (a real-photo collection)."""
    mine = sources == source
    if (mine & (labels == 1)).any():
        return mine & (labels == 1), labels == 0
    return labels == 1, mine & (labels == 0)


def source_names(sources: Sequence, size: int) -> np.ndarray:
    names = np.asarray(["unknown" if s in (None, "") else str(s) for s in sources], dtype=object)
    if names.size != size:
        raise ValueError(f"{names.size} sources for {size} samples")
    return names


def per_source_metrics(labels: np.ndarray, scores: np.ndarray, sources: Sequence, threshold: float) -> dict[str, dict]:
    """Metrics per source (generator or real-photo collection), sorted by name.

    AUC compares the pairs that `source_masks` defines; accuracy, TPR/FPR and counts are over the
    source's own images at `threshold`. A missing source is reported as "unknown".
    """
    labels, scores = _as_arrays(labels, scores)
    sources = source_names(sources, labels.size)
    table = {}
    for source in sorted(set(sources)):
        mine = sources == source
        metrics = binary_metrics(labels[mine], scores[mine], threshold)
        fakes, reals = source_masks(labels, sources, source)
        pair = fakes | reals
        auc = float(roc_auc_score(labels[pair], scores[pair])) if fakes.any() and reals.any() else None
        table[source] = {
            "n": int(mine.sum()),
            "n_real": metrics["n_real"],
            "n_fake": metrics["n_fake"],
            "auc": auc,
            "accuracy": metrics["accuracy"],
            "tpr": metrics["tpr"],
            "fpr": metrics["fpr"],
            "mean_score": float(scores[mine].mean()),
        }
    return table


def auc_intervals(labels: np.ndarray, scores: np.ndarray, sources: Sequence,
                  reference: np.ndarray | None = None) -> dict[str, list[float] | None]:  # fmt: skip
    """The bootstrap interval (`training.intervals`) of the AUC overall ("all") and of each source's
    AUC (the pairs of `source_masks`): [low, high]; with `reference` (another model's scores of the
    same images) the paired interval of the AUC difference instead: [difference, low, high]. None
    where a class has too few images (`training.intervals.MIN_PER_CLASS`)."""
    labels, scores = _as_arrays(labels, scores)
    names = source_names(sources, labels.size)
    pairs = {"all": np.ones(labels.size, dtype=bool)}
    for source in sorted(set(names)):
        fakes, reals = source_masks(labels, names, source)
        pairs[source] = fakes | reals
    if reference is None:
        intervals = {name: auc_interval(labels[pair], scores[pair]) for name, pair in pairs.items()}
    else:
        reference = np.asarray(reference, dtype=np.float64).ravel()
        intervals = {name: auc_difference_interval(labels[pair], scores[pair], reference[pair]) for name, pair in pairs.items()}
    return {name: None if interval is None else list(interval) for name, interval in intervals.items()}


INTERVALS = {"confidence": CONFIDENCE, "resamples": RESAMPLES,
             "method": "percentile bootstrap, reals and fakes resampled separately (training.intervals)"}  # fmt: skip


def validation_metrics(labels: np.ndarray, scores: np.ndarray, sources: Sequence) -> dict[str, Any]:
    """What a checkpoint records of its validation split: `binary_metrics` at the EER threshold, the AUC's
    bootstrap interval (`auc_ci`) and AUC per source."""
    metrics = binary_metrics(labels, scores)
    interval = auc_interval(labels, scores)
    metrics["auc_ci"] = None if interval is None else list(interval)
    per_source = per_source_metrics(labels, scores, sources, metrics["threshold"])
    metrics["source_auc"] = {source: row["auc"] for source, row in per_source.items()}
    return metrics


def predict(
    model: CamClassifier,
    dataset: torch.utils.data.Dataset,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    workers: int = 0,
    with_cams: bool = False,
) -> dict[str, np.ndarray]:
    """Run `model` in eval mode over a dataset of dict items (image, label, saliency, has_saliency, index).

    Returns numpy arrays "scores" (fake probability), "labels", "indices"; with `with_cams` also
    "cams" [N, h, w] (normalised CAM of the predicted class), "saliency" and "has_saliency".
    The model's train/eval mode is restored afterwards.
    """
    device = torch.device(device)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=workers, pin_memory=device.type == "cuda"
    )
    keys = ["scores", "labels", "indices"] + (["cams", "saliency", "has_saliency"] if with_cams else [])
    parts: dict[str, list[np.ndarray]] = {key: [] for key in keys}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in loader:
                out = model(batch["image"].to(device, non_blocking=True))
                parts["scores"].append(fake_probability(out.logits).cpu().numpy())
                parts["labels"].append(np.asarray(batch["label"]).astype(np.int64))
                parts["indices"].append(np.asarray(batch["index"]).astype(np.int64))
                if with_cams:
                    cams = select_cam(out.class_maps.float(), out.logits.argmax(dim=1))
                    parts["cams"].append(cams.cpu().numpy())
                    parts["saliency"].append(np.asarray(batch["saliency"], dtype=np.float32))
                    parts["has_saliency"].append(np.asarray(batch["has_saliency"]).astype(bool))
    finally:
        model.train(was_training)
    if not parts["scores"]:
        raise ValueError("the dataset is empty: nothing to evaluate")
    return {key: np.concatenate(values) for key, values in parts.items()}



def score_samples(model: torch.nn.Module, samples: Sequence, size: int, grid: tuple[int, int], scale: int,
                  batch_size: int = 32, device: str | torch.device = "cpu") -> tuple[dict[str, Any], ValPredictions]:  # fmt: skip
    """`model`'s validation metrics and predictions on `samples` (`training.data.Sample`s), prepared as
    training validates them: what a checkpoint records as val_metrics and val_predictions."""
    dataset = FaceDataset(samples, size, grid, scale=scale)
    predictions = predict(model, dataset, batch_size=batch_size, device=device)
    kept = [dataset.samples[int(i)] for i in predictions["indices"]]
    metrics = validation_metrics(predictions["labels"], predictions["scores"], [s.source for s in kept])
    return metrics, ValPredictions(paths=[str(s.path) for s in kept], labels=predictions["labels"].tolist(),
                                   scores=predictions["scores"].tolist(), sources=[s.source for s in kept])  # fmt: skip

TOP_FRACTION = 0.25  # the human map's "top region": its highest-valued quarter of CAM cells


def cam_agreement(cams: np.ndarray, maps: np.ndarray, has_map: np.ndarray, labels: np.ndarray) -> dict[str, Any] | None:
    """How well each CAM agrees with its human map (both on the CAM grid), over the images that have one.

    "pearson": correlation of the two maps' cells; "mass_in_top_region": share of the CAM's mass inside
    the top TOP_FRACTION of the map's cells (ties included), against "top_region_fraction", the share a
    CAM spread evenly would have. Images with a constant CAM or map are left out of the measure they break.
    None when no image has a map.
    """
    has_map = np.asarray(has_map, dtype=bool)
    if not has_map.any():
        return None
    cams = np.asarray(cams, dtype=np.float64)[has_map].reshape(int(has_map.sum()), -1)
    maps = np.asarray(maps, dtype=np.float64)[has_map].reshape(cams.shape)
    labels = np.asarray(labels)[has_map]
    cam_c = cams - cams.mean(axis=1, keepdims=True)
    map_c = maps - maps.mean(axis=1, keepdims=True)
    norm = np.sqrt((cam_c**2).sum(axis=1) * (map_c**2).sum(axis=1))
    pearson = np.where(norm > 1e-12, (cam_c * map_c).sum(axis=1) / np.maximum(norm, 1e-12), np.nan)
    region = top_region(maps)
    usable = (region.mean(axis=1) < 1.0) & (cams.sum(axis=1) > 1e-12)
    mass = np.where(usable, (cams * region).sum(axis=1) / np.maximum(cams.sum(axis=1), 1e-12), np.nan)

    def summary(select: np.ndarray) -> dict[str, Any]:
        return {
            "n_maps": int(select.sum()),
            "pearson": _nanmean(pearson[select]),
            "mass_in_top_region": _nanmean(mass[select]),
            "top_region_fraction": _nanmean(np.where(usable, region.mean(axis=1), np.nan)[select]),
        }

    return {
        **summary(np.ones(labels.size, dtype=bool)),
        "top_fraction": TOP_FRACTION,
        "n_constant_cam_or_map": int((~np.isfinite(pearson) | ~usable).sum()),
        "by_class": {name: summary(labels == label) for label, name in ((0, "real"), (1, "fake")) if (labels == label).any()},
    }


def top_region(maps: np.ndarray) -> np.ndarray:
    """Boolean masks of each map's top TOP_FRACTION of cells (ties included): maps [N, ...] -> same shape."""
    flat = np.asarray(maps, dtype=np.float64).reshape(len(maps), -1)
    k = max(1, round(TOP_FRACTION * flat.shape[1]))
    cut = -np.sort(-flat, axis=1)[:, k - 1 : k]
    return (flat >= cut).reshape(np.shape(maps))


def _nanmean(values: np.ndarray) -> float | None:
    values = values[np.isfinite(values)]
    return float(values.mean()) if values.size else None


def plot_roc(labels: np.ndarray, scores: np.ndarray, sources: Sequence, threshold: float, path: str | Path) -> None:
    """ROC curves, overall and per source (the pairs of `source_masks`), with the operating point."""
    from matplotlib.figure import Figure

    labels, scores = _as_arrays(labels, scores)
    sources = source_names(sources, labels.size)
    figure = Figure(figsize=(6.4, 6.0), layout="constrained")
    ax = figure.add_subplot()
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="chance")
    if labels.min() == labels.max():
        ax.text(0.5, 0.5, "ROC undefined: only one class present", ha="center", va="center")
    else:
        fpr, tpr, _ = roc_curve(labels, scores)
        ax.plot(fpr, tpr, color="black", linewidth=2.5, label=f"all (AUC {roc_auc_score(labels, scores):.3f})")
        point = binary_metrics(labels, scores, threshold)
        ax.plot(point["fpr"], point["tpr"], "o", color="black", label=f"threshold {threshold:.3g}")
        names = sorted(set(sources))
        if len(names) > 1:
            for source in names:
                fakes, reals = source_masks(labels, sources, source)
                if fakes.any() and reals.any():
                    pair = fakes | reals
                    fpr, tpr, _ = roc_curve(labels[pair], scores[pair])
                    auc = roc_auc_score(labels[pair], scores[pair])
                    ax.plot(fpr, tpr, linewidth=1.2, label=f"{source} (AUC {auc:.3f})")
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="false positive rate (reals called fake)", ylabel="true positive rate (fakes caught)")
    ax.set_title(f"ROC: {int((labels == 0).sum())} real, {int((labels == 1).sum())} fake")
    ax.legend(loc="lower right", fontsize="small")
    figure.savefig(path, dpi=110)


def pick_examples(labels: np.ndarray, scores: np.ndarray, count: int) -> list[int]:
    """Up to `count` positions, half of each class where possible, spread from lowest to highest score."""
    picked: list[int] = []
    per_class = {label: np.flatnonzero(labels == label) for label in (0, 1)}
    quota = {label: min(len(idx), count // 2) for label, idx in per_class.items()}
    spare = count - sum(quota.values())
    for label in (0, 1):  # one class short: the other fills the grid
        extra = min(spare, len(per_class[label]) - quota[label])
        quota[label] += extra
        spare -= extra
    for label, positions in per_class.items():
        ordered = positions[np.argsort(scores[positions], kind="stable")]
        if quota[label]:
            picked += [int(ordered[i]) for i in np.linspace(0, len(ordered) - 1, quota[label]).round().astype(int)]
    return picked


def plot_cams(
    images: np.ndarray,
    cams: np.ndarray,
    labels: np.ndarray,
    scores: np.ndarray,
    threshold: float,
    path: str | Path,
    regions: np.ndarray | None = None,
    columns: int = 4,
    map_kind: str = "human",
) -> None:
    """A grid of CAM overlays: images uint8 [N, 3, H, W], cams [N, h, w] in [0, 1]; a white line
    outlines the human map's top region where `regions` (bool [N, h, w], all False: no map) mark one."""
    from matplotlib.figure import Figure

    count = len(images)
    rows = max(1, -(-count // columns))
    height, width = images.shape[-2:]
    upsampled = upsample(cams, height, width)
    figure = Figure(figsize=(2.6 * columns + 0.8, 2.8 * rows + 0.7))
    figure.subplots_adjust(left=0.01, right=0.88, bottom=0.01, top=1 - 0.75 / (2.8 * rows + 0.7), wspace=0.05, hspace=0.15)
    axes = figure.subplots(rows, columns, squeeze=False)
    overlay = None
    for position, ax in enumerate(axes.flat):
        ax.set_axis_off()
        if position >= count:
            continue
        ax.imshow(images[position].transpose(1, 2, 0))
        overlay = ax.imshow(upsampled[position], cmap="jet", alpha=0.45, vmin=0.0, vmax=1.0)
        if regions is not None and 0 < regions[position].mean() < 1:
            mask = upsample(regions[position].astype(np.float32), height, width, resample="nearest")
            ax.contour(mask, levels=[0.5], colors="white", linewidths=1.0)
        correct = called_fake(scores[position], threshold) == bool(labels[position])
        ax.set_title(f"{CLASS_NAMES[int(labels[position])]}: fake {scores[position]:.2f}", color="green" if correct else "red", fontsize=9)
    if overlay is not None:
        figure.colorbar(overlay, cax=figure.add_axes((0.9, 0.2, 0.02, 0.6)), label="CAM of the predicted class")
    figure.suptitle(f"CAM overlays (title green = correct at threshold {threshold:.3g}; white line = {map_kind} map's top region)", fontsize=9)
    figure.savefig(path, dpi=100)


SPLIT_CHOICES = ("auto", "test", "val", "train", "all")


def select_samples(samples: list, split: str, val_fraction: float, seed: int) -> tuple[list, str]:
    """The samples of `split` ("auto": test when the data has a test split, else all), with the name used.

    "val" is the checkpoint's own validation split: the data's, else the same seeded hold-out the trainer made.
    """
    if split not in SPLIT_CHOICES:
        raise UserError(f"--split {split!r}: choose one of {', '.join(SPLIT_CHOICES)}")
    splits = split_samples(samples, val_fraction, seed)
    if split == "auto":
        split = "test" if splits["test"] else "all"
    chosen = list(samples) if split == "all" else splits[split]
    if not chosen:
        counts = ", ".join(f"{name} {len(items)}" for name, items in splits.items())
        raise UserError(f"--split {split}: no images in that split (found: {counts}); choose another --split")
    return chosen, split


def write_predictions(path: Path, samples: Sequence, labels: np.ndarray, scores: np.ndarray, threshold: float) -> None:
    """predictions.csv: path, source, label, score, called (the class given at `threshold`)."""
    with path.open("w", newline="") as handle:
        writer = csv_io.writer(handle)
        writer.writerow(["path", "source", "label", "score", "called"])
        for sample, label, score in zip(samples, labels, scores):
            writer.writerow([str(sample.path), sample.source, CLASS_NAMES[int(label)], f"{score:.9g}", CLASS_NAMES[int(called_fake(score, threshold))]])


class PerturbedDataset(torch.utils.data.Dataset):
    """`dataset`'s images changed by `perturbation` right after decoding, then prepared exactly as
    `dataset` prepares them for evaluation (`core.images.to_model_input` at its size and scale).
    Items carry image, label and index: what `predict` needs for scores."""

    def __init__(self, dataset: FaceDataset, perturbation: Perturbation):
        self.dataset, self.perturbation = dataset, perturbation

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        sample = self.dataset.samples[index]
        image = self.perturbation(read_image(sample.path))
        pixels = to_model_input(image, self.dataset.height, self.dataset.width, self.dataset.scale)
        return {
            "image": torch.from_numpy(pixels),
            "label": torch.tensor(sample.label, dtype=torch.long),
            "index": torch.tensor(index, dtype=torch.long),
        }


def robustness_metrics(labels: np.ndarray, scores: np.ndarray, sources: Sequence, threshold: float) -> dict[str, Any]:
    """AUC, EER, accuracy (and TPR/FPR) at `threshold`, overall and per source (the pairs of `source_masks`)."""
    labels, scores = _as_arrays(labels, scores)
    overall = binary_metrics(labels, scores, threshold)
    names = source_names(sources, labels.size)
    intervals = auc_intervals(labels, scores, names)
    per_source = {}
    for source, row in per_source_metrics(labels, scores, names, threshold).items():
        fakes, reals = source_masks(labels, names, source)
        pair = fakes | reals
        eer = equal_error_rate(labels[pair], scores[pair])[0] if fakes.any() and reals.any() else None
        per_source[source] = {"n": row["n"], "auc": row["auc"], "auc_ci": intervals[source], "eer": eer,
                              "accuracy": row["accuracy"], "tpr": row["tpr"], "fpr": row["fpr"]}  # fmt: skip
    return {**{key: overall[key] for key in ("auc", "eer", "accuracy", "tpr", "fpr")}, "auc_ci": intervals["all"],
            "per_source": per_source}  # fmt: skip


def perturbed_scores(
    model: CamClassifier,
    dataset: FaceDataset,
    perturbations: Sequence[Perturbation],
    clean: dict[str, np.ndarray],
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    workers: int = 0,
) -> Iterator[tuple[Perturbation, np.ndarray, np.ndarray]]:
    """(perturbation, labels, scores) of `dataset` under each perturbation, in the order given: "clean"
    is `clean` ("labels" and "scores" already made, not scored again), every other one is `predict` over
    a `PerturbedDataset` (labels and scores in the dataset's order)."""
    for perturbation in perturbations:
        if perturbation.name == "clean":
            yield perturbation, clean["labels"], clean["scores"]
            continue
        log.info("scoring under %s", perturbation.name)
        found = predict(model, PerturbedDataset(dataset, perturbation), batch_size=batch_size, device=device, workers=workers)
        yield perturbation, found["labels"], found["scores"]


def evaluate_perturbations(
    model: CamClassifier,
    dataset: FaceDataset,
    perturbations: Sequence[Perturbation],
    clean: dict[str, np.ndarray],
    threshold: float,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    workers: int = 0,
) -> dict[str, dict[str, Any]]:
    """{name: metrics} for each perturbation of `dataset` (its "clean" scores are `clean`, the unperturbed
    predictions already made), with `auc_vs_clean` (its AUC minus the clean AUC); in the order given."""
    sources = [dataset.samples[i].source for i in clean["indices"]]
    table: dict[str, dict[str, Any]] = {}
    for perturbation, labels, scores in perturbed_scores(model, dataset, perturbations, clean, batch_size, device, workers):
        table[perturbation.name] = {"description": perturbation.description, **robustness_metrics(labels, scores, sources, threshold)}
    reference = table.get("clean", {}).get("auc")
    for row in table.values():
        row["auc_vs_clean"] = None if reference is None or row["auc"] is None else row["auc"] - reference
    return table


def plot_perturbations(table: dict[str, dict[str, Any]], path: str | Path, threshold: float) -> None:
    """perturbations.png: AUC under each perturbation, overall (thick) and per source, chance at 0.5."""
    from matplotlib.figure import Figure

    names = list(table)
    positions = np.arange(len(names))
    figure = Figure(figsize=(max(6.4, 0.75 * len(names) + 2.5), 4.8), layout="constrained")
    ax = figure.add_subplot()
    ax.axhline(0.5, linestyle="--", color="grey", linewidth=1, label="chance")

    def values(get) -> np.ndarray:
        return np.array([np.nan if get(table[name]) is None else get(table[name]) for name in names], dtype=float)

    ax.plot(positions, values(lambda row: row["auc"]), marker="o", color="black", linewidth=3.5, markersize=8, label="all")
    sources = sorted({source for row in table.values() for source in row["per_source"]})
    if len(sources) > 1:  # drawn over "all", so a source that matches it stays visible
        for source in sources:
            aucs = values(lambda row, source=source: row["per_source"].get(source, {}).get("auc"))
            if np.isfinite(aucs).any():
                ax.plot(positions, aucs, marker="o", linewidth=1.2, markersize=4, label=source)
    plotted = np.concatenate([np.asarray(line.get_ydata(), dtype=float) for line in ax.get_lines()[1:]])
    lowest = float(np.nanmin(plotted)) if np.isfinite(plotted).any() else 0.5
    ax.set(xticks=positions, xlim=(-0.5, len(names) - 0.5), ylim=(min(0.4, lowest - 0.05), 1.01), ylabel="AUC")
    ax.set_xticklabels(names, rotation=35, ha="right")
    ax.grid(axis="y", alpha=0.3)
    ax.set_title(f"AUC under everyday changes (accuracy in results.json at threshold {threshold:.3g})", fontsize=10)
    ax.legend(loc="lower left", fontsize="small")
    figure.savefig(path, dpi=110)


def checkpoint_provenance(path: Path, state: Checkpoint, config: TrainConfig, image_size: int, grid: tuple[int, int]) -> dict[str, Any]:
    return {
        "path": str(path.resolve()),
        "sha256": sha256_file(path),
        "arch": state.architecture,
        "guidance": config.guidance,
        "alpha": config.alpha,
        "epoch": state.epoch,
        "best": state.best,
        "saliency": state.saliency,
        "image_size": image_size,
        "cam_grid": list(grid),
        "val_metrics": state.val_metrics or None,
        "trained_on": state.data.get("root"),
    }


def evaluate_checkpoint(
    checkpoint: str | Path,
    data: str | Path | Sequence[str | Path],
    out: str | Path,
    csv: str | Path | None = None,
    heatmaps: str | Path | None = None,
    split: str = "auto",
    threshold: float | None = None,
    batch_size: int = 64,
    device: str = "auto",
    workers: int = 0,
    max_cams: int = 16,
    skip_unreadable: bool = False,
    perturb: str | None = None,
    calibrate: str = "auto",
) -> dict[str, Any]:
    """Evaluate a checkpoint on a data set; writes OUT/results.json, roc.png, cams.png, predictions.csv.

    With `perturb` (a comma list of `training.perturb.PERTURBATIONS` names, or "all"), the images are
    also scored after each everyday change: results.json's "perturbations" and perturbations.png.

    The threshold is `threshold` if given, else the one chosen on the checkpoint's validation split
    (its val_metrics["eer_threshold"]), never one fitted to the evaluated data. `calibrate` is the
    calibration method fitted on the checkpoint's validation predictions for the ECE report (the
    `--calibrate` of `cyborg export`: auto, temperature, platt or none).
    """
    checkpoint, out = Path(checkpoint), Path(out)
    perturbations = parse_perturbations(perturb) if perturb is not None else None
    if calibrate not in CALIBRATION_CHOICES:
        raise UserError(f"--calibrate {calibrate!r}: one of {', '.join(CALIBRATION_CHOICES)}")
    state = read_checkpoint(checkpoint)
    model, config = model_from_checkpoint(state)
    torch_device = resolve_device(device)
    model.to(torch_device)
    image_size = int(state.image_size or config.image_size or default_image_size(config.arch))
    grid = tuple(state.cam_grid or cam_grid(model, image_size))
    threshold, threshold_source = evaluation_threshold(threshold, state.val_metrics.get("eer_threshold"))
    provenance = checkpoint_provenance(checkpoint, state, config, image_size, grid)

    samples, split = select_samples(discover(data, csv, heatmaps), split, config.val_fraction, config.seed)
    dataset = FaceDataset(samples, image_size, grid, skip_unreadable=skip_unreadable, scale=state.input_scale)
    trained_on = provenance["trained_on"]
    resolved = lambda folders: {Path(folder).resolve() for folder in data_folders(folders)}  # noqa: E731
    includes_training = split in ("all", "train") and bool(trained_on) and bool(resolved(trained_on) & resolved(data))
    if includes_training:
        log.warning("%s is the data this checkpoint was trained on and --split %s includes its training images", data, split)

    predictions = predict(model, dataset, batch_size=batch_size, device=torch_device, workers=workers, with_cams=True)
    kept = [dataset.samples[i] for i in predictions["indices"]]
    labels, scores, sources = predictions["labels"], predictions["scores"], [s.source for s in kept]
    metrics = binary_metrics(labels, scores, threshold)
    intervals = auc_intervals(labels, scores, sources)
    per_source = per_source_metrics(labels, scores, sources, threshold)
    for source, row in per_source.items():
        row["auc_ci"] = intervals[source]
    has_map = predictions["has_saliency"]
    maps_kind = saliency_provenance(kept)
    agreement = cam_agreement(predictions["cams"], predictions["saliency"], has_map, labels)

    out.mkdir(parents=True, exist_ok=True)
    plot_roc(labels, scores, sources, threshold, out / "roc.png")
    chosen = pick_examples(labels, scores, max_cams)
    if chosen:
        images = np.stack([dataset[int(predictions["indices"][i])]["image"].numpy() for i in chosen])
        regions = top_region(predictions["saliency"][chosen]) & has_map[chosen, None, None]
        plot_cams(images, predictions["cams"][chosen], labels[chosen], scores[chosen], threshold, out / "cams.png", regions, map_kind=maps_kind)
    write_predictions(out / "predictions.csv", kept, labels, scores, threshold)
    robustness = None
    if perturbations is not None:
        robustness = evaluate_perturbations(model, dataset, perturbations, predictions, threshold, batch_size, torch_device, workers)
        plot_perturbations(robustness, out / "perturbations.png", threshold)

    results = {
        **{key: metrics[key] for key in ("auc", "eer", "accuracy", "threshold", "tpr", "fpr", "n_real", "n_fake")},
        "auc_ci": intervals["all"],
        "intervals": INTERVALS,
        "n_images": int(labels.size),
        "threshold_source": threshold_source,
        "eer_threshold_on_this_data": metrics["eer_threshold"],
        "per_source": per_source,
        "cam_agreement": None if agreement is None else {"maps": maps_kind, **agreement},
        "checkpoint": provenance,
        "data": {
            "root": [str(Path(folder).resolve()) for folder in data_folders(data)] if not isinstance(data, (str, Path)) else str(Path(data).resolve()),
            "csv": str(csv) if csv else None,
            "heatmaps": str(heatmaps) if heatmaps else None,
            "split": split,
            "counts": summarise(kept),
            "maps": maps_kind,
            "n_with_maps": int(has_map.sum()),
            "skipped_unreadable": len(samples) - len(kept),
            "includes_training_images": includes_training,
        },
        "out": str(out.resolve()),
        "files": {"roc": "roc.png", "cams": "cams.png" if chosen else None, "predictions": "predictions.csv"},
        "device": str(torch_device),
        "cyborg_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if robustness is not None:
        results["perturbations"] = robustness
        results["files"]["perturbations"] = "perturbations.png"
    results["calibration"] = calibration_report(state, labels, scores, out, calibrate)  # ECE raw and calibrated, reliability.png
    results["files"]["reliability"] = results["calibration"]["plot"]
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return results
