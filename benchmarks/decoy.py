"""A decoy data set: does a detector decide for the reasons the human map marks?

Built from real, FFHQ-aligned face photos. Each face appears twice: as "real" (unchanged) and as
"fake" (a faint checkerboard, the signature of GAN up-sampling, added inside the eye and mouth
regions that the human map marks). In the "decoy" task a corner patch outside those regions
(bright for fake, dark for real) agrees with the label in training and validation and is random
in testing, so a model that decides from the corner scores near chance on the test split and
follows the corner in about all of its test decisions. The "clean" task has no corner patch: the
control that shows the true cue is learnable at all, and the in-distribution task on which every
guidance method's validation AUC is compared.

Everything lives in memory as tensors shaped like `training.data.FaceDataset` items, so the
guidance methods train on it exactly as they do on files.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from core.contract import FAKE_INDEX, REAL_INDEX
from core.errors import UserError
from core.heatmaps import upsample
from core.images import is_image_file, read_image, to_model_input
from training.saliency import FFHQ_ANNOTATED_REGIONS

REAL = REAL_INDEX
FACE_PARTS = FFHQ_ANNOTATED_REGIONS  # the annotated regions, as ellipses
TASKS = ("decoy", "clean")
SPLITS = ("train", "val", "test")


@dataclasses.dataclass(frozen=True)
class DecoySpec:
    cue_amplitude: float = 8.0  # +- grey levels of the checkerboard inside the regions of fakes
    decoy_fraction: float = 0.1875  # side of the corner patch, as a fraction of the image side
    decoy_strength: float = 1.0  # blend of the patch colour (white: fake, black: real) into the corner
    split_fractions: tuple[float, float, float] = (0.6, 0.15, 0.25)  # faces per train / val / test


@dataclasses.dataclass
class DecoySplit:
    """One split of one task: FaceDataset-like tensors plus which class the corner patch signals."""

    image: torch.Tensor  # uint8 [N, 3, S, S]
    label: torch.Tensor  # long [N]
    saliency: torch.Tensor  # float [N, h, w] at the CAM grid
    decoy_class: torch.Tensor  # long [N]: class signalled by the corner patch, -1 where there is none

    def __len__(self) -> int:
        return len(self.label)

    def batch(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        return {
            "image": self.image[index],
            "label": self.label[index],
            "saliency": self.saliency[index],
            "has_saliency": torch.ones(len(index), dtype=torch.bool),
            "index": index,
        }


def part_mask(size: int) -> np.ndarray:
    """float32 [size, size]: 1 inside the annotated face parts, 0 outside (hard edges)."""
    centres = (np.arange(size, dtype=np.float32) + 0.5) / size
    y, x = np.meshgrid(centres, centres, indexing="ij")
    mask = np.zeros((size, size), dtype=np.float32)
    for cx, cy, rx, ry in FACE_PARTS.values():
        mask = np.maximum(mask, (((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 <= 1.0).astype(np.float32))
    return mask


def human_map(size: int, grid: tuple[int, int]) -> torch.Tensor:
    """The annotated regions as a human-style map at the CAM grid: area-averaged, min-max normalised."""
    mask = torch.from_numpy(part_mask(size))[None, None]
    small = F.adaptive_avg_pool2d(mask, grid)[0, 0]
    return (small - small.min()) / (small.max() - small.min()).clamp_min(1e-6)


def decoy_box(size: int, spec: DecoySpec) -> tuple[slice, slice]:
    side = max(1, round(size * spec.decoy_fraction))
    return slice(0, side), slice(0, side)


def add_true_cue(images: torch.Tensor, spec: DecoySpec) -> torch.Tensor:
    """The faint checkerboard (+-amplitude, period 2 px) inside the face parts of uint8 images."""
    size = images.shape[-1]
    rows = torch.arange(size).view(-1, 1)
    cols = torch.arange(size).view(1, -1)
    checker = ((rows + cols) % 2).float() * 2.0 - 1.0
    pattern = checker * torch.from_numpy(part_mask(size)) * spec.cue_amplitude
    return (images.float() + pattern).clamp(0, 255).round().to(torch.uint8)


def add_decoy(images: torch.Tensor, decoy_class: torch.Tensor, spec: DecoySpec) -> torch.Tensor:
    """Blend a white (class fake) or black (class real) patch into the top-left corner."""
    out = images.clone()
    rows, cols = decoy_box(images.shape[-1], spec)
    colour = (decoy_class == FAKE_INDEX).float().view(-1, 1, 1, 1) * 255.0
    corner = out[:, :, rows, cols].float()
    out[:, :, rows, cols] = ((1 - spec.decoy_strength) * corner + spec.decoy_strength * colour).round().to(torch.uint8)
    return out


def load_faces(folder: str | os.PathLike[str], size: int, limit: int | None = None) -> torch.Tensor:
    """uint8 [N, 3, size, size] from the image files of a folder (sorted by name), resized as in training."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: not a folder of face photos")
    paths = sorted(path for path in folder.iterdir() if is_image_file(path))[:limit]
    if len(paths) < 8:
        raise UserError(f"{folder}: {len(paths)} images found; the decoy benchmark needs at least 8")
    return torch.from_numpy(np.stack([to_model_input(read_image(path), size, size) for path in paths]))


