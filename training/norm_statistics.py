"""A finished network's BatchNorm statistics measured again (`cyborg norm-statistics`).

A network trained under augmentation ends with BatchNorm running averages over augmented batches;
`cyborg train --precise-bn` measures them afresh during training. This sets them on a finished
checkpoint (one network or an ensemble) without training: N of its training images, a seeded share
of them through the everyday changes first (`training.trainer.norm_statistics_images`, the same
images `--precise-bn N --precise-bn-changed F` would take), then the validation split scored again
so the checkpoint's validation figures, calibration and operating points describe the new network.
The weights are unchanged; only the statistics (running mean and variance) are.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from core import contract as c
from core.errors import UserError
from training.checkpoint import Checkpoint, read_checkpoint
from training.config import TrainConfig, augmentation_names
from training.model import EnsembleCamClassifier

# The TrainConfig fields that decide what the changed share of the images goes through.
AUGMENTATION_FIELDS = tuple(field.name for field in dataclasses.fields(TrainConfig) if field.name.startswith("augment"))


def training_images_config(checkpoint: Checkpoint, data: list[str] | None, images: int, changed: float,
                           augmentation: dict[str, Any], seed: int | None) -> TrainConfig:  # fmt: skip
    """The checkpoint's config with the statistics' images set (`precise_bn`, `precise_bn_changed`), its
    augmentation changed by `augmentation` (TrainConfig fields), checked as `cyborg train` checks them."""
    if images < 1:
        raise UserError(f"--images {images}: at least 1 training image")
    if not 0.0 <= changed <= 1.0:
        raise UserError(f"--changed {changed}: a share of the images, in [0, 1]")
    config = dataclasses.replace(
        checkpoint.config, **augmentation, data=list(data) if data else checkpoint.config.data,
        precise_bn=images, precise_bn_changed=changed, freeze_bn=False, teacher=None, distill_view="augmented",
        seed=checkpoint.config.seed if seed is None else seed,
    )  # fmt: skip
    if changed and not augmentation_names(config.augment):
        raise UserError(f"--changed {changed} sends a share of the images through everyday changes, but the augmentation is "
                        f"{config.augment!r}; pass --augment (e.g. everyday) and its strength (--augment-p ...)")  # fmt: skip
    config.validate()
    return config


def training_split(checkpoint: Checkpoint, config: TrainConfig) -> list:
    """The training samples of `config.data`, split as the checkpoint's run split them; UserError when
    that split's validation images are not the checkpoint's (statistics measured on validation images
    would flatter the figures measured on them)."""
    from training.data import data_folders, discover, split_samples

    folders = ", ".join(map(str, data_folders(config.data)))
    splits = split_samples(discover(config.data, config.csv, None), config.val_fraction, checkpoint.config.seed)
    expected = sorted(checkpoint.val_predictions.paths)
    found = sorted(str(sample.path) for sample in splits["val"])
    if expected and found != expected:
        raise UserError(
            f"{folders}: the validation split drawn from these folders "
            f"({len(found)} images) is not the checkpoint's ({len(expected)} images, "
            f"{len(set(expected) & set(found))} in common); give the folders it was trained on"
        )
    if not splits["train"]:
        raise UserError(f"{folders}: no training images")
    return splits["train"]


def batch_norms(model: torch.nn.Module) -> list[list[torch.nn.modules.batchnorm._BatchNorm]]:
    """Each network's BatchNorms in its module order, the order these networks run them (an ensemble: one list per member)."""
    networks = list(model.members) if isinstance(model, EnsembleCamClassifier) else [model]
    return [[m for m in network.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)] for network in networks]


def kept_statistics(model: torch.nn.Module, keep_first: int) -> list[tuple[torch.nn.Module, dict[str, torch.Tensor]]]:
    """A copy of the statistics of each network's first `keep_first` BatchNorms, to put back after measuring."""
    norms = batch_norms(model)
    fewest = min(len(network) for network in norms)
    if not 0 <= keep_first <= fewest:
        raise UserError(f"--keep-first {keep_first}: between 0 and the {fewest} BatchNorms of each network")
    return [(norm, {name: buffer.clone() for name, buffer in norm.named_buffers()}) for network in norms for norm in network[:keep_first]]


def set_norm_statistics(path: str | Path, *, data: list[str] | None = None, images: int = 800, changed: float = 0.0,
                        augmentation: dict[str, Any] | None = None, seed: int | None = None, keep_first: int = 0,
                        batch_size: int = 32, device: str = "cpu") -> Checkpoint:  # fmt: skip
    """The checkpoint at `path` with its BatchNorms' statistics measured on `images` training images, a
    share `changed` of them through `augmentation` first (each network's first `keep_first` BatchNorms
    keep theirs), and its validation split scored again."""
    from training.augment import make_augmenter
    from training.checkpoint import model_from_checkpoint
    from training.data import FaceDataset, data_folders
    from training.distributed import DistInfo
    from training.evaluate import score_samples
    from training.trainer import norm_statistics_images, precise_norm_statistics

    path = Path(path)
    checkpoint = read_checkpoint(path).require(str(path))
    model = model_from_checkpoint(checkpoint)[0].to(device)
    config = training_images_config(checkpoint, data, images, changed, augmentation or {}, seed)
    config = dataclasses.replace(config, batch_size=batch_size, workers=0)
    size, grid, scale = int(checkpoint.image_size), tuple(checkpoint.cam_grid), checkpoint.input_scale
    train = FaceDataset(training_split(checkpoint, config), size, grid, train=True, augmenter=make_augmenter(config),
                        scale=scale, seed=config.seed)  # fmt: skip
    kept = kept_statistics(model, keep_first)
    chosen = norm_statistics_images(train, config)
    precise_norm_statistics([model], chosen, config, DistInfo(device=torch.device(device)))
    for norm, buffers in kept:
        for name, value in buffers.items():
            getattr(norm, name).copy_(value)
    samples = checkpoint.val_predictions.samples("the network is validated again on its validation images")
    metrics, scored = score_samples(model.eval(), samples, size, grid, scale, batch_size, device)
    record = {
        "checkpoint": str(path),
        "checkpoint_sha256": c.sha256_file(path),
        "data": [str(folder) for folder in data_folders(config.data)],
        "images": len(chosen),
        "changed": round(config.precise_bn_changed * len(chosen)),
        "share_changed": config.precise_bn_changed,
        "seed": config.seed,
        "kept_first": keep_first,
        "augmentation": {field: getattr(config, field) for field in AUGMENTATION_FIELDS} if config.precise_bn_changed else None,
        "val_auc_before": checkpoint.val_metrics.get("auc"),
    }
    return dataclasses.replace(
        checkpoint, model=model.cpu().state_dict(), val_metrics=metrics, val_predictions=scored,
        best={"epoch": checkpoint.best.get("epoch"), "val_auc": metrics["auc"]}, norm_statistics=record,
        training_model=None, optimizer=None, scheduler=None, scaler=None, rng=None,
    )  # fmt: skip
