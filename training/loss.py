"""The CYBORG loss: alpha * CE + (1 - alpha) * MSE(CAM, H), a pure function of one forward's outputs.

The CAM is the min-max normalised class map of the predicted class (the paper's choice; the choice
itself carries no gradient) or of the true class, compared with the human map H at the CAM grid.
The MSE is averaged over the samples that have a map; a sample without one contributes CE only,
and a batch without any map has a saliency term of 0. No per-sample loop, no second forward.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from training.config import CAM_CLASSES
from training.model import select_cam


@dataclasses.dataclass
class StepResult:
    """What one guidance method's training step gives the loop (training.guidance)."""

    loss: torch.Tensor  # what backward() is called on
    ce: torch.Tensor  # the cross-entropy part, for logs
    guidance_term: torch.Tensor  # the guidance part (0 for plain CE), for logs
    logits: torch.Tensor  # [B, classes], for accuracy
    distillation: torch.Tensor | None = None  # the teacher term (training.distill), for logs; None without a teacher


@dataclasses.dataclass
class LossTerms:
    total: torch.Tensor  # alpha * ce + (1 - alpha) * saliency
    ce: torch.Tensor  # mean cross-entropy over the batch
    saliency: torch.Tensor  # mean over samples with a map of the per-sample MSE(CAM, H); 0 if none


def cam_classes(logits: torch.Tensor, labels: torch.Tensor, cam_class: str) -> torch.Tensor:
    """The class whose CAM is guided, per image: the predicted one (argmax, no gradient) or the true one."""
    if cam_class == "predicted":
        return logits.detach().argmax(dim=1)
    if cam_class == "true":
        return labels
    raise ValueError(f"cam_class {cam_class!r}: choose one of {', '.join(CAM_CLASSES)}")


def cam_for_loss(class_maps: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, cam_class: str) -> torch.Tensor:
    """The normalised CAM [B, h, w] of the predicted (argmax, no gradient) or the true class."""
    return select_cam(class_maps.float(), cam_classes(logits, labels, cam_class))


def saliency_mse(cam: torch.Tensor, saliency: torch.Tensor, has_saliency: torch.Tensor) -> torch.Tensor:
    """Mean over samples with a map of mean((cam - H)^2); 0 when no sample has a map.

    Maps of samples without one are ignored entirely (they may hold anything, even NaN).
    """
    if saliency.shape != cam.shape:
        raise ValueError(f"saliency maps {tuple(saliency.shape)} do not match the CAM grid {tuple(cam.shape)}")
    has = has_saliency.to(device=cam.device, dtype=torch.bool)
    target = torch.where(has.view(-1, 1, 1), saliency.to(cam.dtype), cam.detach())
    per_sample = (cam - target).pow(2).mean(dim=(1, 2))
    return (per_sample * has).sum() / has.sum().clamp_min(1)


def cyborg_loss(
    logits: torch.Tensor,
    class_maps: torch.Tensor,
    labels: torch.Tensor,
    saliency: torch.Tensor,
    has_saliency: torch.Tensor,
    alpha: float,
    cam_class: str = "predicted",
) -> LossTerms:
    """alpha * CE(logits, labels) + (1 - alpha) * MSE(CAM, H) from one forward's logits and class maps."""
    ce = F.cross_entropy(logits.float(), labels)
    if alpha >= 1.0:
        zero = ce.new_zeros(())
        return LossTerms(total=ce, ce=ce, saliency=zero)
    cam = cam_for_loss(class_maps, logits, labels, cam_class)
    term = saliency_mse(cam, saliency, has_saliency)
    return LossTerms(total=alpha * ce + (1.0 - alpha) * term, ce=ce, saliency=term)
