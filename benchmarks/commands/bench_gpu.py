"""`cyborg bench gpu`: the GPU proof in one call: training, export, ONNX Runtime CUDA, TensorRT and serving.

Writes OUT/gpu_check.json (rewritten after every step) and prints a summary; each step is "ok",
"skipped" with the reason (no CUDA, no onnxruntime-gpu, no TensorRT, ...) or "failed" with the
error. --dry-run runs the same code on the CPU with tiny models in seconds. Default step counts fit
about 8 minutes on one H200. See benchmarks/gpu_check.py and docs/benchmarks.md, "GPU check".
"""

from __future__ import annotations

import argparse

from benchmarks.commands import positive_ints


def int_list(text: str) -> tuple[int, ...]:
    return tuple(positive_ints(text))


def name_list(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from benchmarks.gpu_check import STEPS

    parser.add_argument("--out", default=None, metavar="DIR", help="where gpu_check.json goes (default: $OUT, else runs/gpu-check)")
    parser.add_argument("--work", default=None, metavar="DIR", help="checkpoints, model repository, maps (default: a temporary folder, removed)")
    parser.add_argument("--dry-run", action="store_true", help="tiny models on the CPU: test the script where there is no GPU")
    parser.add_argument("--data", default=None, metavar="FOLDER",
                        help="plain-layout faces (real/, fake/) to train on (default: shared/data/faces, ../shared/data/faces or "
                        ".gpudata/faces; a dry run makes a tiny synthetic set)")  # fmt: skip
    parser.add_argument("--skip", type=name_list, default=(), metavar="STEPS", help=f"comma-separated steps to leave out, of {', '.join(STEPS[1:])}")
    parser.add_argument("--budget", type=float, default=None, metavar="S", help="start no step after this many seconds (default: 450)")
    group = parser.add_argument_group("sizes (defaults: the GPU run's; --dry-run has tiny ones)")
    group.add_argument("--archs", type=name_list, default=None, help="bench train architectures (default: resnet50,densenet121)")
    group.add_argument("--bench-batch", type=int, default=None, help="bench train batch size (default: 64)")
    group.add_argument("--bench-steps", type=int, default=None, help="bench train timed steps per way (default: 20)")
    group.add_argument("--train-arch", default=None, help="cyborg train architecture (default: efficientnet_lite0, the default model's)")
    group.add_argument("--train-epochs", type=int, default=None, help="cyborg train epochs (default: 2)")
    group.add_argument("--train-batch", type=int, default=None, help="cyborg train batch size (default: 64)")
    group.add_argument("--train-weights", default=None, help="none, imagenet or a file (default: none; the device machine has no network)")
    group.add_argument("--workers", type=int, default=None, help="data-loading workers (default: 8)")
    group.add_argument("--speed-seconds", type=float, default=None, help="seconds per engine speed measurement (default: 2)")
    group.add_argument("--serve-concurrency", type=int_list, default=None, help="bench serve client counts (default: 1,4,16,32,64)")
    group.add_argument("--serve-duration", type=float, default=None, help="bench serve seconds per sweep point (default: 4)")
    group.add_argument("--serve-on-cpu", action="store_true", help="run the serve step even where the server would use the CPU")
    parser.add_argument("--json", action="store_true", help="print gpu_check.json instead of the summary")


FLAG_FIELDS = {  # argparse dest -> Settings field
    "archs": "archs", "bench_batch": "bench_batch", "bench_steps": "bench_steps", "train_arch": "train_arch",
    "train_epochs": "train_epochs", "train_batch": "train_batch", "train_weights": "train_weights", "workers": "workers",
    "speed_seconds": "speed_seconds", "serve_concurrency": "serve_concurrency", "serve_duration": "serve_duration",
    "budget": "budget_s",
}  # fmt: skip


def settings_from(args: argparse.Namespace, out, work):
    from pathlib import Path

    from benchmarks.gpu_check import STEPS, Settings
    from core.errors import UserError

    unknown = [name for name in args.skip if name not in STEPS[1:]]
    if unknown:
        raise UserError(f"--skip: unknown {', '.join(unknown)}; choose from {', '.join(STEPS[1:])}")
    overrides = {field: getattr(args, dest) for dest, field in FLAG_FIELDS.items() if getattr(args, dest) is not None}
    overrides.update(skip=tuple(args.skip), serve_on_cpu=args.serve_on_cpu, data=Path(args.data) if args.data else None)
    for field in ("bench_batch", "bench_steps", "train_epochs", "train_batch"):
        if overrides.get(field, 1) < 1:
            raise UserError(f"--{field.replace('_', '-')}: at least 1")
    if args.dry_run:
        return Settings.dry(out, work, **overrides)
    return Settings(out=out, work=work, **overrides)


def run(args: argparse.Namespace) -> int:
    import json
    import os
    import shutil
    from pathlib import Path

    from benchmarks.gpu_check import GpuCheck, default_work, format_summary

    out = Path(args.out or os.environ.get("OUT") or "runs/gpu-check")
    work = Path(args.work) if args.work else default_work()
    try:
        report = GpuCheck(settings_from(args, out, work)).run()
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(report, indent=2, default=str) if args.json else format_summary(report))
    print(f"wrote {out / 'gpu_check.json'}")
    return 1 if report["summary"]["failed"] else 0
