"""`cyborg checkpoint VERSION_FOLDER --out DIR`: a published fp32 version's networks as checkpoints again
(training.from_version; docs/training.md#from-a-published-version-cyborg-checkpoint)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("version", type=Path, metavar="VERSION_FOLDER", help="a published fp32 version (models/NAME/N: model.onnx + model.json)")
    parser.add_argument("--out", type=Path, required=True,
                        help="folder for network.pt (one network) or member-K.pt and ensemble.pt (an ensemble)")
    parser.add_argument("--data", nargs="+", default=None, metavar="FOLDER",
                        help="where the version's data folders are now (default: the folders its model.json records); "
                             "its validation split is re-drawn from them and scored by each checkpoint")  # fmt: skip


def run(args: argparse.Namespace) -> int:
    from training.checkpoint import read_checkpoint
    from training.from_version import checkpoints_from_version

    for path in checkpoints_from_version(args.version, args.out, args.data):
        checkpoint = read_checkpoint(path)
        auc = checkpoint.val_metrics.get("auc")
        print(f"{path}: {checkpoint.architecture}; " + (f"validation AUC {auc:.4f}" if auc is not None else "no validation scores"))
    return 0