def make_split(faces: torch.Tensor, decoy: str, grid: tuple[int, int], spec: DecoySpec, generator: torch.Generator) -> DecoySplit:
    """Every face as real and as fake; decoy "agree", "random" or "none"."""
    count = len(faces)
    label = torch.cat([torch.full((count,), REAL), torch.full((count,), FAKE_INDEX)]).long()
    image = torch.cat([faces, add_true_cue(faces, spec)])
    if decoy == "agree":
        decoy_class = label.clone()
    elif decoy == "random":
        decoy_class = torch.randint(0, 2, (2 * count,), generator=generator)
    elif decoy == "none":
        decoy_class = torch.full((2 * count,), -1, dtype=torch.long)
    else:
        raise ValueError(f"decoy {decoy!r}: one of agree, random, none")
    if decoy != "none":
        image = add_decoy(image, decoy_class, spec)
    saliency = human_map(faces.shape[-1], grid).expand(2 * count, *grid).contiguous()
    return DecoySplit(image=image, label=label, saliency=saliency, decoy_class=decoy_class)


def build_decoy_set(faces: torch.Tensor, grid: tuple[int, int], spec: DecoySpec = DecoySpec(), seed: int = 0) -> dict[str, dict[str, DecoySplit]]:
    """{task: {split: DecoySplit}}; faces are split (by a fixed seed) before any copy is made."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(faces), generator=generator)
    n_train = round(spec.split_fractions[0] * len(faces))
    n_val = round(spec.split_fractions[1] * len(faces))
    parts = {"train": order[:n_train], "val": order[n_train : n_train + n_val], "test": order[n_train + n_val :]}
    decoy_modes = {"decoy": {"train": "agree", "val": "agree", "test": "random"}, "clean": dict.fromkeys(SPLITS, "none")}
    return {
        task: {split: make_split(faces[parts[split]], modes[split], grid, spec, generator) for split in SPLITS}
        for task, modes in decoy_modes.items()
    }


# ---- training and measuring one guidance method on one task -------------------------------------


@dataclasses.dataclass
class Trained:
    model: torch.nn.Module
    step_seconds: float  # median wall time of one training step
    diverged: bool = False  # the loss became NaN or infinite; training stopped there


def train_method(split: DecoySplit, config, epochs: int, seed: int) -> Trained:
    """Train `config.arch` with `config.guidance` from `config.weights` (none: from scratch) on an in-memory
    split on the CPU, with the trainer's own model, optimiser and training step (training.trainer), without
    its data loading."""
    import time

    from training.guidance import get_method
    from training.trainer import backward_step, build_model, build_optimizer, forward_step, set_train_mode, to_device

    torch.manual_seed(seed)
    model = build_model(config)
    if config.channels_last:  # as the trainer does: about 2x faster on the CPU
        model.to(memory_format=torch.channels_last)
    method = get_method(config.guidance)
    optimiser = build_optimizer(config, model)
    scaler = torch.amp.GradScaler("cuda", enabled=False)  # fp16 loss scaling is for CUDA only
    cpu = torch.device("cpu")
    generator = torch.Generator().manual_seed(seed)
    times = []
    set_train_mode(model, config)
    for _ in range(epochs):
        order = torch.randperm(len(split), generator=generator)
        for start in range(0, len(order) - config.batch_size + 1, config.batch_size):  # full batches only
            batch = to_device(split.batch(order[start : start + config.batch_size]), cpu, config.channels_last)
            began = time.perf_counter()
            result = forward_step(model, batch, method, config, cpu)
            if not torch.isfinite(result.loss):
                return Trained(model=model.eval(), step_seconds=float(np.median(times)) if times else float("nan"), diverged=True)
            backward_step(result, optimiser, scaler)
            times.append(time.perf_counter() - began)
    return Trained(model=model.eval(), step_seconds=float(np.median(times)) if times else float("nan"))


@torch.no_grad()
def outputs(model: torch.nn.Module, split: DecoySplit, batch_size: int = 64) -> tuple[np.ndarray, torch.Tensor]:
    """Fake probabilities [N] and the normalised predicted-class CAMs [N, h, w] (the exported CAM)."""
    from training.model import fake_probability, select_cam

    scores, cams = [], []
    for start in range(0, len(split), batch_size):
        out = model(split.image[start : start + batch_size])
        scores.append(fake_probability(out.logits))
        cams.append(select_cam(out.class_maps.float(), out.logits.argmax(dim=1)))
    return torch.cat(scores).numpy(), torch.cat(cams)


def cam_inside_share(cams: torch.Tensor, saliency: torch.Tensor) -> float:
    """Mean share of each CAM's mass on the annotated cells (H >= 0.5)."""
    inside = (saliency >= 0.5).float()
    mass = cams.sum(dim=(1, 2)).clamp_min(1e-6)
    return float(((cams * inside).sum(dim=(1, 2)) / mass).mean())


