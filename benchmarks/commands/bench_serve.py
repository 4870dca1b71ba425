"""`cyborg bench serve`: server throughput and latency against ONNX Runtime in-process.

Starts `cyborg serve` as a subprocess on free loopback ports, sweeps closed-loop concurrency with
raw-tensor and encoded-image requests, runs a Poisson open loop at half of the peak, and measures
the baselines without a server in the same run. See benchmarks/serve.py and docs/benchmarks.md.
"""

from __future__ import annotations

import argparse

from benchmarks.commands import positive_ints


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-repository", default="models", help="model repository to serve (default: models)")
    parser.add_argument("--model", help="model to measure (default: the first in the repository)")
    parser.add_argument("--version", type=int, help="model version (default: the latest)")
    parser.add_argument("--concurrency", type=positive_ints, default=[1, 4, 16, 32], help="closed-loop client counts (default: 1,4,16,32)")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per measurement (default: 10)")
    parser.add_argument("--rounds", type=int, default=2, help="baseline/server window pairs per sweep point, splitting --duration (default: 2)")
    parser.add_argument("--warmup", type=float, help="seconds before each server window starts counting (default: min(1, window/4))")
    parser.add_argument("--rate", type=float, help="Poisson request rate per second (default: half of the peak tensor throughput)")
    parser.add_argument("--images", help="folder of images to send (default: 32 synthetic 512x512 JPEGs)")
    parser.add_argument("--input-kind", default="", choices=["", "aligned", "photo", "auto"],
                        help="how image requests ask the server to read them: photo or auto finds and aligns every face "
                        "(the 'image' rows then count photos, the baseline still decodes whole images) (default: aligned)")
    parser.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                        help="extra `cyborg serve` argument, repeatable (e.g. --server-arg=--max-queue-delay-ms=5)")  # fmt: skip
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def run(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from core.errors import UserError
    from benchmarks.serve import format_report, run_benchmark

    if args.duration <= 0:
        raise UserError(f"--duration {args.duration}: must be positive")
    if args.rounds < 1:
        raise UserError(f"--rounds {args.rounds}: at least 1")
    if args.rate is not None and args.rate <= 0:
        raise UserError(f"--rate {args.rate}: must be positive")
    if args.images and not Path(args.images).is_dir():
        raise UserError(f"--images {args.images}: not a folder")
    if not Path(args.model_repository).is_dir():
        raise UserError(f"--model-repository {args.model_repository}: not a folder")
    report = run_benchmark(
        Path(args.model_repository),
        model=args.model,
        version=args.version,
        concurrency=args.concurrency,
        duration=args.duration,
        rate=args.rate,
        images=args.images,
        input_kind=args.input_kind,
        warmup=args.warmup,
        rounds=args.rounds,
        server_args=args.server_arg,
    )
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0
