"""Checkpoints: one typed record (`Checkpoint`), written atomically and read back validated.

This module is the only one that knows how a checkpoint is stored. The trainer builds a
`Checkpoint`; export, evaluation, --resume and --weights read one with `read_checkpoint` and use
its attributes. On disk it is `torch.save` of a plain dict (`Checkpoint.to_dict()`, tagged with
FORMAT), so a checkpoint stays readable without this code; `load_checkpoint` returns that dict,
validated, for callers that want the stored form. A checkpoint rebuilds its model on its own
(`model_from_checkpoint`).
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.errors import UserError
from core.images import spread
from training.config import TrainConfig
from training.model import CamClassifier, EnsembleCamClassifier, create_classifier

FORMAT_VERSION = 1
FORMAT = f"cyborg-checkpoint-{FORMAT_VERSION}"
REQUIRED = ("config", "model", "mean", "std", "image_size")  # what rebuilding and exporting the model needs


class CheckpointError(UserError):
    """A checkpoint that is missing, truncated, corrupt or not a cyborg checkpoint."""


@dataclasses.dataclass
class ValPredictions:
    """The validation split's scores, in the order the trainer scored them (one entry per image)."""

    paths: list[str] = dataclasses.field(default_factory=list)
    labels: list[int] = dataclasses.field(default_factory=list)
    scores: list[float] = dataclasses.field(default_factory=list)
    sources: list[str] = dataclasses.field(default_factory=list)

    def labelled_scores(self) -> tuple[np.ndarray | None, np.ndarray | None]:
        """(labels, scores) as arrays, or (None, None) when they are missing or of different lengths."""
        if not self.labels or not self.scores or len(self.labels) != len(self.scores):
            return None, None
        return np.asarray(self.labels, dtype=np.int64), np.asarray(self.scores, dtype=np.float64)

    def existing_images(self, limit: int | None = None) -> tuple[list[str], list[int]]:
        """Paths and labels of the validation images that still exist here, up to `limit` spread evenly."""
        labels = self.labels or [None] * len(self.paths)
        found = [(str(p), int(label) if label is not None else -1) for p, label in zip(self.paths, labels) if Path(p).is_file()]
        if limit is not None:
            found = spread(found, limit)
        return [p for p, _ in found], [label for _, label in found]

    def samples(self, purpose: str) -> list:
        """The validation images as `training.data.Sample`s (split "val") in the recorded order; UserError
        "`purpose`, but ..." when none are recorded with labels or some are missing here."""
        from training.data import Sample

        missing = [path for path in self.paths if not Path(path).is_file()]
        if missing or not self.paths or len(self.labels) != len(self.paths):
            found = f"{len(missing)} of {len(self.paths)} of them are missing here (first: {missing[0]})" if missing else "none are recorded with labels"
            raise UserError(f"{purpose}, but {found}")
        sources = self.sources or [""] * len(self.paths)
        return [Sample(Path(p), int(label), "val", source) for p, label, source in zip(self.paths, self.labels, sources)]


