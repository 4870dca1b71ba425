"""`cyborg bench train`: training step time of CYBORG against plain CE, side by side in one run.

Each step is forward + backward + SGD step on one fixed random batch. The three ways are timed in
turn, step after step (so drifting machine load hits them alike), and the median is reported:
- ce: the cross-entropy baseline (guidance "ce");
- cyborg: the CYBORG loss with the CAM from the same forward pass (guidance "cyborg");
- authors: the CYBORG loss with the CAM from a second `features()` forward, as the authors'
  DenseNet code does (batch-norm statistics updated twice per step): a reference ratio only.
"""

from __future__ import annotations

import argparse
import json
import logging
import os

DEFAULT_ARCHS = "resnet50,densenet121"
WAYS = ("ce", "cyborg", "authors")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--archs", default=DEFAULT_ARCHS, help=f"comma-separated architectures (default: {DEFAULT_ARCHS})")
    parser.add_argument("--batch-size", type=int, default=16, help="batch size (default: 16)")
    parser.add_argument("--image-size", type=int, default=None, help="input side (default: the architecture's, 224 or 299)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per way (default: 5)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per way first (default: 1)")
    parser.add_argument("--alpha", type=float, default=0.5, help="CYBORG alpha (default: 0.5)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")


def authors_step(model, batch, config):
    """The authors' way: logits from one forward, the CAM from a second `features()` forward."""
    import torch.nn.functional as F

    from training.guidance import StepResult
    from training.loss import LossTerms, cam_for_loss, saliency_mse

    logits = model(batch["image"]).logits
    features = model.backbone.forward_features(model.normalise(batch["image"]))  # the second forward
    class_maps = F.conv2d(features, model.classifier.weight[:, :, None, None].to(features.dtype))
    ce = F.cross_entropy(logits.float(), batch["label"])
    term = saliency_mse(cam_for_loss(class_maps, logits, batch["label"], config.cam_class), batch["saliency"], batch["has_saliency"])
    terms = LossTerms(total=config.alpha * ce + (1 - config.alpha) * term, ce=ce, saliency=term)
    return StepResult(loss=terms.total, ce=terms.ce, guidance_term=terms.saliency, logits=logits)


def bench_arch(arch: str, args: argparse.Namespace, device) -> dict:
    """Median seconds per training step of each way for one architecture."""
    import statistics
    import time

    import torch

    from training.config import TrainConfig
    from training.guidance import get_method
    from training.model import cam_grid, create_classifier, default_image_size
    from training.trainer import backward_step, build_optimizer, forward_step, to_device

    torch.manual_seed(0)
    config = TrainConfig(arch=arch, weights="none", alpha=args.alpha, batch_size=args.batch_size)
    size = args.image_size or default_image_size(arch)
    model = create_classifier(arch)
    grid = cam_grid(model, size)
    cuda = device.type == "cuda"
    model.to(device)
    if cuda and config.channels_last:
        model.to(memory_format=torch.channels_last)
    model.train()
    optimizer = build_optimizer(config, model)
    scaler = torch.amp.GradScaler("cuda", enabled=cuda and config.amp)
    batch = {
        "image": torch.randint(0, 256, (args.batch_size, 3, size, size), dtype=torch.uint8),
        "label": torch.arange(args.batch_size) % 2,
        "saliency": torch.rand(args.batch_size, *grid),
        "has_saliency": torch.ones(args.batch_size, dtype=torch.bool),
    }
    batch = to_device(batch, device, cuda and config.channels_last)
    methods = {"ce": get_method("ce"), "cyborg": get_method("cyborg"), "authors": authors_step}

    def step(way: str) -> float:
        if cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        backward_step(forward_step(model, batch, methods[way], config, device), optimizer, scaler)
        if cuda:
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    for _ in range(args.warmup):
        for way in WAYS:
            step(way)
    times: dict[str, list[float]] = {way: [] for way in WAYS}
    for _ in range(args.steps):
        for way in WAYS:
            times[way].append(step(way))
    median = {way: statistics.median(values) for way, values in times.items()}
    return {
        "arch": arch,
        "image_size": size,
        "cam_grid": list(grid),
        **{f"{way}_s": median[way] for way in WAYS},
        "cyborg_vs_ce": median["cyborg"] / median["ce"],
        "authors_vs_ce": median["authors"] / median["ce"],
    }


def run(args: argparse.Namespace) -> int:
    import torch

    from core.errors import UserError
    from training.distributed import resolve_device

    if args.batch_size < 1 or args.steps < 1 or args.warmup < 0:
        raise UserError("--batch-size and --steps must be at least 1, --warmup at least 0")
    device = resolve_device(args.device)
    archs = [name.strip() for name in args.archs.split(",") if name.strip()]
    if not archs:
        raise UserError("--archs: give at least one architecture")
    results = []
    for arch in archs:
        logging.getLogger(__name__).info("timing %s: %d warm-up + %d steps of each of %s", arch, args.warmup, args.steps, ", ".join(WAYS))
        try:
            results.append(bench_arch(arch, args, device))
        except ValueError as error:
            raise UserError(f"--archs {arch}: {error}") from error
    report = {
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "batch_size": args.batch_size,
        "steps": args.steps,
        "results": results,
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"training step time, batch {args.batch_size}, median of {args.steps} steps, {report['device']} ({report['threads']} threads)")
    print(f"{'arch':<18}{'size':>5}{'CAM':>6}{'CE s':>9}{'CYBORG s':>10}{'authors s':>11}{'CYBORG/CE':>11}{'authors/CE':>12}")
    for row in results:
        grid = "x".join(map(str, row["cam_grid"]))
        print(
            f"{row['arch']:<18}{row['image_size']:>5}{grid:>6}{row['ce_s']:>9.3f}{row['cyborg_s']:>10.3f}"
            f"{row['authors_s']:>11.3f}{row['cyborg_vs_ce']:>10.2f}x{row['authors_vs_ce']:>11.2f}x"
        )
    return 0
