"""The CAM classifier: one forward pass gives the logits and the class activation maps.

Any timm backbone whose `forward_features` returns the final, activated feature map and whose
classifier is a single linear layer over its global average works unchanged: the logits are
computed *from* the class maps (mean over the grid plus the bias), so the CAM is exactly the map
that the decision is made from, with no hooks, no second forward and no per-architecture branch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import timm
import torch
from torch import nn

from core.contract import FAKE_INDEX, NUM_CLASSES
from training import backbones as _backbones  # noqa: F401  registers cyborg_local_tiny with timm

# Architectures the project documents and tests; any other timm name that meets the contract works too.
ARCHITECTURES = {
    "densenet121": 224,
    "resnet50": 224,
    "inception_v3": 299,
    "xception": 299,  # timm's legacy_xception (Chollet's Xception, as in the paper)
    "efficientnet_lite0": 224,
    "efficientnet_lite1": 240,
    "efficientnet_lite2": 260,
    "efficientnet_lite0_s2": 224,  # Lite0 cut after stage 2: local features, CAM stride 8 (training/backbones.py)
    "resnet18": 224,
    "mobilenetv2_100": 224,
}
TIMM_NAMES = {"xception": "legacy_xception"}

# The paper normalises every backbone with ImageNet statistics, except Xception (mean = std = 0.5).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)
NORMALISATION = {"xception": (HALF, HALF)}


def default_image_size(arch: str) -> int:
    return ARCHITECTURES.get(arch, 224)


def default_normalisation(arch: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    return NORMALISATION.get(arch, (IMAGENET_MEAN, IMAGENET_STD))


@dataclasses.dataclass
class CamOutput:
    logits: torch.Tensor  # [B, K]
    class_maps: torch.Tensor  # [B, K, h, w]: classifier weight row k . feature map (no bias)


class CamClassifier(nn.Module):
    """Backbone features -> global average pool -> linear, with the CAM from those same features.

    Takes images as uint8 or float in [0, 255], NCHW; normalisation is part of the module so that
    an exported graph needs nothing else.
    """

    def __init__(self, backbone: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        classifier = backbone.get_classifier()
        if not isinstance(classifier, nn.Linear):
            raise ValueError(f"{type(backbone).__name__}: classifier is {type(classifier).__name__}, not one nn.Linear; no exact CAM")
        if classifier.in_features != getattr(backbone, "num_features", classifier.in_features):
            raise ValueError(
                f"{type(backbone).__name__}: layers between pooling and the classifier "
                f"({backbone.num_features} features -> {classifier.in_features}); no exact CAM"
            )
        self.backbone = backbone
        self.register_buffer("pixel_mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1) * 255.0)
        self.register_buffer("pixel_std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1) * 255.0)

    @property
    def classifier(self) -> nn.Linear:
        return self.backbone.get_classifier()

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        return (images.float() - self.pixel_mean) / self.pixel_std

    def forward(self, images: torch.Tensor) -> CamOutput:
        features = self.backbone.forward_features(self.normalise(images))
        weight, bias = self.classifier.weight, self.classifier.bias
        class_maps = torch.einsum("kc,bchw->bkhw", weight.to(features.dtype), features)
        logits = class_maps.mean(dim=(2, 3))
        if bias is not None:
            logits = logits + bias.to(logits.dtype)
        return CamOutput(logits=logits, class_maps=class_maps)


class EnsembleCamClassifier(nn.Module):
    """The mean of several CamClassifiers: logits and class maps averaged (each member normalises its own input)."""

    def __init__(self, members: Sequence[CamClassifier]):
        super().__init__()
        if len(members) < 2:
            raise ValueError("an ensemble needs at least two members")
        self.members = nn.ModuleList(members)

    def forward(self, images: torch.Tensor) -> CamOutput:
        outputs = [member(images) for member in self.members]
        logits = torch.stack([out.logits for out in outputs]).mean(dim=0)
        class_maps = torch.stack([out.class_maps for out in outputs]).mean(dim=0)
        return CamOutput(logits=logits, class_maps=class_maps)


def normalised_cam(maps: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Min-max normalise each [h, w] map to [0, 1]; a constant map becomes all zeros (never NaN)."""
    flat = maps.flatten(start_dim=-2)
    low = flat.amin(dim=-1, keepdim=True)
    high = flat.amax(dim=-1, keepdim=True)
    scaled = (flat - low) / (high - low).clamp_min(eps)
    scaled = torch.where(high - low > eps, scaled, torch.zeros_like(scaled))
    return scaled.view_as(maps)


def select_cam(class_maps: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """The normalised CAM of one class per image: class_maps [B, K, h, w], classes [B] -> [B, h, w]."""
    index = classes.long().view(-1, 1, 1, 1).expand(-1, 1, *class_maps.shape[-2:])
    return normalised_cam(class_maps.gather(1, index).squeeze(1))


def fake_probability(logits: torch.Tensor) -> torch.Tensor:
    return logits.float().softmax(dim=-1)[:, FAKE_INDEX]


def create_backbone(arch: str, num_classes: int = NUM_CLASSES, **kwargs) -> nn.Module:
    """A timm backbone with a fresh `num_classes` linear head."""
    name = TIMM_NAMES.get(arch, arch)
    if name not in timm.list_models() and not timm.is_model(name):
        raise ValueError(f"unknown architecture {arch!r}; documented: {', '.join(ARCHITECTURES)} (or any timm model name)")
    return timm.create_model(name, pretrained=False, num_classes=num_classes, global_pool="avg", **kwargs)


def create_classifier(arch: str, mean=None, std=None, num_classes: int = NUM_CLASSES) -> CamClassifier:
    """Build the CAM classifier for `arch` with random weights (see training.weights for ImageNet)."""
    default_mean, default_std = default_normalisation(arch)
    return CamClassifier(create_backbone(arch, num_classes), mean or default_mean, std or default_std)


def cam_grid(model: CamClassifier, image_size: int) -> tuple[int, int]:
    """The CAM's (h, w) for square inputs of `image_size` pixels."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        device = next(model.parameters()).device
        out = model(torch.zeros(1, 3, image_size, image_size, device=device))
    model.train(was_training)
    return tuple(out.class_maps.shape[-2:])