@dataclasses.dataclass
class Checkpoint:
    """What `cyborg train` saves each epoch (last.pt, and best.pt when validation AUC improves)."""

    config: TrainConfig | None = None
    model: dict[str, torch.Tensor] | None = None  # the unwrapped CamClassifier's state_dict (with --ema-decay: the average)
    mean: tuple[float, float, float] | None = None  # in [0, 1]: the normalisation inside the model
    std: tuple[float, float, float] | None = None
    image_size: int | None = None
    scale: int | None = None  # the shorter side images were scaled to before cropping; None: image_size
    cam_grid: tuple[int, int] | None = None
    epoch: int = 0  # epochs completed
    best: dict[str, Any] = dataclasses.field(default_factory=lambda: {"epoch": None, "val_auc": None})
    saliency: str | None = None  # "human" | "proxy" | "none"
    data: dict[str, Any] = dataclasses.field(default_factory=dict)  # training.trainer.load_data's summary
    val_metrics: dict[str, Any] = dataclasses.field(default_factory=dict)  # training.evaluate.binary_metrics
    val_predictions: ValPredictions = dataclasses.field(default_factory=ValPredictions)
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # metrics.jsonl rows so far
    ensemble: list[dict[str, Any]] | None = None  # an averaged model's members (training.ensemble); None: one network
    norm_statistics: dict[str, Any] | None = None  # BatchNorm statistics set after training (training.norm_statistics)
    # The optimisation state --resume restores.
    training_model: dict[str, torch.Tensor] | None = None  # with --ema-decay: the raw weights the optimiser steps
    optimizer: dict[str, Any] | None = None
    scheduler: dict[str, Any] | None = None
    scaler: dict[str, Any] | None = None
    rng: dict[str, Any] | None = None

    @classmethod
    def from_dict(cls, state: Mapping[str, Any], where: str = "checkpoint") -> Checkpoint:
        """A validated Checkpoint from its stored form (the "format" tag is checked by `read_checkpoint`)."""
        values = {key: value for key, value in state.items() if key != "format"}
        unknown = sorted(set(values) - {field.name for field in dataclasses.fields(cls)})
        if unknown:
            raise CheckpointError(f"{where}: unknown checkpoint keys {', '.join(unknown)}")
        try:
            if values.get("config") is not None:
                values["config"] = TrainConfig.from_dict(values["config"])
            for key in ("mean", "std", "cam_grid"):
                if values.get(key) is not None:
                    values[key] = tuple(values[key])
            if values.get("val_predictions") is not None:
                values["val_predictions"] = ValPredictions(**values["val_predictions"])
            for key in ("best", "data", "val_metrics", "val_predictions", "history"):
                if values.get(key) is None:
                    values.pop(key, None)
            checkpoint = cls(**values)
        except (TypeError, UserError) as error:
            raise CheckpointError(f"{where}: invalid checkpoint ({error})") from error
        checkpoint.validate(where)
        return checkpoint

    def validate(self, where: str = "checkpoint") -> None:
        problems = []
        for key in ("mean", "std"):
            value = getattr(self, key)
            if value is not None and len(value) != 3:
                problems.append(f"{key} {value!r} (3 values)")
        if self.image_size is not None and (not isinstance(self.image_size, int) or self.image_size < 1):
            problems.append(f"image_size {self.image_size!r}")
        if self.scale is not None and (not isinstance(self.scale, int) or self.scale < (self.image_size or 1)):
            problems.append(f"scale {self.scale!r} (at least image_size)")
        if self.cam_grid is not None and len(self.cam_grid) != 2:
            problems.append(f"cam_grid {self.cam_grid!r}")
        if not isinstance(self.epoch, int) or self.epoch < 0:
            problems.append(f"epoch {self.epoch!r}")
        if problems:
            raise CheckpointError(f"{where}: invalid checkpoint: {'; '.join(problems)}")

    @property
    def architecture(self) -> str:
        """The network's name: the architecture, or "ensemble of N: a + b" for an averaged model."""
        if self.ensemble:
            return f"ensemble of {len(self.ensemble)}: " + " + ".join(member["arch"] for member in self.ensemble)
        return self.config.arch

    @property
    def input_scale(self) -> int:
        """The preprocessing scale (core.contract.ModelContract.scale) the model was trained at."""
        return int(self.scale or self.image_size)

    def require(self, where: str = "checkpoint") -> Checkpoint:
        """Self, or CheckpointError naming what a usable checkpoint lacks."""
        missing = [key for key in REQUIRED if getattr(self, key) is None]
        if missing:
            raise CheckpointError(f"{where}: checkpoint lacks {', '.join(missing)}")
        return self

    def to_dict(self) -> dict[str, Any]:
        """The stored form: plain Python types and tensors (no dataclasses), tagged with FORMAT."""
        state = {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}
        state["config"] = self.config.to_dict() if self.config is not None else None
        state["val_predictions"] = dataclasses.asdict(self.val_predictions)
        for key in ("mean", "std", "cam_grid"):
            if state[key] is not None:
                state[key] = list(state[key])
        return {"format": FORMAT, **state}


def as_checkpoint(state: Checkpoint | Mapping[str, Any]) -> Checkpoint:
    """A Checkpoint from either form (a loaded checkpoint's dict, or a Checkpoint)."""
    return state if isinstance(state, Checkpoint) else Checkpoint.from_dict(state)


def save_checkpoint(checkpoint: Checkpoint | Mapping[str, Any], path: str | Path) -> None:
    """Validate and write a checkpoint through a temporary file and a rename: never a half-written file."""
    state = as_checkpoint(checkpoint).to_dict()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Read and validate a checkpoint written by `save_checkpoint`; clear errors for anything else."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as error:  # torch raises many types for truncated or foreign files
        raise CheckpointError(f"{path}: corrupt or truncated checkpoint ({type(error).__name__}: {error})") from error
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a cyborg checkpoint (expected format {FORMAT!r})")
    return Checkpoint.from_dict(state, where=str(path))


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The stored (dict) form of a validated checkpoint."""
    return read_checkpoint(path, map_location).to_dict()


def model_from_checkpoint(state: Checkpoint | Mapping[str, Any]) -> tuple[CamClassifier | EnsembleCamClassifier, TrainConfig]:
    """Rebuild the trained model (in eval mode) and its config from a loaded checkpoint."""
    checkpoint = as_checkpoint(state).require()
    config = checkpoint.config
    architectures = [member["arch"] for member in checkpoint.ensemble] if checkpoint.ensemble else [config.arch]
    try:
        networks = [create_classifier(arch, mean=checkpoint.mean, std=checkpoint.std) for arch in architectures]
        model = EnsembleCamClassifier(networks) if checkpoint.ensemble else networks[0]
        model.load_state_dict(checkpoint.model)  # each member's own normalisation buffers come with it
    except (KeyError, RuntimeError, ValueError) as error:
        raise CheckpointError(f"checkpoint does not match architecture {checkpoint.architecture!r}: {error}") from error
    return model.eval(), config


def validation_images(state: Checkpoint | Mapping[str, Any], limit: int | None = None) -> tuple[list[str], list[int]]:
    """Paths and labels of the checkpoint's validation images that still exist."""
    return as_checkpoint(state).val_predictions.existing_images(limit)
