"""`cyborg evaluate CHECKPOINT DATA --out DIR`: AUC, EER, accuracy, per-source table, ROC and CAM pictures."""

from __future__ import annotations

import argparse

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", metavar="CHECKPOINT", help="a checkpoint written by `cyborg train` (best.pt or last.pt)")
    parser.add_argument("data", metavar="DATA", nargs="+",
                        help="plain-layout folder (real/, fake/, maps/) or the root the --csv paths hang from; several plain "
                        "folders are evaluated together (sources named FOLDER/SOURCE, as `cyborg train` names them)")  # fmt: skip
    parser.add_argument("--csv", help="the authors' CSV (split,class,path[,source])")
    parser.add_argument("--heatmaps", help="folder of human maps matched by file name")
    parser.add_argument(
        "--split",
        default="auto",
        help="auto, test, val, train or all: the data's test split, the checkpoint's validation split, train, or all "
        "(default auto: test when the data has one, else all)",
    )
    parser.add_argument(
        "--threshold",
        type=float,
        help="score at or above which an image is called fake (default: the EER threshold the checkpoint "
        "chose on its validation split)",
    )
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    parser.add_argument("--workers", type=int, default=0, help="data-loading worker processes (default 0)")
    parser.add_argument("--cams", type=int, default=16, help="images in the CAM overlay grid (default 16)")
    parser.add_argument("--skip-unreadable", action="store_true", help="skip unreadable images with a warning instead of stopping")
    parser.add_argument(
        "--perturb",
        metavar="LIST",
        help="also score the images after everyday changes: a comma list of clean, jpeg90, jpeg70, jpeg50, jpeg30, webp, "
        "half, up2x, blur1, blur2, crop80, screenshot, or all (writes perturbations.png; docs/evaluation.md)",
    )
    parser.add_argument("--calibrate", default="auto", metavar="METHOD",
                        help="the calibration the ECE report fits on the checkpoint's validation predictions: auto "
                             "(default), temperature, platt or none; pass the --calibrate you export with")  # fmt: skip
    parser.add_argument("--out", required=True, help="output folder for results.json, roc.png, cams.png, predictions.csv")


def run(args: argparse.Namespace) -> int:
    from core.errors import UserError
    from training.evaluate import evaluate_checkpoint

    if args.batch_size < 1:
        raise UserError("--batch-size must be at least 1")
    if args.threshold is not None and not 0.0 <= args.threshold <= 1.0:
        raise UserError(f"--threshold {args.threshold}: must be in [0, 1] (a fake probability)")
    if args.cams < 0 or args.workers < 0:
        raise UserError("--cams and --workers must not be negative")
    results = evaluate_checkpoint(
        args.checkpoint,
        args.data[0] if len(args.data) == 1 else args.data,
        args.out,
        csv=args.csv,
        heatmaps=args.heatmaps,
        split=args.split,
        threshold=args.threshold,
        batch_size=args.batch_size,
        device=args.device,
        workers=args.workers,
        max_cams=args.cams,
        skip_unreadable=args.skip_unreadable,
        perturb=args.perturb,
        calibrate=args.calibrate,
    )
    print(summary(results))
    return 0


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _interval(interval: list[float] | None) -> str:
    return "" if interval is None else f"{interval[0]:.3f}-{interval[1]:.3f}"


def summary(results: dict) -> str:
    """A short human-readable table of the results."""
    lines = [
        f"{results['n_images']} images ({results['n_real']} real, {results['n_fake']} fake), split {results['data']['split']}",
        f"AUC {_fmt(results['auc'])} ({results['intervals']['confidence']:.0%} interval {_interval(results['auc_ci']) or 'n/a'})  "
        f"EER {_fmt(results['eer'])}  accuracy {_fmt(results['accuracy'])} "
        f"at threshold {results['threshold']:.4g} ({results['threshold_source']})",
        f"{'source':<20} {'n':>6} {'AUC':>8} {'interval':>13} {'accuracy':>9} {'mean score':>11}",
    ]
    for source, row in results["per_source"].items():
        lines.append(f"{source:<20} {row['n']:>6} {_fmt(row['auc']):>8} {_interval(row['auc_ci']):>13} "
                     f"{_fmt(row['accuracy']):>9} {row['mean_score']:>11.4g}")  # fmt: skip
    agreement = results.get("cam_agreement")
    if agreement:
        lines.append(
            f"CAM vs {agreement['maps']} maps ({agreement['n_maps']} images): Pearson {_fmt(agreement['pearson'])}, "
            f"CAM mass in the map's top {agreement['top_fraction']:.0%} {_fmt(agreement['mass_in_top_region'])} "
            f"(even spread: {_fmt(agreement['top_region_fraction'])})"
        )
    calibration = results.get("calibration")
    if calibration:
        fitted = calibration["calibration"]
        lines.append(f"ECE ({calibration['bins']} bins) {_fmt(calibration['raw']['ece'])} raw" + (
            f", {_fmt(calibration['calibrated']['ece'])} calibrated ({fitted['method']}, fitted on the checkpoint's validation predictions)"
            if fitted else " (no validation predictions in the checkpoint to calibrate on)"))  # fmt: skip
    if results.get("perturbations"):
        lines += perturbation_table(results["perturbations"])
    lines.append(f"wrote {results['out']}: " + ", ".join(name for name in ("results.json", *results["files"].values()) if name))
    return "\n".join(lines)


def perturbation_table(table: dict) -> list[str]:
    """Lines of the robustness table: overall AUC, EER, accuracy and the AUC change from clean, then AUC per source."""
    sources = sorted({source for row in table.values() for source in row["per_source"]})
    width = max([8, *(len(source) for source in sources)]) if len(sources) > 1 else 0
    header = f"{'perturbation':<12} {'AUC':>8} {'interval':>13} {'EER':>8} {'accuracy':>9} {'vs clean':>9}"
    lines = [header + (" | AUC of " + " ".join(f"{s:>{width}}" for s in sources) if width else "")]
    for name, row in table.items():
        drop = "" if row["auc_vs_clean"] is None else f"{row['auc_vs_clean']:+.4f}"
        line = f"{name:<12} {_fmt(row['auc']):>8} {_interval(row.get('auc_ci')):>13} {_fmt(row['eer']):>8} {_fmt(row['accuracy']):>9} {drop:>9}"
        if width:
            line += " |        " + " ".join(f"{_fmt(row['per_source'].get(s, {}).get('auc')):>{width}}" for s in sources)
        lines.append(line)
    return lines
