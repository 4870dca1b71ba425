"""`cyborg norm-statistics CHECKPOINT --out FILE`: a finished network's BatchNorm statistics measured
again on its training images, a share of them changed (training.norm_statistics; docs/training.md)."""

from __future__ import annotations

import argparse
from pathlib import Path

from training.commands.train import FLAGS

AUGMENT_FLAGS = {flag: spec for flag, spec in FLAGS.items() if flag.startswith("--augment")}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", type=Path, metavar="CHECKPOINT", help="one network or a `cyborg ensemble` checkpoint")
    parser.add_argument("data", metavar="DATA", nargs="*",
                        help="the folders it was trained on (default: those its checkpoint records); the training images "
                             "are those of its own split, never its validation images")  # fmt: skip
    parser.add_argument("--out", type=Path, required=True, help="the new checkpoint file (for evaluate, ensemble and export)")
    parser.add_argument("--images", type=int, default=800, help="training images to measure on, evenly spread (default 800)")
    parser.add_argument("--changed", type=float, default=0.0,
                        help="the share of them sent through the everyday changes first (seeded): 0 measures clean "
                             "statistics, 0.3 a mix (default 0)")  # fmt: skip
    for flag, (field, kind, help_text) in AUGMENT_FLAGS.items():
        parser.add_argument(flag, dest=field, type=kind, default=argparse.SUPPRESS,
                            help=help_text.replace("(default:", "(default: the checkpoint's; train's"))  # fmt: skip
    parser.add_argument("--keep-first", type=int, default=0,
                        help="each network's first N BatchNorms (in module order, the order they run) keep their statistics: "
                             "early layers see pixel-level changes such as compression noise (default 0: all measured)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=None, help="which images are changed and how (default: the checkpoint's seed)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default 32)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")


def run(args: argparse.Namespace) -> int:
    from training.checkpoint import save_checkpoint
    from training.distributed import resolve_device
    from training.norm_statistics import set_norm_statistics

    augmentation = {field: getattr(args, field) for field, _, _ in AUGMENT_FLAGS.values() if hasattr(args, field)}
    checkpoint = set_norm_statistics(args.checkpoint, data=args.data or None, images=args.images, changed=args.changed,
                                     augmentation=augmentation, seed=args.seed, keep_first=args.keep_first, batch_size=args.batch_size,
                                     device=resolve_device(args.device))  # fmt: skip
    save_checkpoint(checkpoint, args.out)
    record = checkpoint.norm_statistics
    before = record["val_auc_before"]
    print(f"{args.out}: {checkpoint.architecture}; statistics of {record['images']} training images "
          f"({record['changed']} changed); validation AUC {checkpoint.val_metrics['auc']:.4f}"
          + (f" (before {before:.4f})" if before is not None else ""))  # fmt: skip
    return 0
