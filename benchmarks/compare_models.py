"""Exported model versions side by side on one data set, clean and under everyday changes.

    .venv/bin/python -m benchmarks.compare_models models/cyborg-faces/4 models/cyborg-faces/5 \
        --data runs/default-model/data/faces runs/default-model/data/sd21-faces runs/default-model/data/portraits --perturb all

Works from the model repository alone (model.onnx + model.json, no checkpoint): each image goes
through `core.images.prepare` with each version's own contract, exactly as the server prepares it,
and through ONNX Runtime on the CPU (an int8 version with 8-bit weights on exact kernels where this CPU
would saturate them, as the server runs it: `engines.cpu`). The images are the validation split `cyborg train` holds out of
DATA for --seed and --val-fraction (the newest version's training record gives both by default),
so a version trained on other images may have seen some of them: say so when reading its figures.
Prints AUC overall and per source for every perturbation, ECE of the calibrated probability, the
share of real images called fake at each version's default operating point, and images/s (ONNX
Runtime CPU, batch 32: the median of --rounds rounds in which the versions take turns, after a
warm-up pass, so the ratios between versions hold on a loaded machine). With --heatmaps (the maps
folder `cyborg train` reads), also how well each version's clean CAM agrees with the maps
(`training.evaluate.cam_agreement`, what `cyborg evaluate` reports for a checkpoint): each map is
brought onto the picture, cut to the region the server feeds the model (`core.images.input_region`)
and reduced to that version's CAM grid, so an int8 or re-exported version's explanations are
measured from the repository alone.

Every AUC comes with its 95 % bootstrap interval (`training.intervals`: reals and fakes resampled
separately), and every version after the first with its AUC difference from the first on the same
images and resamples (paired): "-0.0025 [-0.0061, +0.0009]" is no difference at that confidence.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from core import contract as c
from core.errors import UserError
from core.images import input_region, prepare, read_image
from core.thresholds import Calibration, expected_calibration_error
from engines.cpu import exact_int8_entries
from engines.runtime import OnnxRuntimeBackend
from training.data import discover, split_samples
from training.evaluate import INTERVALS, auc_intervals, binary_metrics, cam_agreement, per_source_metrics
from training.perturb import parse_perturbations
from training.saliency import load_map, prepare_map

BATCH = 32


def run(backend: OnnxRuntimeBackend, images: np.ndarray) -> dict[str, np.ndarray]:
    """Every output of the model for all `images`, BATCH at a time."""
    parts = [backend.run(images[i : i + BATCH]) for i in range(0, len(images), BATCH)]
    return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}


def stretched_maps(samples: list, pictures: list) -> list:
    """Each sample's map as a float PIL image stretched over its picture (None where it has none)."""
    from PIL import Image

    return [None if sample.map_path is None else
            Image.fromarray(load_map(sample.map_path), mode="F").resize(picture.size, Image.Resampling.BILINEAR)
            for sample, picture in zip(samples, pictures)]  # fmt: skip


def maps_on_grid(stretched: list, contract: c.ModelContract) -> tuple[np.ndarray, np.ndarray]:
    """(maps [N, h, w] on the contract's CAM grid, has_map [N]): each stretched map cut to its picture's
    model-input region and reduced as training reduces maps."""
    grid = (contract.cam_height, contract.cam_width)
    maps = np.zeros((len(stretched), *grid), dtype=np.float32)
    for i, full in enumerate(stretched):
        if full is not None:
            maps[i] = prepare_map(np.asarray(full.crop(input_region(full.size, contract))), grid)
    return maps, np.array([full is not None for full in stretched])


