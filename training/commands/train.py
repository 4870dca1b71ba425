"""`cyborg train`: train a detector; flags override the --config file, which overrides the defaults."""

from __future__ import annotations

import argparse
import os
from typing import Any

# flag -> (TrainConfig field, type, help); every flag defaults to "not given" so the merge order holds.
FLAGS: dict[str, tuple[str, Any, str]] = {
    "--csv": ("csv", str, "authors' layout: CSV of split,class,path rows (paths hang from DATA)"),
    "--heatmaps": ("heatmaps", str, "folder of human (or proxy) saliency maps, matched by file name"),
    "--arch": ("arch", str, "backbone: densenet121, resnet50, inception_v3, xception, efficientnet_lite0, resnet18, mobilenetv2_100 or a timm name"),
    "--weights": ("weights", str, "none, imagenet or a PATH to a state_dict / checkpoint (default: imagenet)"),
    "--guidance": ("guidance", str, "guidance method: ce, cyborg, cam_diff, rrr, mask, consistency, mask_cyborg, swap or blur (default: cyborg; see docs/guidance.md)"),
    "--alpha": ("alpha", float, "alpha * CE + (1 - alpha) * MSE(CAM, H); 1 = CE only (default: 0.5)"),
    "--cam-class": ("cam_class", str, "CAM of the predicted class (the paper) or the true class (default: predicted)"),
    "--guidance-weight": ("guidance_weight", float, "weight of the rrr / consistency term (default: the method's, docs/guidance.md)"),
    "--mask-edge": ("mask_edge", str, "edges of the map for mask / swap / consistency / rrr: soft (bilinear) or hard "
                    "(bilinear, then >= 0.5) (default: soft)"),
    "--augment": ("augment", str, "training augmentation: none, everyday (all of flip, shift, colour, resize, blur, jpeg, webp) "
                  "or a comma list of those (default: none; see docs/training.md)"),
    "--augment-p": ("augment_p", float, "probability of each everyday change, all but flip (default: 0.1)"),
    "--augment-flip-p": ("augment_flip_p", float, "probability of a horizontal flip (default: 0.5)"),
    "--augment-jpeg-min": ("augment_jpeg_min", int, "JPEG and WebP quality drawn in [this, 100] (default: 30)"),
    "--augment-blur-max": ("augment_blur_max", float, "Gaussian blur sigma drawn in [0, this] pixels (default: 3)"),
    "--augment-zoom-max": ("augment_zoom_max", float, "shift: a crop of 1/zoom of each side resized back, zoom drawn in "
                           "[1, this] (default: 1.15)"),
    "--augment-resize-min": ("augment_resize_min", float, "resize: a round trip through a copy downscaled by a factor drawn "
                             "in [this, 0.9]; 0.25 reaches a 64-px face of a 256-px input (default: 0.5)"),
    "--teacher": ("teacher", str, "distil from this checkpoint (one network or a `cyborg ensemble`) as well as the labels "
                  "(default: none; see docs/training.md)"),
    "--distill-weight": ("distill_weight", float, "weight of the teacher term, weight * T^2 * KL (default: 1)"),
    "--distill-temperature": ("distill_temperature", float, "temperature T of the teacher term (default: 2)"),
    "--distill-view": ("distill_view", str, "what the teacher sees: augmented (the student's image) or clean (the same framing "
                       "without the everyday changes of the pixels, so the student learns to say on a changed face what "
                       "the teacher says on the clean one) (default: augmented)"),
    "--precise-bn": ("precise_bn", int, "before each validation, measure BatchNorm statistics afresh on this many "
                     "training images without augmentation, instead of the running averages over augmented batches "
                     "(default: 0, off; see docs/training.md)"),
    "--precise-bn-changed": ("precise_bn_changed", float, "the share of the --precise-bn images sent through the training "
                             "augmentation first: statistics between clean images (0) and changed ones (1) (default: 0)"),
    "--epochs": ("epochs", int, "epochs (default: 50)"),
    "--batch-size": ("batch_size", int, "batch size per process (default: 20)"),
    "--image-size": ("image_size", int, "input side in pixels (default: the architecture's, 224 or 299)"),
    "--scale": ("scale", int, "the face's scale: shorter side in pixels before a crop of --image-size, no resampling when "
                "an image already has it (training: random crops; serving: the centre crop) (default: --image-size)"),
    "--lr": ("lr", float, "learning rate (default: 0.005)"),
    "--momentum": ("momentum", float, "SGD momentum (default: 0.9)"),
    "--weight-decay": ("weight_decay", float, "weight decay (default: 1e-6)"),
    "--lr-step": ("lr_step", int, "StepLR step in epochs (default: 12)"),
    "--lr-gamma": ("lr_gamma", float, "StepLR factor (default: 0.1)"),
    "--optimizer": ("optimizer", str, "sgd (the paper) or adamw (default: sgd)"),
    "--schedule": ("schedule", str, "step (StepLR, the paper) or cosine (decay to 0 over --epochs) (default: step)"),
    "--ema-decay": ("ema_decay", float, "validate and keep an exponential moving average of the weights, this decay per step "
                    "at most (warmed up over the first steps) (default: 0, off; see docs/training.md)"),
    "--val-fraction": ("val_fraction", float, "share of train held out for validation when the data has no val split (default: 0.1)"),
    "--seed": ("seed", int, "random seed (default: 0)"),
    "--device": ("device", str, "auto, cpu or cuda (default: auto)"),
    "--workers": ("workers", int, "data-loading worker processes (default: 2)"),
    "--out": ("out", str, "run folder: best.pt, last.pt, metrics.jsonl"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data", metavar="DATA", nargs="+",
                        help="plain-layout folder (real/, fake/, maps/) or the root the --csv paths hang from; several "
                        "plain folders train on all of them at once (sources are named FOLDER/SOURCE)")  # fmt: skip
    for flag, (field, kind, help_text) in FLAGS.items():
        parser.add_argument(flag, dest=field, type=kind, default=argparse.SUPPRESS, help=help_text)
    parser.add_argument("--config", metavar="FILE", help="JSON or YAML file of settings (TrainConfig field names)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its last.pt")
    parser.add_argument("--skip-unreadable", dest="skip_unreadable", action="store_true", default=argparse.SUPPRESS,
                        help="skip unreadable images with a warning instead of stopping")  # fmt: skip
    parser.add_argument("--freeze-bn", dest="freeze_bn", action="store_true", default=argparse.SUPPRESS,
                        help="keep BatchNorm's running statistics (e.g. ImageNet's) fixed while fine-tuning")  # fmt: skip
    parser.add_argument("--no-amp", dest="amp", action="store_false", default=argparse.SUPPRESS, help="no mixed precision on CUDA")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def build_config(args: argparse.Namespace):
    """TrainConfig from defaults < the resumed run's settings < --config file < flags given."""
    from core.errors import UserError
    from training.config import TrainConfig, load_config_file

    values: dict[str, Any] = {}
    given = {field: getattr(args, field) for field, _, _ in FLAGS.values() if hasattr(args, field)}
    given.update({name: getattr(args, name) for name in ("skip_unreadable", "amp", "freeze_bn") if hasattr(args, name)})
    given["data"] = args.data[0] if len(args.data) == 1 else list(args.data)
    if args.resume:
        out = given.get("out") or (load_config_file(args.config).get("out") if args.config else None)
        if not out:
            raise UserError("--resume needs --out RUN_DIR (the run to continue)")
        values.update(resumed_settings(out))
    if args.config:
        values.update(load_config_file(args.config))
    values.update(given)
    if "arch" not in values:
        raise UserError("--arch NAME is required (e.g. resnet50, densenet121, efficientnet_lite0)")
    if not values.get("out"):
        raise UserError("--out RUN_DIR is required")
    return TrainConfig.from_dict(values)


def resumed_settings(out: str) -> dict[str, Any]:
    from pathlib import Path

    from training.checkpoint import read_checkpoint
    from training.trainer import LAST

    return read_checkpoint(Path(out) / LAST).config.to_dict()


def run(args: argparse.Namespace) -> int:
    from training.trainer import fit

    config = build_config(args)
    summary = fit(config, resume=args.resume, progress=not args.no_progress)
    best = summary["best_val_auc"]
    auc = "n/a" if best is None else f"{best:.4f}"
    if os.environ.get("RANK", "0") != "0":
        return 0  # under torchrun, rank 0 reports
    print(
        f"best epoch {summary['best_epoch']}/{summary['epochs']}, val AUC {auc} "
        f"({config.guidance}, {summary['saliency']} maps); wrote {', '.join(summary['files'])}"
    )
    return 0
