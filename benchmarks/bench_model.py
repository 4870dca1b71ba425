"""Write a realistic model repository entry for `cyborg bench serve` without a trained checkpoint.

    .venv/bin/python -m benchmarks.bench_model models-bench --arch efficientnet_lite0

Random weights (throughput does not depend on them), exported by the product's own exporter
(`training.export.export_graph`: the contract's tensor names, a dynamic batch, the parity check
against torch) and sealed with model.json and config.pbtxt like any exported version.
Prefer `cyborg export` on a real checkpoint; this exists so the serving benchmark can run on a
fresh clone. Needs torch (the benchmark itself does not).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from core import contract


def main() -> None:
    from training.export import export_graph, jsonable, seal_version
    from training.model import create_classifier, default_image_size

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("repository", type=Path)
    parser.add_argument("--arch", default="efficientnet_lite0")
    parser.add_argument("--name", default=None, help="model name (default: the architecture)")
    parser.add_argument("--version", type=int, default=1)
    args = parser.parse_args()

    torch.manual_seed(0)
    size = default_image_size(args.arch)
    classifier = create_classifier(args.arch).eval()
    folder = args.repository / (args.name or args.arch) / str(args.version)
    folder.mkdir(parents=True, exist_ok=True)
    graph = export_graph(classifier, folder, size, validation_paths=[], scale=size)
    mean, std = classifier.pixel_mean.flatten() / 255.0, classifier.pixel_std.flatten() / 255.0
    entry = contract.ModelContract(
        name=args.name or args.arch,
        version=args.version,
        architecture=args.arch,
        input_height=size,
        input_width=size,
        cam_height=graph.cam_grid[0],
        cam_width=graph.cam_grid[1],
        mean=tuple(round(float(v), 6) for v in mean),
        std=tuple(round(float(v), 6) for v in std),
        threshold=0.5,
        metrics=jsonable({"export": graph.figures}),
        training={"saliency": "none", "note": "random weights, for benchmarks only"},
        created=contract.utc_now(),
    )
    seal_version(folder, entry)
    print(folder / contract.CONTRACT_FILE)


if __name__ == "__main__":
    main()