def compare(folders: list[Path], data: list[str], seed: int, val_fraction: float, perturb: str, rounds: int = 5,
            heatmaps: str | None = None) -> dict:  # fmt: skip
    samples = split_samples(discover(data if len(data) > 1 else data[0], heatmaps=heatmaps), val_fraction, seed)["val"]
    labels = np.array([s.label for s in samples])
    sources = [s.source for s in samples]
    decoded = [read_image(s.path) for s in samples]
    stretched = stretched_maps(samples, decoded) if heatmaps is not None else None
    report: dict = {"images": len(samples), "seed": seed, "val_fraction": val_fraction, "data": data, "models": {},
                    "intervals": INTERVALS}  # fmt: skip
    timed = []  # (clean row, backend, prepared clean images) of every version, timed together at the end
    first: dict[str, np.ndarray] = {}  # the first version's scores per change: the others' paired reference
    for folder in folders:
        contract = c.read_contract(folder)
        backend = OnnxRuntimeBackend(folder / c.ONNX_FILE, device="cpu", config_entries=exact_int8_entries(contract.int8_weight_bits))
        calibration = Calibration.from_dict(contract.calibration)
        rows = {}
        for perturbation in parse_perturbations(perturb):
            images = np.stack([prepare(perturbation(image), contract) for image in decoded])
            outputs = run(backend, images)
            scores = outputs[c.SCORE_OUTPUT]
            metrics = binary_metrics(labels, scores, contract.threshold)
            per_source = per_source_metrics(labels, scores, sources, contract.threshold)
            intervals = auc_intervals(labels, scores, sources)
            rows[perturbation.name] = {
                "auc": metrics["auc"],
                "auc_ci": intervals.pop("all"),
                "per_source_auc_ci": intervals,
                "fpr_at_default": metrics["fpr"],
                "tpr_at_default": metrics["tpr"],
                "per_source_auc": {name: row["auc"] for name, row in per_source.items()},
                "per_source_called_fake": {name: row["accuracy"] if name.endswith("fake") else 1 - row["accuracy"]
                                           for name, row in per_source.items()},
            }  # fmt: skip
            if perturbation.name in first:
                differences = auc_intervals(labels, scores, sources, reference=first[perturbation.name])
                rows[perturbation.name]["auc_vs_first"] = differences.pop("all")
                rows[perturbation.name]["per_source_auc_vs_first"] = differences
            else:
                first[perturbation.name] = scores
            if perturbation.name == "clean":
                rows["clean"]["ece_probability"] = expected_calibration_error(labels, calibration.apply(scores))
                if stretched is not None:
                    maps, has_map = maps_on_grid(stretched, contract)
                    rows["clean"]["cam_agreement"] = cam_agreement(outputs[c.CAM_OUTPUT], maps, has_map, labels)
                timed.append((rows["clean"], backend, images))
        report["models"][f"{contract.name} v{contract.version}"] = rows
    for row, rate in zip((row for row, _, _ in timed), images_per_second([(b, i) for _, b, i in timed], rounds)):
        row["images_per_s"] = rate
    report["speed"] = {"rounds": rounds, "batch": BATCH, "timing": "median of interleaved rounds over the clean images"}
    return report


def images_per_second(models: list[tuple[OnnxRuntimeBackend, np.ndarray]], rounds: int) -> list[float]:
    """Each model's images/s on its images: the median of `rounds` rounds, the models taking turns
    within each round, so a change in the machine's load falls on all of them alike (the first
    scoring pass above was the warm-up)."""
    rates: list[list[float]] = [[] for _ in models]
    for _ in range(rounds):
        for rate, (backend, images) in zip(rates, models):
            started = time.perf_counter()
            run(backend, images)
            rate.append(len(images) / (time.perf_counter() - started))
    return [float(np.median(rate)) for rate in rates]


def with_interval(auc: float | None, interval: list[float] | None) -> str:
    """"0.9880 [0.979, 0.995]" (or "n/a")."""
    if auc is None:
        return "n/a"
    return f"{auc:.4f}" + ("" if interval is None else f" [{interval[0]:.3f}, {interval[1]:.3f}]")


def difference(paired: list[float] | None) -> str:
    """"-0.0025 [-0.0061, +0.0009]": an AUC difference from the first version with its paired interval."""
    return "n/a" if paired is None else f"{paired[0]:+.4f} [{paired[1]:+.4f}, {paired[2]:+.4f}]"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("versions", nargs="+", type=Path, help="model version folders (model.onnx + model.json)")
    parser.add_argument("--data", nargs="+", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--val-fraction", type=float, default=0.1)
    parser.add_argument("--perturb", default="clean")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds for images/s (default 5)")
    parser.add_argument("--heatmaps", help="saliency maps folder: also report the clean CAMs' agreement with them")
    parser.add_argument("--json", type=Path, help="also write the report here")
    args = parser.parse_args(argv)
    try:
        report = compare(args.versions, args.data, args.seed, args.val_fraction, args.perturb, args.rounds, args.heatmaps)
    except UserError as error:
        print(f"compare_models: error: {error}", file=sys.stderr)
        return 2
    for name, rows in report["models"].items():
        clean = rows["clean"]
        print(f"{name}: {report['images']} images; clean AUC {clean['auc']:.4f}, ECE {clean['ece_probability']:.4f}, "
              f"reals called fake {clean['fpr_at_default']:.3f}, {clean['images_per_s']:.1f} images/s")  # fmt: skip
        if clean.get("cam_agreement"):
            agreement = clean["cam_agreement"]
            print(f"  CAM against the maps ({agreement['n_maps']} images): Pearson {agreement['pearson']:.4f}, "
                  f"mass in the map's top {agreement['top_fraction']:.0%} {agreement['mass_in_top_region']:.4f}")  # fmt: skip
        sources = sorted(clean["per_source_auc"])
        print(f"  {'change':<12}{'AUC [95 % interval]':>28}" + "".join(f"{s:>28}" for s in sources))
        for change, row in rows.items():
            cells = [with_interval(row["auc"], row["auc_ci"])]
            cells += [with_interval(row["per_source_auc"].get(s), row["per_source_auc_ci"].get(s)) for s in sources]
            print(f"  {change:<12}" + "".join(f"{cell:>28}" for cell in cells))
            if "auc_vs_first" in row:
                cells = [difference(row["auc_vs_first"])] + [difference(row["per_source_auc_vs_first"].get(s)) for s in sources]
                print(f"  {'  vs first':<12}" + "".join(f"{cell:>28}" for cell in cells))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
