"""Small backbones registered with timm, for tests and behavioural checks.

`cyborg_local_tiny` keeps its features local: each cell of its final feature map sees only a
10-pixel neighbourhood of its own 8x8 patch (stride 8), so evidence cannot travel across the
image. Behavioural tests of CAM guidance need such a network: in deep backbones every final cell
sees nearly the whole image (docs/guidance.md). It follows timm's contract
(`forward_features` -> unpooled map, `forward_head`, `get_classifier`, `reset_classifier`,
`num_features`), so `create_classifier("cyborg_local_tiny")` works like any timm name.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from timm.models import register_model
from torch import nn


def _conv_block(in_channels: int, out_channels: int, kernel: int, stride: int, padding: int = 0, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel, stride=stride, padding=padding, dilation=dilation, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class LocalTinyNet(nn.Module):
    """3x3 conv, a 4x4/4 patch conv, a 2x2/2 conv and a 1x1 conv: stride 8, receptive field 10 px."""

    def __init__(self, num_classes: int = 2, in_chans: int = 3, width: int = 32, global_pool: str = "avg", **_: object):
        super().__init__()
        if global_pool != "avg":
            raise ValueError(f"cyborg_local_tiny supports global_pool='avg' only, not {global_pool!r}")
        self.num_classes = num_classes
        self.num_features = 2 * width
        self.features = nn.Sequential(
            _conv_block(in_chans, width // 2, 3, 1, padding=1),
            _conv_block(width // 2, width, 4, 4),
            _conv_block(width, 2 * width, 2, 2),
            _conv_block(2 * width, 2 * width, 1, 1),
        )
        self.head = nn.Linear(self.num_features, num_classes)
        self.default_cfg = self.pretrained_cfg = {"input_size": (3, 32, 32), "classifier": "head"}

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str = "avg") -> None:
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x.mean(dim=(2, 3))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _build(factory: Callable[..., nn.Module], name: str, pretrained: bool, kwargs: dict, no_pretrained: str = "has no pretrained weights") -> nn.Module:
    """Instantiate a backbone registered here from timm's factory arguments (timm's own pretrained
    weights do not exist for them: `no_pretrained` says so)."""
    if pretrained:
        raise ValueError(f"{name} {no_pretrained}")
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(key, None)
    return factory(**kwargs)


@register_model
def cyborg_local_tiny(pretrained: bool = False, **kwargs) -> LocalTinyNet:
    """A tiny local-features CNN (no pretrained weights)."""
    return _build(LocalTinyNet, "cyborg_local_tiny", pretrained, kwargs)


class WideTinyNet(LocalTinyNet):
    """cyborg_local_tiny plus three dilated 3x3 convs (dilation 1, 2, 4) on its stride-8 map.

    Each final cell then sees the whole image at 64 px (receptive field 122 px), as the last cells
    of deep backbones do: a cue anywhere can be expressed at any cell, the case in which CAM guidance
    was measured to move the heatmap but not the decision (docs/guidance.md) (`cyborg bench guidance`).
    """

    def __init__(self, num_classes: int = 2, in_chans: int = 3, width: int = 32, global_pool: str = "avg", **_: object):
        super().__init__(num_classes=num_classes, in_chans=in_chans, width=width, global_pool=global_pool)
        self.context = nn.Sequential(
            *(_conv_block(self.num_features, self.num_features, 3, 1, padding=d, dilation=d) for d in (1, 2, 4))
        )

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.context(self.features(x))


@register_model
def cyborg_wide_tiny(pretrained: bool = False, **kwargs) -> WideTinyNet:
    """A tiny CNN whose final cells see the whole image (no pretrained weights)."""
    return _build(WideTinyNet, "cyborg_wide_tiny", pretrained, kwargs)


# ---- local-feature EfficientNet-Lite: the network cut after an early stage -----------------------
# Chai et al. (ECCV 2020, "What makes fake images detectable?") found that classifiers with a small
# receptive field generalise better to generators they never saw than whole-image ones. Cutting
# EfficientNet-Lite after stage K keeps its ImageNet weights up to there (training.weights loads them
# from the packaged files) and gives a CAM on a finer grid: stride 8 after stage 2, 16 after stage 3.
TRUNCATION_STAGES = (2, 3, 4)


class TruncatedEfficientNet(nn.Module):
    """timm's `base` EfficientNet(-Lite) cut after stage `stage` (no conv_head), then avg pool + linear."""

    def __init__(self, base: str, stage: int, num_classes: int = 2, global_pool: str = "avg", **kwargs: object):
        super().__init__()
        import timm

        if global_pool != "avg":
            raise ValueError(f"{base}_s{stage} supports global_pool='avg' only, not {global_pool!r}")
        full = timm.create_model(base, pretrained=False, num_classes=num_classes, **kwargs)
        if not 1 <= stage < len(full.blocks):
            raise ValueError(f"{base} has stages 1-{len(full.blocks) - 1} to cut after, not {stage}")
        self.conv_stem, self.bn1 = full.conv_stem, full.bn1
        self.blocks = full.blocks[: stage + 1]
        last = self.blocks[-1][-1]  # an InvertedResidual (conv_pwl) in every stage after stage 0
        self.num_features = last.conv_pwl.out_channels
        self.num_classes = num_classes
        self.classifier = nn.Linear(self.num_features, num_classes)
        self.default_cfg = self.pretrained_cfg = {**full.pretrained_cfg, "classifier": "classifier"}

    def get_classifier(self) -> nn.Module:
        return self.classifier

    def reset_classifier(self, num_classes: int, global_pool: str = "avg") -> None:
        self.num_classes = num_classes
        self.classifier = nn.Linear(self.num_features, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.bn1(self.conv_stem(x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x.mean(dim=(2, 3))
        return x if pre_logits else self.classifier(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def truncated_base(arch: str) -> tuple[str, int] | None:
    """("efficientnet_lite0", 2) for "efficientnet_lite0_s2"; None for any other name."""
    base, _, stage = arch.rpartition("_s")
    if base.startswith("efficientnet_lite") and stage.isdigit() and int(stage) in TRUNCATION_STAGES:
        return base, int(stage)
    return None


def _register_truncated(base: str, stage: int) -> None:
    def build(pretrained: bool = False, **kwargs) -> TruncatedEfficientNet:
        return _build(functools.partial(TruncatedEfficientNet, base, stage), f"{base}_s{stage}", pretrained, kwargs,
                      f"has no timm pretrained weights: pass --weights imagenet (the packaged {base} weights)")  # fmt: skip

    build.__name__ = f"{base}_s{stage}"
    build.__doc__ = f"{base} cut after stage {stage}: local features."
    register_model(build)


for _base in ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"):
    for _stage in TRUNCATION_STAGES:
        _register_truncated(_base, _stage)
