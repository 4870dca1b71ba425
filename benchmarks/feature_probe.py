"""Which features generalise to a generator never trained on: linear probes on frozen features,
stage by stage, fitted without one source and scored on the validation split of every source.

    .venv/bin/python -m benchmarks.feature_probe runs/v3data/faces runs/v3data/sd21-faces runs/v3data/portraits \\
        --holdout sd21-faces --arch efficientnet_lite0 --weights imagenet --image-size 256 --scale 256
    .venv/bin/python -m benchmarks.feature_probe ... --holdout sd21-faces --checkpoint runs/v7/without-sd21-seed1/best.pt

Each stage's output (the backbone's `blocks`, or ResNet's `layer1-4`) is pooled to its channels'
mean and standard deviation over the image, the backbone's final features to their mean; a
standardised logistic regression per stage (and on all of them at once) is fitted on the training
split of every source but the held-out one, and its validation AUC is reported per source as
`cyborg evaluate` reports it (a generator's fakes against all reals). The split is the trainer's
(`--val-fraction`, `--seed`). Early, local statistics generalise further than late ones; the
model card's "Limits of v9 and v12" has the figures.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from core.errors import UserError


def stage_modules(backbone: nn.Module) -> list[nn.Module]:
    """The backbone's stages, in order: timm EfficientNet/MobileNet `blocks`, or ResNet `layer1-4`."""
    if isinstance(getattr(backbone, "blocks", None), nn.Sequential):
        return list(backbone.blocks)
    layers = [getattr(backbone, f"layer{i}", None) for i in range(1, 5)]
    if all(isinstance(layer, nn.Module) for layer in layers):
        return layers
    raise UserError(f"{type(backbone).__name__}: no stages to probe (expected .blocks or .layer1-4)")


def stage_features(model: nn.Module, dataset: torch.utils.data.Dataset, batch_size: int = 32) -> list[np.ndarray]:
    """Per stage [N, 2C] (channel means and standard deviations), then the final features' means [N, C]."""
    stages = stage_modules(model.backbone)
    outputs: list[torch.Tensor] = []
    hooks = [stage.register_forward_hook(lambda _m, _i, out: outputs.append(out)) for stage in stages]
    parts: list[list[np.ndarray]] = [[] for _ in range(len(stages) + 1)]
    model.eval()
    try:
        with torch.no_grad():
            for batch in torch.utils.data.DataLoader(dataset, batch_size=batch_size):
                outputs.clear()
                final = model.backbone.forward_features(model.normalise(batch["image"]))
                for i, out in enumerate(outputs):
                    parts[i].append(torch.cat([out.mean((2, 3)), out.std((2, 3), correction=0)], 1).numpy())
                parts[-1].append(final.mean((2, 3)).numpy())
    finally:
        for hook in hooks:
            hook.remove()
    return [np.concatenate(part) for part in parts]


def probe_scores(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, c: float = 0.1) -> np.ndarray:
    """A standardised L2 logistic regression fitted on (train_x, train_y); the fake probability of val_x."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    classifier = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=5000))
    classifier.fit(train_x, train_y)
    return classifier.predict_proba(val_x)[:, 1]


def is_held_out(source: str, holdout: str) -> bool:
    """Whether a sample's source ("sd21-faces/fake" for several data folders, "gan" for fake/gan/) is `holdout`'s."""
    return bool(holdout) and holdout in source.split("/")


def load_model(args: argparse.Namespace) -> tuple[nn.Module, int, int]:
    """The frozen network and its (image size, scale): a checkpoint's, or `--arch` with `--weights`."""
    from training.checkpoint import model_from_checkpoint, read_checkpoint
    from training.model import create_classifier, default_image_size
    from training.weights import load_pretrained

    if args.checkpoint:
        model, config = model_from_checkpoint(read_checkpoint(args.checkpoint))
        size = config.image_size or default_image_size(config.arch)
        return model, size, config.scale or size
    model = create_classifier(args.arch)
    load_pretrained(model, args.arch, args.weights)
    size = args.image_size or default_image_size(args.arch)
    return model.eval(), size, args.scale or size


def run(args: argparse.Namespace) -> dict:
    from training.data import FaceDataset, discover, split_samples
    from training.evaluate import per_source_metrics
    from training.model import cam_grid

    model, size, scale = load_model(args)
    splits = split_samples(discover(args.data), args.val_fraction, args.seed)
    train = [s for s in splits["train"] if not is_held_out(s.source, args.holdout)]
    if args.holdout and len(train) == len(splits["train"]):
        sources = sorted({s.source for s in splits["train"]})
        raise UserError(f"--holdout {args.holdout}: no training images of that source (sources: {', '.join(sources)})")
    val = splits["val"]
    if not val or len({s.label for s in train}) < 2:
        raise UserError("the probe needs real and fake training images besides the held-out source, and validation images")
    grid = cam_grid(model, size)
    train_features = stage_features(model, FaceDataset(train, size, grid, scale=scale), args.batch_size)
    val_features = stage_features(model, FaceDataset(val, size, grid, scale=scale), args.batch_size)
    train_y = np.array([s.label for s in train])
    labels, sources = np.array([s.label for s in val]), [s.source for s in val]
    names = [f"stage {i}" for i in range(len(train_features) - 1)] + ["final", "all"]
    train_features.append(np.concatenate(train_features, 1))
    val_features.append(np.concatenate(val_features, 1))
    table = {}
    for name, train_x, val_x in zip(names, train_features, val_features):
        scores = probe_scores(train_x, train_y, val_x, args.c)
        table[name] = {source: row["auc"] for source, row in per_source_metrics(labels, scores, sources, 0.5).items()}
    return {"holdout": args.holdout, "train_images": len(train), "val_images": len(val), "auc": table}


def print_table(result: dict) -> None:
    sources = sorted(next(iter(result["auc"].values())))
    held = result["holdout"]
    print(f"probes fitted on {result['train_images']} training images without {held or 'nothing'}; AUC on {result['val_images']} validation images")
    print(f"{'features':<10}" + "".join(f"{s + (' (held out)' if is_held_out(s, held) else ''):>30}" for s in sources))
    for name, row in result["auc"].items():
        print(f"{name:<10}" + "".join(f"{'-' if row[s] is None else format(row[s], '.3f'):>30}" for s in sources))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.feature_probe", description=__doc__.split("\n\n")[0])
    parser.add_argument("data", nargs="+", help="data folders (the plain layout, as `cyborg train` takes them)")
    parser.add_argument("--holdout", default="", help="the data folder (source) left out of the probes' training, e.g. sd21-faces")
    parser.add_argument("--checkpoint", help="probe a trained network (a cyborg checkpoint) instead of --arch/--weights")
    parser.add_argument("--arch", default="efficientnet_lite0")
    parser.add_argument("--weights", default="imagenet", help="imagenet, none or a file (with --arch)")
    parser.add_argument("--image-size", type=int, default=0, help="with --arch (default: the architecture's)")
    parser.add_argument("--scale", type=int, default=0, help="with --arch (default: the image size)")
    parser.add_argument("--val-fraction", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0, help="the validation split's seed (the trainer's default, 0)")
    parser.add_argument("--c", type=float, default=0.1, help="inverse L2 strength of the logistic regressions")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", type=Path, help="write the table as JSON here")
    args = parser.parse_args(argv)
    try:
        result = run(args)
    except UserError as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 2
    print_table(result)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