def measure(model: torch.nn.Module, val: DecoySplit, test: DecoySplit) -> dict[str, float | None]:
    """Validation AUC, test AUC, the share of test decisions that follow the decoy, CAM mass inside."""
    from training.evaluate import binary_metrics

    val_scores, _ = outputs(model, val)
    if not np.isfinite(val_scores).all():  # a diverged model has no metrics
        return dict.fromkeys(("val_auc", "test_auc", "follows_decoy", "cam_inside"))
    val_metrics = binary_metrics(val.label.numpy(), val_scores)
    test_scores, cams = outputs(model, test)
    test_metrics = binary_metrics(test.label.numpy(), test_scores)
    called_fake = test_scores >= val_metrics["eer_threshold"]  # the threshold a user would pick: validation EER
    has_decoy = test.decoy_class.numpy() >= 0
    follows = float((called_fake[has_decoy] == (test.decoy_class.numpy()[has_decoy] == FAKE_INDEX)).mean()) if has_decoy.any() else None
    return {
        "val_auc": val_metrics["auc"],
        "test_auc": test_metrics["auc"],
        "follows_decoy": follows,
        "cam_inside": cam_inside_share(cams, test.saliency),
    }


def save_cam_overlays(models: dict[str, torch.nn.Module], test: DecoySplit, path: str | os.PathLike[str], count: int = 4) -> None:
    """One row per method: test images whose corner contradicts the label, the exported CAM over them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    contradicting = torch.nonzero((test.decoy_class >= 0) & (test.decoy_class != test.label)).flatten()
    reals = contradicting[test.label[contradicting] == REAL][: count // 2]
    fakes = contradicting[test.label[contradicting] == FAKE_INDEX][: count - len(reals)]
    chosen = torch.cat([reals, fakes])
    subset = DecoySplit(test.image[chosen], test.label[chosen], test.saliency[chosen], test.decoy_class[chosen])
    size = test.image.shape[-1]
    outline = part_mask(size)
    figure, axes = plt.subplots(len(models), len(chosen), figsize=(1.3 * len(chosen), 1.4 * len(models)), squeeze=False)
    for row, (name, model) in enumerate(models.items()):
        scores, cams = outputs(model, subset)
        cams = upsample(cams.numpy(), size, size)
        for col in range(len(chosen)):
            axis = axes[row, col]
            axis.imshow(subset.image[col].permute(1, 2, 0).numpy())
            axis.imshow(cams[col], cmap="jet", alpha=0.45, vmin=0.0, vmax=1.0)
            axis.contour(outline, levels=[0.5], colors="white", linewidths=0.5)
            truth = "fake" if subset.label[col] == FAKE_INDEX else "real"
            axis.set_title(f"{truth}: p(fake) {scores[col]:.2f}", fontsize=6)
            axis.set_xticks([])
            axis.set_yticks([])
        axes[row, 0].set_ylabel(name, fontsize=7)
    figure.tight_layout(pad=0.3)
    figure.savefig(path, dpi=110)
    plt.close(figure)
