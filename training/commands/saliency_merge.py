"""`cyborg saliency merge SESSION --out MAPS_DIR`: average the human annotations of a `cyborg annotate`
session into the heatmaps folder `cyborg train --heatmaps` reads.

Writes one grayscale PNG per annotated image (its stem + .png, the image's size), MAPS_DIR/PROVENANCE.json
(`"source": "human"`, the annotators, how many marked each image) so runs record `saliency: human`, and
MAPS_DIR/report.json (images done, human accuracy per class, agreement between annotators, time per
image), printed as text (or as JSON with --json).
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("session", metavar="SESSION", help="the folder `cyborg annotate --out` wrote")
    parser.add_argument("--out", metavar="MAPS_DIR", required=True, help="folder for the merged maps (new, empty, or an earlier merge)")
    parser.add_argument("--correct-only", action="store_true", help="use only the answers whose decision matched the label")
    parser.add_argument("--min-annotators", type=int, default=1, metavar="N",
                        help="write a map only for images that at least N annotators marked (default: 1)")  # fmt: skip
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def run(args: argparse.Namespace) -> int:
    import json

    from core.errors import UserError
    from training.annotations import Session, format_report, merge

    if args.min_annotators < 1:
        raise UserError(f"--min-annotators {args.min_annotators}: at least 1")
    result = merge(Session.open(args.session), args.out, correct_only=args.correct_only, min_annotators=args.min_annotators)
    print(json.dumps(result, indent=1) if args.json else format_report(result))
    return 0
