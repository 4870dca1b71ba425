"""Checkpoints: written atomically, readable on their own (they rebuild the model)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from cyborg.errors import UserError
from training.config import TrainConfig
from training.model import CamClassifier, create_classifier

FORMAT = "cyborg-checkpoint-1"


class CheckpointError(UserError):
    """A checkpoint that is missing, truncated, corrupt or not a cyborg checkpoint."""


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Write `state` to `path` through a temporary file and a rename: never a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save({"format": FORMAT, **state}, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by `save_checkpoint`; clear errors for anything else."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as error:  # torch raises many types for truncated or foreign files
        raise CheckpointError(f"{path}: corrupt or truncated checkpoint ({type(error).__name__}: {error})") from error
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a cyborg checkpoint (expected format {FORMAT!r})")
    return state


def model_from_checkpoint(state: dict[str, Any]) -> tuple[CamClassifier, TrainConfig]:
    """Rebuild the trained model (in eval mode) and its config from a loaded checkpoint."""
    config = TrainConfig.from_dict(state["config"])
    try:
        model = create_classifier(config.arch, mean=tuple(state["mean"]), std=tuple(state["std"]))
        model.load_state_dict(state["model"])
    except (KeyError, RuntimeError, ValueError) as error:
        raise CheckpointError(f"checkpoint does not match architecture {config.arch!r}: {error}") from error
    return model.eval(), config
