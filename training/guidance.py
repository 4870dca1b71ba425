"""Saliency-guidance methods: a registry of training-step losses, each doing its own forward.

A method is `method(model, batch, config) -> StepResult`; `batch` is a dict of tensors already on
the model's device ("image" uint8 [B,3,H,W], "label" [B], "saliency" [B,h,w], "has_saliency" [B]).
Doing its own forward lets a method mask the input or take input gradients. Add one by writing
it (here, or in `training.guidance_methods` for the pixel-level ones), registering it below with
`register("name")(function)`, and listing the name in `training.config.GUIDANCE_METHODS` (a test
keeps the two in step, so the CLI can validate names without importing torch).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from training import guidance_methods as pixel
from training.loss import StepResult, cyborg_loss

GuidanceMethod = Callable[[torch.nn.Module, dict[str, torch.Tensor], Any], StepResult]
METHODS: dict[str, GuidanceMethod] = {}


def register(name: str) -> Callable[[GuidanceMethod], GuidanceMethod]:
    """Decorator: add a guidance method under `name`."""

    def add(method: GuidanceMethod) -> GuidanceMethod:
        if name in METHODS:
            raise ValueError(f"guidance method {name!r} is already registered")
        METHODS[name] = method
        return method

    return add


def get_method(name: str) -> GuidanceMethod:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown guidance method {name!r}; registered: {', '.join(METHODS)}") from None


@register("ce")
def cross_entropy(model, batch, config) -> StepResult:
    """Plain cross-entropy: the baseline (maps are ignored)."""
    logits = model(batch["image"]).logits
    ce = F.cross_entropy(logits.float(), batch["label"])
    return StepResult(loss=ce, ce=ce, guidance_term=ce.new_zeros(()), logits=logits)


@register("cyborg")
def cyborg(model, batch, config) -> StepResult:
    """The CYBORG loss: alpha * CE + (1 - alpha) * MSE(CAM, H) from the same forward."""
    out = model(batch["image"])
    terms = cyborg_loss(
        out.logits, out.class_maps, batch["label"], batch["saliency"], batch["has_saliency"], config.alpha, config.cam_class
    )
    return StepResult(loss=terms.total, ce=terms.ce, guidance_term=terms.saliency, logits=out.logits)


# Methods that constrain the input pixels, or the map that drives the softmax (training.guidance_methods).
register("cam_diff")(pixel.cam_difference)
register("rrr")(pixel.right_reasons)
register("mask")(pixel.masked_training)
register("consistency")(pixel.mask_consistency)
register("mask_cyborg")(pixel.masked_cyborg)
register("swap")(pixel.swapped_context)
register("blur")(pixel.blurred_context)
