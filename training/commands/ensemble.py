"""`cyborg ensemble`: average several checkpoints into one (see docs/training.md#ensembles)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoints", type=Path, nargs="+", metavar="CHECKPOINT",
                        help="two or more checkpoints of `cyborg train` with the same input size, scale and validation split")
    parser.add_argument("--out", type=Path, required=True, help="the ensemble's checkpoint file (for evaluate and export)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass when validating (default 32)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")


def run(args: argparse.Namespace) -> int:
    from training.checkpoint import save_checkpoint
    from training.ensemble import build_ensemble
    from training.distributed import resolve_device

    ensemble = build_ensemble(args.checkpoints, batch_size=args.batch_size, device=resolve_device(args.device))
    save_checkpoint(ensemble, args.out)
    auc = ensemble.val_metrics["auc"]
    members = ", ".join(f"{record['val_auc']:.4f}" if record["val_auc"] is not None else "-" for record in ensemble.ensemble)
    print(f"{args.out}: {ensemble.architecture}; validation AUC {auc:.4f} (members {members})")
    return 0
