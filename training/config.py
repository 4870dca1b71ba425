"""The training configuration: typed, flat, the paper's recipe as defaults, saved in every checkpoint."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from core.errors import UserError

GUIDANCE_METHODS = ("ce", "cyborg", "cam_diff", "rrr", "mask", "consistency", "mask_cyborg", "swap", "blur")  # registry order: training.guidance
CAM_CLASSES = ("predicted", "true")
MASK_EDGES = ("soft", "hard")  # how the pixel-level methods upsample the map: bilinear, or bilinear then >= 0.5
OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("step", "cosine")
# training.augment's changes, in the order it applies them; "everyday" names them all (a test keeps the two in step)
AUGMENTATIONS = ("flip", "shift", "colour", "resize", "blur", "jpeg", "webp")
DISTILL_VIEWS = ("augmented", "clean")
RESIZE_MAX = 0.9  # the largest downscale factor of the resize round trip (training.augment); its smallest is --augment-resize-min


@dataclasses.dataclass
class TrainConfig:
    # data
    data: str | list[str] = ""  # one folder, or several plain-layout folders trained on at once
    csv: str | None = None
    heatmaps: str | None = None
    val_fraction: float = 0.1  # held out from the training split when the data has no validation split
    skip_unreadable: bool = False
    # model
    arch: str = "resnet50"
    weights: str = "imagenet"  # "imagenet", "none" or a path to a state_dict / checkpoint
    image_size: int | None = None  # None: the architecture's default (224, or 299 for inception_v3/xception)
    scale: int | None = None  # shorter side before cropping image_size (random crops in training); None: image_size
    # loss
    guidance: str = "cyborg"
    alpha: float = 0.5  # alpha * CE + (1 - alpha) * MSE(CAM, H); alpha = 1 is the CE baseline
    cam_class: str = "predicted"  # the paper's choice; "true" uses the label's CAM
    guidance_weight: float | None = None  # weight of the rrr / consistency term; None: the method's default
    mask_edge: str = "soft"  # pixel-level methods: soft (bilinear) or hard (thresholded) map edges (docs/guidance.md)
    # augmentation (training.augment): none, everyday or a comma list of AUGMENTATIONS
    augment: str = "none"
    augment_p: float = 0.1  # probability of each everyday change (Wang et al. 2020: 0.1 beat 0.5)
    augment_flip_p: float = 0.5  # probability of a horizontal flip
    augment_jpeg_min: int = 30  # JPEG / WebP quality drawn uniformly in [augment_jpeg_min, 100]
    augment_blur_max: float = 3.0  # Gaussian blur sigma drawn uniformly in [0, augment_blur_max]
    augment_zoom_max: float = 1.15  # shift: a crop of 1/zoom of each side, zoom drawn in [1, augment_zoom_max]
    augment_resize_min: float = 0.5  # resize: a round trip through a copy downscaled by a factor drawn in [augment_resize_min, 0.9]
    # distillation (training.distill): a trained model's softened scores taught beside the labels
    teacher: str | None = None  # a checkpoint (one network or a `cyborg ensemble`) at the student's input size and scale
    distill_weight: float = 1.0  # loss += distill_weight * T^2 * KL(teacher_T || student_T)
    distill_temperature: float = 2.0  # T: both models' logits divided by it before the softmax
    distill_view: str = "augmented"  # what the teacher sees: the student's image, or "clean" (before the everyday changes)
    # optimisation (the paper's recipe)
    epochs: int = 50
    batch_size: int = 20
    lr: float = 0.005
    momentum: float = 0.9
    weight_decay: float = 1e-6
    lr_step: int = 12
    lr_gamma: float = 0.1
    freeze_bn: bool = False  # BatchNorm in eval mode while training: its running (e.g. ImageNet) statistics never change
    precise_bn: int = 0  # before each validation, BatchNorm statistics measured afresh on this many training images without augmentation (0: off)
    precise_bn_changed: float = 0.0  # the share of those images that go through the training augmentation first (0: all clean)
    optimizer: str = "sgd"  # sgd (the paper) | adamw (weight_decay then is AdamW's decoupled decay)
    schedule: str = "step"  # step: StepLR(lr_step, lr_gamma), the paper | cosine: cosine decay to 0 over the epochs
    ema_decay: float = 0.0  # > 0: an exponential moving average of the weights is validated and kept (timm ModelEmaV3); 0: off
    # run
    seed: int = 0
    device: str = "auto"  # auto, cpu, cuda
    amp: bool = True  # used on CUDA only
    channels_last: bool = True  # on CPU and CUDA: about 2x faster training on a 2-core CPU
    workers: int = 2
    out: str = ""

    def validate(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise UserError(f"--alpha {self.alpha}: must be in [0, 1]")
        if self.guidance not in GUIDANCE_METHODS:
            raise UserError(f"--guidance {self.guidance!r}: choose one of {', '.join(GUIDANCE_METHODS)}")
        if self.guidance_weight is not None and not self.guidance_weight >= 0.0:
            raise UserError(f"--guidance-weight {self.guidance_weight}: must be at least 0")
        if self.cam_class not in CAM_CLASSES:
            raise UserError(f"--cam-class {self.cam_class!r}: choose one of {', '.join(CAM_CLASSES)}")
        if self.mask_edge not in MASK_EDGES:
            raise UserError(f"--mask-edge {self.mask_edge!r}: choose one of {', '.join(MASK_EDGES)}")
        if self.optimizer not in OPTIMIZERS:
            raise UserError(f"--optimizer {self.optimizer!r}: choose one of {', '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            raise UserError(f"--schedule {self.schedule!r}: choose one of {', '.join(SCHEDULES)}")
        for name in ("epochs", "batch_size", "lr_step"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1")
        if self.scale is not None and (self.scale < 1 or (self.image_size is not None and self.scale < self.image_size)):
            raise UserError(f"--scale {self.scale}: must be at least --image-size ({self.image_size})")
        augmentation_names(self.augment)
        for name in ("augment_p", "augment_flip_p"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise UserError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be in [0, 1] (a probability)")
        if not 1 <= self.augment_jpeg_min <= 100:
            raise UserError(f"--augment-jpeg-min {self.augment_jpeg_min}: must be in [1, 100] (a JPEG quality)")
        if not 0.0 <= self.augment_blur_max <= 10.0:
            raise UserError(f"--augment-blur-max {self.augment_blur_max}: must be in [0, 10] (pixels)")
        if not 1.0 <= self.augment_zoom_max <= 2.0:
            raise UserError(f"--augment-zoom-max {self.augment_zoom_max}: must be in [1, 2] (1 = no zoom)")
        if not 0.05 <= self.augment_resize_min <= RESIZE_MAX:
            raise UserError(f"--augment-resize-min {self.augment_resize_min}: must be in [0.05, {RESIZE_MAX}] (a downscale factor)")
        if not self.distill_weight >= 0.0:
            raise UserError(f"--distill-weight {self.distill_weight}: must be at least 0")
        if not self.distill_temperature > 0.0:
            raise UserError(f"--distill-temperature {self.distill_temperature}: must be above 0")
        if self.distill_view not in DISTILL_VIEWS:
            raise UserError(f"--distill-view {self.distill_view!r}: choose one of {', '.join(DISTILL_VIEWS)}")
        if self.distill_view == "clean" and not (self.teacher and augmentation_names(self.augment)):
            raise UserError("--distill-view clean shows the teacher the image before the everyday changes: "
                            "it needs --teacher and an --augment other than none")  # fmt: skip
        if not 0.0 <= self.ema_decay < 1.0:
            raise UserError(f"--ema-decay {self.ema_decay}: must be in [0, 1) (0 turns the average off)")
        if self.precise_bn < 0:
            raise UserError(f"--precise-bn {self.precise_bn}: a number of training images, at least 0 (0 turns it off)")
        if self.precise_bn and self.freeze_bn:
            raise UserError("--precise-bn re-measures BatchNorm statistics that --freeze-bn keeps fixed: choose one")
        if not 0.0 <= self.precise_bn_changed <= 1.0:
            raise UserError(f"--precise-bn-changed {self.precise_bn_changed}: a share of the --precise-bn images, in [0, 1]")
        if self.precise_bn_changed and not (self.precise_bn and augmentation_names(self.augment)):
            raise UserError("--precise-bn-changed sends a share of the --precise-bn images through the training "
                            "augmentation: it needs --precise-bn N and an --augment other than none")  # fmt: skip
        if not 0.0 < self.val_fraction < 1.0:
            raise UserError(f"--val-fraction {self.val_fraction}: must be in (0, 1)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UserError(f"unknown training settings: {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        return cls(**values)


def augmentation_names(text: str) -> tuple[str, ...]:
    """--augment's value as AUGMENTATIONS names: "none" (nothing), "everyday" (all of them), or a comma
    list of names (and "everyday"); UserError names the valid ones."""
    names = [name.strip().lower() for name in str(text).split(",") if name.strip()]
    if names in ([], ["none"]):
        return ()
    unknown = [name for name in names if name not in (*AUGMENTATIONS, "everyday")]
    if unknown:
        raise UserError(
            f"--augment {text!r}: unknown augmentation(s) {', '.join(unknown)}; "
            f"choose none, everyday or a comma list of {', '.join(AUGMENTATIONS)}"
        )
    chosen = set(AUGMENTATIONS) if "everyday" in names else set(names)
    return tuple(name for name in AUGMENTATIONS if name in chosen)


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Settings from a JSON or YAML file (flat keys named as TrainConfig's fields)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise UserError(f"--config {path}: {error.strerror}") from error
    if path.suffix in (".yaml", ".yml"):
        import yaml

        values = yaml.safe_load(text) or {}
    else:
        try:
            values = json.loads(text)
        except ValueError as error:
            raise UserError(f"--config {path}: not valid JSON: {error}") from error
    if not isinstance(values, dict):
        raise UserError(f"--config {path}: expected a mapping of setting names to values")
    TrainConfig.from_dict(values)  # reject unknown keys early, naming them
    return values
