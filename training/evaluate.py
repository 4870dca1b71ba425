"""Evaluation: scores from a model, AUC / EER / accuracy overall and per source, CAM agreement, pictures.

Conventions: label 1 = fake (serving.contract's class order), a score is the fake probability, and an
image is called fake when its score is >= the threshold (scikit-learn's `roc_curve` convention).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from sklearn.metrics import roc_auc_score, roc_curve

from training.model import CamClassifier, fake_probability, select_cam

FALLBACK_THRESHOLD = 0.5  # used only when no threshold is given and the EER is undefined (one class)


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


def equal_error_rate(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """(EER, threshold) where the false-positive and false-negative rates are closest (both classes needed)."""
    fpr, tpr, thresholds = roc_curve(labels, scores, drop_intermediate=False)
    fnr = 1.0 - tpr
    index = int(np.argmin(np.abs(fnr - fpr)))
    threshold = float(thresholds[index])
    if not np.isfinite(threshold):  # sklearn's first point (nothing called fake) sits at +inf
        threshold = float(np.nextafter(scores.max(), np.inf))
    return float((fpr[index] + fnr[index]) / 2.0), threshold


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
    called_fake = scores >= threshold
    return {
        "auc": auc,
        "eer": eer,
        "eer_threshold": eer_threshold,
        "threshold": float(threshold),
        "accuracy": float((called_fake == labels.astype(bool)).mean()),
        "tpr": float(called_fake[labels == 1].mean()) if n_fake else None,
        "fpr": float(called_fake[labels == 0].mean()) if n_real else None,
        "n_real": n_real,
        "n_fake": n_fake,
    }


def per_source_metrics(labels: np.ndarray, scores: np.ndarray, sources: Sequence, threshold: float) -> dict[str, dict]:
    """Metrics per source (generator or real-photo collection).

    For a source with fakes, its AUC is those fakes against ALL reals (how well this generator is
    caught); for a source of reals only, ALL fakes against its reals. Accuracy, TPR/FPR and counts are
    over the source's own images at `threshold`. A missing source is reported as "unknown".
    """
    labels, scores = _as_arrays(labels, scores)
    sources = np.asarray(["unknown" if s in (None, "") else str(s) for s in sources], dtype=object)
    if sources.size != labels.size:
        raise ValueError(f"{sources.size} sources for {labels.size} samples")
    table = {}
    for source in sorted(set(sources)):
        mine = sources == source
        metrics = binary_metrics(labels[mine], scores[mine], threshold)
        fakes = mine & (labels == 1) if metrics["n_fake"] else labels == 1
        reals = labels == 0 if metrics["n_fake"] else mine & (labels == 0)
        auc = None
        if fakes.any() and reals.any():
            pair = fakes | reals
            auc = float(roc_auc_score(labels[pair], scores[pair]))
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
