"""Guidance methods beyond the CYBORG loss: they constrain which input pixels carry the evidence.

Matching the CAM to the human map H moves the heatmap more than the decision when the last
feature cells see the whole image (measured: docs/guidance.md). These methods act on the input instead, or on the map that actually drives the softmax:

- `cam_diff`: CYBORG's MSE on the CAM of the logit difference (chosen class minus the other: for
  a fake, fake-minus-real), the map whose mean *is* the decision's margin.
- `rrr`: Right for the Right Reasons (Ross, Hughes, Doshi-Velez, IJCAI 2017): penalise the input
  gradient of the summed log-probabilities outside H, weight * sum((1 - H_up) * dx sum_k log p_k)^2,
  by double backward.
- `mask`: train on images whose non-salient pixels are replaced by the normalisation mean (grey),
  in the spirit of the authors' earlier human-aided saliency training (Boyd et al., WACV 2021,
  which blurred them; a blur keeps a low-frequency trace of a corner cue, grey keeps none).
- `consistency`: cross-entropy on the image plus weight * KL(p(x) || p(x_masked)), the decision
  must not change when the non-salient pixels are removed (Saliency Guided Training, Ismail et
  al., NeurIPS 2021, with the human map in place of the model's own saliency).
- `mask_cyborg`: `mask` with the CYBORG term on the masked image, so that the exported CAM, not
  only the decision, sits on the annotated regions.
- `blur`: `mask` with the non-salient pixels blurred instead of grey (Boyd et al.'s own choice): the
  context keeps its colours and layout, and so also a low-frequency trace of any cue there.
- `swap`: train on images whose non-salient pixels come from another image of the batch: real
  content that carries no label information (the measured recommendation, docs/guidance.md).

Every method is `alpha * CE + (1 - alpha) * term` except `mask` and `swap` (CE on the changed image); H is at
the CAM grid and is bilinearly upsampled to the input size for the pixel-level methods. Samples
without a map contribute CE only, as in the CYBORG loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from core.contract import FAKE_INDEX, NUM_CLASSES, REAL_INDEX
from training.loss import StepResult, cam_classes, cyborg_loss, saliency_mse
from training.model import normalised_cam

# The weight of the pixel-level terms when the config gives none (measured: docs/guidance.md).
DEFAULT_WEIGHTS = {"rrr": 100.0, "consistency": 1.0}
BLUR_SIGMA = 1 / 32  # `blur`'s Gaussian sigma as a fraction of the image side (7 px at 224)


# ---- pure functions ------------------------------------------------------------------------------


def upsample_saliency(saliency: torch.Tensor, size: tuple[int, int], edge: str = "soft") -> torch.Tensor:
    """[B, h, w] maps at the CAM grid -> [B, H, W] at the input size: bilinear, kept in [0, 1] ("soft"),
    or that thresholded at 0.5 ("hard": every pixel either kept or replaced, nothing blended)."""
    up = F.interpolate(saliency.float().unsqueeze(1), size=size, mode="bilinear", align_corners=False).squeeze(1)
    if edge == "hard":
        return (up >= 0.5).float()
    if edge != "soft":
        raise ValueError(f"mask edge {edge!r}: choose soft or hard")
    return up.clamp(0.0, 1.0)


def logit_difference_cam(class_maps: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """Normalised map of (class c) - (the other class) per image: [B, 2, h, w], [B] -> [B, h, w]."""
    if class_maps.shape[1] != NUM_CLASSES:
        raise ValueError(f"the logit-difference CAM needs {NUM_CLASSES} classes, got {class_maps.shape[1]}")
    difference = class_maps[:, FAKE_INDEX] - class_maps[:, REAL_INDEX]
    sign = (classes.view(-1, 1, 1) == FAKE_INDEX).to(difference.dtype) * 2.0 - 1.0
    return normalised_cam(sign * difference)


def masked_mean(per_sample: torch.Tensor, has_saliency: torch.Tensor) -> torch.Tensor:
    """Mean of per-sample values over the samples with a map; 0 when none has one."""
    has = has_saliency.to(device=per_sample.device, dtype=torch.bool)
    return torch.where(has, per_sample, torch.zeros_like(per_sample)).sum() / has.sum().clamp_min(1)


def input_gradient_penalty(gradients: torch.Tensor, saliency_up: torch.Tensor, has_saliency: torch.Tensor) -> torch.Tensor:
    """RRR's penalty: mean over samples with a map of sum over (C, H, W) of ((1 - H) * grad)^2."""
    outside = (1.0 - saliency_up).unsqueeze(1) * gradients
    return masked_mean(outside.pow(2).sum(dim=(1, 2, 3)), has_saliency)


