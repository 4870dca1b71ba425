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


def write_model(repository: Path, arch: str = "efficientnet_lite0", name: str | None = None, version: int = 1,
                image_size: int | None = None, weights: str = "none") -> Path:
    """Export `arch` (random weights, or `weights` as `cyborg train --weights` reads them) into
    `repository`/NAME/VERSION (sealed with model.json); return the folder."""
    from training.export import export_graph, jsonable, seal_version
    from training.model import create_classifier, default_image_size

    torch.manual_seed(0)
    size = image_size or default_image_size(arch)
    classifier = create_classifier(arch).eval()
    if weights != "none":  # random BatchNorm statistics can give features too small for the parity check
        from training.weights import load_pretrained

        load_pretrained(classifier, arch, weights)
    folder = Path(repository) / (name or arch) / str(version)
    folder.mkdir(parents=True, exist_ok=True)
    graph = export_graph(classifier, folder, size, validation_paths=[], scale=size)
    mean, std = classifier.pixel_mean.flatten() / 255.0, classifier.pixel_std.flatten() / 255.0
    entry = contract.ModelContract(
        name=name or arch,
        version=version,
        architecture=arch,
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
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("repository", type=Path)
    parser.add_argument("--arch", default="efficientnet_lite0")
    parser.add_argument("--name", default=None, help="model name (default: the architecture)")
    parser.add_argument("--version", type=int, default=1)
    args = parser.parse_args()
    folder = write_model(args.repository, args.arch, args.name, args.version)
    print(folder / contract.CONTRACT_FILE)


if __name__ == "__main__":
    main()
