"""Knowledge distillation: a trained model (often a `cyborg ensemble`) teaches one network.

Hinton et al. (2015), "Distilling the knowledge in a neural network": the student's loss gains
`weight * T^2 * KL(softmax(teacher / T) || softmax(student / T))` beside its own loss (CE and the
guidance term), so one network can learn what several averaged networks say, at one network's cost.
The teacher sees the student's batch (the same augmentation), in eval mode, without gradients; with
`--distill-view clean` it sees the same faces, framed and cropped alike, before the everyday changes of
the pixels (the batch's "teacher_image"), so the student learns to say on a blurred or re-compressed
face what the teacher says on the clean one.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from core.errors import UserError
from training.guidance import GuidanceMethod
from training.loss import StepResult


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(teacher / T) || softmax(student / T)), averaged over the batch.

    The T^2 keeps its gradients on the scale of the cross-entropy's whatever the temperature (Hinton et al.).
    """
    student = F.log_softmax(student_logits.float() / temperature, dim=1)
    teacher = F.log_softmax(teacher_logits.detach().float() / temperature, dim=1)
    return F.kl_div(student, teacher, reduction="batchmean", log_target=True) * temperature**2


def load_teacher(path: str | Path, image_size: int, scale: int, device: torch.device) -> nn.Module:
    """The teacher's network (one, or an ensemble) in eval mode with frozen weights, on `device`.

    UserError when it cannot read the student's input: a teacher trained at another size or scale would
    judge other pixels than the student sees.
    """
    from training.checkpoint import model_from_checkpoint, read_checkpoint

    checkpoint = read_checkpoint(path).require(str(path))
    for what, theirs, mine in (("input size", int(checkpoint.image_size), image_size), ("scale", checkpoint.input_scale, scale)):
        if theirs != mine:
            raise UserError(f"--teacher {path}: {what} {theirs} px, but the student is trained at {mine}; "
                            "train the student at the teacher's --image-size and --scale")  # fmt: skip
    model, _ = model_from_checkpoint(checkpoint)
    model.requires_grad_(False)
    return model.to(device).eval()


def with_teacher(method: GuidanceMethod, teacher: nn.Module, weight: float, temperature: float) -> GuidanceMethod:
    """`method`'s training step plus the distillation term toward `teacher`'s logits on the same images
    (the batch's "teacher_image" where it has one: `--distill-view clean`)."""

    def step(model: nn.Module, batch: dict[str, torch.Tensor], config) -> StepResult:
        result = method(model, batch, config)
        with torch.no_grad():
            teacher_logits = teacher(batch.get("teacher_image", batch["image"])).logits
        term = distillation_loss(result.logits, teacher_logits, temperature)
        return dataclasses.replace(result, loss=result.loss + weight * term, distillation=term)

    return step