def mask_non_salient(images: torch.Tensor, saliency_up: torch.Tensor, has_saliency: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    """H * image + (1 - H) * fill for samples with a map; others unchanged. fill broadcasts to images."""
    keep = torch.where(has_saliency.view(-1, 1, 1).to(saliency_up.device, torch.bool), saliency_up, torch.ones_like(saliency_up))
    keep = keep.unsqueeze(1)
    return keep * images.float() + (1.0 - keep) * fill


def gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of float [B, C, H, W] images (reflected borders), kernel radius 3 sigma."""
    radius = max(1, min(round(3 * sigma), min(images.shape[-2:]) - 1))
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32, device=images.device)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = (kernel / kernel.sum()).to(images.dtype)
    channels = images.shape[1]
    out = F.pad(images, (radius, radius, 0, 0), mode="reflect")
    out = F.conv2d(out, kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)
    out = F.pad(out, (0, 0, radius, radius), mode="reflect")
    return F.conv2d(out, kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)


def prediction_kl(logits: torch.Tensor, masked_logits: torch.Tensor, has_saliency: torch.Tensor) -> torch.Tensor:
    """Mean over samples with a map of KL(p(x) || p(x_masked))."""
    log_p = F.log_softmax(logits.float(), dim=1)
    log_q = F.log_softmax(masked_logits.float(), dim=1)
    return masked_mean((log_p.exp() * (log_p - log_q)).sum(dim=1), has_saliency)


# ---- training steps (registered by name in training.guidance) ------------------------------------


def guidance_weight(config, method: str) -> float:
    weight = getattr(config, "guidance_weight", None)
    return DEFAULT_WEIGHTS[method] if weight is None else float(weight)


def _mixed(config, ce: torch.Tensor, term: torch.Tensor) -> torch.Tensor:
    return config.alpha * ce + (1.0 - config.alpha) * term


def _ce_on(model, images: torch.Tensor, batch) -> StepResult:
    """CE of the model on `images` (a changed copy of the batch's) against the batch's labels."""
    logits = model(images).logits
    ce = F.cross_entropy(logits.float(), batch["label"])
    return StepResult(loss=ce, ce=ce, guidance_term=ce.new_zeros(()), logits=logits)


def _input_maps(model, batch, config) -> torch.Tensor:
    return upsample_saliency(batch["saliency"], tuple(batch["image"].shape[-2:]), getattr(config, "mask_edge", "soft"))


def cam_difference(model, batch, config) -> StepResult:
    """alpha * CE + (1 - alpha) * MSE(logit-difference CAM, H); the class as config.cam_class chooses."""
    out = model(batch["image"])
    ce = F.cross_entropy(out.logits.float(), batch["label"])
    classes = cam_classes(out.logits, batch["label"], config.cam_class)
    term = saliency_mse(logit_difference_cam(out.class_maps.float(), classes), batch["saliency"], batch["has_saliency"])
    return StepResult(loss=_mixed(config, ce, term), ce=ce, guidance_term=term, logits=out.logits)


def right_reasons(model, batch, config) -> StepResult:
    """alpha * CE + (1 - alpha) * weight * ||(1 - H_up) * d/dx sum_k log p_k||^2, x in [0, 1]."""
    pixels = (batch["image"].float() / 255.0).requires_grad_(True)
    logits = model(pixels * 255.0).logits.float()
    log_p = F.log_softmax(logits, dim=1)
    ce = F.nll_loss(log_p, batch["label"])
    (gradients,) = torch.autograd.grad(log_p.sum(), pixels, create_graph=True)
    term = guidance_weight(config, "rrr") * input_gradient_penalty(gradients, _input_maps(model, batch, config), batch["has_saliency"])
    return StepResult(loss=_mixed(config, ce, term), ce=ce, guidance_term=term, logits=logits)


def masked_training(model, batch, config) -> StepResult:
    """CE on images whose non-salient pixels are grey (the normalisation mean); alpha is not used."""
    masked = mask_non_salient(batch["image"], _input_maps(model, batch, config), batch["has_saliency"], model.pixel_mean)
    return _ce_on(model, masked, batch)


def blurred_context(model, batch, config) -> StepResult:
    """CE on images whose non-salient pixels are blurred (sigma BLUR_SIGMA of the side); alpha is not used."""
    images = batch["image"].float()
    blurred = gaussian_blur(images, BLUR_SIGMA * images.shape[-1])
    return _ce_on(model, mask_non_salient(images, _input_maps(model, batch, config), batch["has_saliency"], blurred), batch)


def mask_consistency(model, batch, config) -> StepResult:
    """alpha * CE(x) + (1 - alpha) * weight * KL(p(x) || p(x with non-salient pixels grey))."""
    masked = mask_non_salient(batch["image"], _input_maps(model, batch, config), batch["has_saliency"], model.pixel_mean)
    both = model(torch.cat([batch["image"].float(), masked])).logits.float()
    logits, masked_logits = both.chunk(2)
    ce = F.cross_entropy(logits, batch["label"])
    term = guidance_weight(config, "consistency") * prediction_kl(logits, masked_logits, batch["has_saliency"])
    return StepResult(loss=_mixed(config, ce, term), ce=ce, guidance_term=term, logits=logits)


def masked_cyborg(model, batch, config) -> StepResult:
    """`mask` plus the CYBORG term on the masked image: alpha * CE + (1 - alpha) * MSE(CAM, H)."""
    masked = mask_non_salient(batch["image"], _input_maps(model, batch, config), batch["has_saliency"], model.pixel_mean)
    out = model(masked)
    terms = cyborg_loss(out.logits, out.class_maps, batch["label"], batch["saliency"], batch["has_saliency"], config.alpha, config.cam_class)
    return StepResult(loss=terms.total, ce=terms.ce, guidance_term=terms.saliency, logits=out.logits)


def swapped_context(model, batch, config) -> StepResult:
    """CE on images whose non-salient pixels come from another image of the batch (a random pairing).

    Like `mask`, the content outside the map then carries no information about the label, but it
    is real image content, so training and test images look alike. alpha is not used.
    """
    partner = batch["image"][torch.randperm(len(batch["image"]), device=batch["image"].device)].float()
    swapped = mask_non_salient(batch["image"], _input_maps(model, batch, config), batch["has_saliency"], partner)
    return _ce_on(model, swapped, batch)
