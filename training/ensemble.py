"""Ensembles: several trained checkpoints averaged into one model, one checkpoint and one exported graph.

The members' class maps and biases are averaged, so the ensemble's logits are the mean of the
members' logits and its CAM is still exactly the map its decision is made from (mean over the grid
plus the bias). Every member must take the same input (size, scale) and give the same CAM grid, and
all must have been validated on the same images: the ensemble's calibration and operating points are
fitted on its own validation scores, which `build_ensemble` measures by running it over those images.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from core import contract as c
from core.errors import UserError
from training.checkpoint import Checkpoint, model_from_checkpoint, read_checkpoint
from training.model import EnsembleCamClassifier, cam_grid


def member_record(path: Path, checkpoint: Checkpoint) -> dict[str, Any]:
    """What the ensemble checkpoint (and model.json) says about one member."""
    return {
        "arch": checkpoint.config.arch,
        "checkpoint": str(path),
        "checkpoint_sha256": c.sha256_file(path),
        "seed": checkpoint.config.seed,
        "guidance": checkpoint.config.guidance,
        "epochs": checkpoint.epoch,
        "best": checkpoint.best,
        "val_auc": checkpoint.val_metrics.get("auc"),
        **({"norm_statistics": checkpoint.norm_statistics} if checkpoint.norm_statistics else {}),
    }


def check_compatible(paths: Sequence[Path], members: Sequence[Checkpoint]) -> None:
    """UserError naming the first member that cannot be averaged with the first one."""
    first_path, first = paths[0], members[0]
    for path, member in zip(paths, members):
        if member.ensemble:
            raise UserError(f"{path}: already an ensemble; list its members' checkpoints instead")
    for path, member in zip(paths[1:], members[1:]):
        for what, mine, theirs in (
            ("input size", member.image_size, first.image_size),
            ("scale", member.input_scale, first.input_scale),
        ):
            if mine != theirs:
                raise UserError(f"{path}: {what} {mine}, but {first_path} has {theirs}; members must take the same input")
        if sorted(member.val_predictions.paths) != sorted(first.val_predictions.paths):
            raise UserError(
                f"{path} was validated on other images than {first_path}; train the members on the same data "
                "with the same --seed split (--val-fraction, data folders) so the ensemble can be validated"
            )


def build_ensemble(paths: Sequence[str | Path], batch_size: int = 32, device: str = "cpu") -> Checkpoint:
    """One checkpoint whose model averages the checkpoints at `paths`, validated on their validation images."""
    from training.evaluate import score_samples

    paths = [Path(p) for p in paths]
    if len(paths) < 2:
        raise UserError("an ensemble needs at least two checkpoints")
    members = [read_checkpoint(path).require(str(path)) for path in paths]
    check_compatible(paths, members)
    model = EnsembleCamClassifier([model_from_checkpoint(member)[0] for member in members]).eval()
    size = int(members[0].image_size)
    grids = {tuple(cam_grid(member, size)) for member in model.members}
    grid = next(iter(grids))
    if len(grids) > 1:
        raise UserError(f"the members' CAM grids differ at {size} px ({', '.join(map(str, sorted(grids)))}); average members with one grid")
    samples = members[0].val_predictions.samples("the ensemble is validated on its members' validation images")
    metrics, scored = score_samples(model.to(device), samples, size, grid, members[0].input_scale, batch_size, device)
    records = [member_record(path, member) for path, member in zip(paths, members)]
    first = members[0]
    return Checkpoint(
        config=first.config,
        model=model.cpu().state_dict(),
        mean=first.mean,
        std=first.std,
        image_size=size,
        scale=first.scale,
        cam_grid=grid,
        epoch=max(member.epoch for member in members),
        best={"epoch": None, "val_auc": metrics["auc"]},
        saliency=first.saliency,
        data=first.data,
        val_metrics=metrics,
        val_predictions=scored,
        ensemble=records,
    )
